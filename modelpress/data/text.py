"""Text data sets for transformer encoders: JSON Lines files, tokenized offline.

A text data set is two files, ``train.jsonl`` and ``test.jsonl``, one JSON object per line with a
``"text"`` string (and, optionally, an integer ``"label"``); they are fetched and checksummed like
any other data set. They are tokenized with the model's own ``tokenizer.json`` (the Hugging Face
``tokenizers`` format, read by the ``tokenizers`` package: a data file, no code runs), truncated to
``max_tokens`` and padded to the longest sequence, into a :class:`TokenDataset` whose items are
``({"input_ids", "attention_mask"}, label)``: the dict inputs that calibration and distillation
feed as keyword arguments (modelpress.inputs), the padding marked by the attention mask.

The embedding of a text is the mean of the encoder's last hidden states over its real tokens
(:func:`sentence_embedding`), as sentence encoders do; the quality of a compressed encoder is the
cosine of its embeddings to the teacher's on the held-out texts, centred on the teacher's mean
embedding (:func:`embedding_cosine`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..progress import error_line

TEXT_FILES = ("train.jsonl", "test.jsonl")
TOKENIZER_FILE = "tokenizer.json"
MAX_LINE_CHARS = 1_000_000


class TextDataError(ValueError):
    """A text data set or tokenizer is missing or malformed; the message names the file (and line)."""


def read_jsonl(path: str | os.PathLike) -> tuple[list[str], list[int] | None]:
    """(texts, labels or None) of a JSON Lines file; every line an object with a ``text`` string,
    either every line or none with an integer ``label``. Empty lines are skipped."""
    path = Path(path)
    texts: list[str] = []
    labels: list[int | None] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TextDataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise TextDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise TextDataError(f"{path}, line {number}: longer than {MAX_LINE_CHARS} characters")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TextDataError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise TextDataError(f"{path}, line {number}: expected an object with a \"text\" string")
        label = row.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
            raise TextDataError(f"{path}, line {number}: \"label\" must be a non-negative integer, got {label!r}")
        texts.append(row["text"])
        labels.append(label)
    if not texts:
        raise TextDataError(f"{path}: no texts (one JSON object with a \"text\" string per line)")
    given = [x for x in labels if x is not None]
    if given and len(given) != len(labels):
        raise TextDataError(f"{path}: {len(given)} of {len(labels)} lines have a \"label\"; give it on every line or none")
    return texts, ([int(x) for x in given] if given else None)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file, or from the one in a model folder."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TextDataError(f"{path}: no {TOKENIZER_FILE} (a text model folder carries its tokenizer as the "
                            "Hugging Face tokenizers file; save_pretrained of a fast tokenizer writes it)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("text data sets need the tokenizers package: make setup, or pip install -e '.[hf]' in the checkout") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the Rust parser raises a plain Exception
        raise TextDataError(f"{file}: not a tokenizers file ({error_line(e)})") from None


def _pad_id(tokenizer: Any) -> int:
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|endoftext|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def tokenize(tokenizer: Any, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (int64, (texts, tokens)): each text truncated to
    ``max_tokens`` tokens (special tokens included), all padded to the longest."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    encodings = tokenizer.encode_batch(list(texts))
    length = max(1, max(len(e.ids) for e in encodings))
    ids = torch.full((len(encodings), length), _pad_id(tokenizer), dtype=torch.int64)
    mask = torch.zeros((len(encodings), length), dtype=torch.int64)
    for i, e in enumerate(encodings):
        ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.int64)
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TokenDataset(Dataset):
    """Tokenized texts: ``dataset[i]`` is ``({"input_ids": ..., "attention_mask": ...}, label)``
    (label 0 when the data set has none: ``labelled`` is then False); DataLoaders stack the dicts."""

    def __init__(self, tokens: dict[str, torch.Tensor], labels: torch.Tensor, labelled: bool = True):
        n = len(labels)
        if any(len(v) != n for v in tokens.values()):
            raise ValueError("every token tensor needs one row per label")
        self.tokens, self.labels, self.labelled = tokens, labels, labelled

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.tokens.items()}, self.labels[index]


def load_text(directory: str | os.PathLike, tokenizer: Any, max_tokens: int) -> tuple[TokenDataset, TokenDataset]:
    """(train, test) token data sets from ``train.jsonl`` and ``test.jsonl`` in ``directory``."""
    out = []
    for name in TEXT_FILES:
        texts, labels = read_jsonl(Path(directory) / name)
        out.append(TokenDataset(tokenize(tokenizer, texts, max_tokens),
                                torch.tensor(labels if labels is not None else [0] * len(texts), dtype=torch.int64),
                                labelled=labels is not None))
    return out[0], out[1]


def last_hidden(out: Any) -> torch.Tensor:
    """The per-token hidden states of an encoder's output (``last_hidden_state`` of a Hugging
    Face output, or the output itself when it is a (batch, tokens, features) tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("last_hidden_state"), torch.Tensor):
        return out["last_hidden_state"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"no hidden states in a model output of type {type(out).__name__}")


def sentence_embedding(out: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the last hidden states over the real tokens: (batch, features)."""
    hidden = last_hidden(out).float()
    if hidden.dim() == 2:
        return hidden
    mask = attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def hidden_state_loss(kind: str):
    """A distillation loss on the per-token hidden states of two encoder outputs: ``cosine``
    (1 - cosine similarity per token, averaged) or ``mse``; padding positions take part (they are
    deterministic functions of the real tokens, and matching them costs nothing)."""
    if kind not in ("cosine", "mse"):
        raise ValueError(f"an encoder is distilled with cosine or mse, not {kind!r}")

    def loss(student_out, teacher_out) -> torch.Tensor:
        s, t = last_hidden(student_out).float(), last_hidden(teacher_out).float()
        if kind == "mse":
            return F.mse_loss(s, t)
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()

    return loss


@torch.no_grad()
def embeddings(model: torch.nn.Module, batches, device: torch.device | None = None) -> torch.Tensor:
    """The sentence embedding of every text, in order."""
    device = device or next(model.parameters()).device
    model.eval()
    rows = []
    for x, _ in batches:
        x = {k: v.to(device) for k, v in x.items()}
        rows.append(sentence_embedding(model(**x), x["attention_mask"]).cpu())
    return torch.cat(rows)


def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean cosine similarity (in %) of the student's embeddings to the teacher's, both centred on
    the teacher's mean embedding: what every embedding shares (mean-pooled encoders are far from
    isotropic; two unrelated texts often score above 0.9) would otherwise hide most of the error."""
    mean = teacher.float().mean(0, keepdim=True)
    return float(F.cosine_similarity(student.float() - mean, teacher.float() - mean, dim=-1).mean()) * 100
