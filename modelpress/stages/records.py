"""The typed records stages write and the orchestration reads (one definition of each field)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # older files may carry more; nothing is lost on re-write


class TeacherInfo(_Record):
    """teacher/teacher.json: the model being compressed, as evaluated here."""

    arch: str
    top1: float
    params: int
    fp32_bytes: int
    source: str  # the weights file or URI, or "trained"
    trained: bool
    seconds: float
    num_classes: int  # 0: an encoder (no classes)
    sha256: str  # of teacher/teacher.mpk
    train_key: str | None = None  # a teacher trained here: the key of its training (stage key less the evaluation's params)


class Summary(_Record):
    """metrics.json: what a person, DVC or the registry compares between runs."""

    teacher_top1: float | None
    compressed_top1: float
    top1_drop: float | None
    packed_bytes: int
    teacher_fp32_bytes: int | None
    compression_ratio: float
    test_images: int
    layers_quantized: int
    method: str
    packed_sha256: str
    device: str
    host: str
    sparsity: float | None = None
    metric: str = "top1"  # what *_top1 hold: top-1 (%) or, for a text encoder, embedding_cosine (% cosine to the teacher)
