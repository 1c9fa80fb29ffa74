"""Product quantization, layer by layer ("And the bit goes down", Stock et al. 2019)."""

from .config import BlockSpec, PQConfig
from .kmeans import gram_kmeans
from .layer import PQAttention, PQLayer
from .method import METHOD
from .quantize import plan, quantize_pq

__all__ = ["METHOD", "BlockSpec", "PQAttention", "PQConfig", "PQLayer", "gram_kmeans", "plan", "quantize_pq"]
