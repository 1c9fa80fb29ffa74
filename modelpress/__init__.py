"""modelpress: make trained PyTorch models much smaller, keep their accuracy.

The library is plain PyTorch: every method is a function you can call from a notebook::

    from modelpress import compress, PQConfig, PruneConfig, WFNConfig, LCConfig, LCTask, arch_spec, pack_model, load_packed
    student, stats = compress(model, PQConfig(), calibration=images, train_batches=batches)
    size = pack_model(student, "model.mpk", arch_spec("fmnist_cnn"))
    model, meta = load_packed("model.mpk")

    # iterative magnitude pruning with LR rewinding, to 90 % sparsity
    pruned, cycles = compress(model, PruneConfig(target_sparsity=0.9, epochs=3, lr=0.05, weight_decay=5e-4),
                              train_batches=batches)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# What `from modelpress import X` gives, and the module that defines it. They are imported on
# first use (PEP 562), so that a command that needs none of them (a Prefect worker's setup, a
# deployment's reschedule) starts without importing torch, seconds of a process's start.
_EXPORTS = {
    "compress": ".methods", "KMeansConfig": ".methods.kmeans", "PQConfig": ".methods.pq",
    "PruneConfig": ".methods.prune", "PrunePQConfig": ".methods.prune", "UniformConfig": ".methods.uniform",
    "WFNConfig": ".methods.wfn", "LCConfig": ".methods.lc", "LCTask": ".methods.lc",
    "arch_spec": ".pack", "load_packed": ".pack", "pack_model": ".pack", "read_packed": ".pack",
}

if TYPE_CHECKING:
    from .methods import compress
    from .methods.kmeans import KMeansConfig
    from .methods.lc import LCConfig, LCTask
    from .methods.pq import PQConfig
    from .methods.prune import PruneConfig, PrunePQConfig
    from .methods.uniform import UniformConfig
    from .methods.wfn import WFNConfig
    from .pack import arch_spec, load_packed, pack_model, read_packed

# Spelled out (not list(_EXPORTS)): ruff and mypy read the public names from a literal __all__.
__all__ = ["KMeansConfig", "LCConfig", "LCTask", "PQConfig", "UniformConfig", "PruneConfig", "PrunePQConfig", "WFNConfig", "arch_spec",
           "compress", "load_packed", "pack_model", "read_packed"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
