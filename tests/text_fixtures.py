"""A text encoder and a text data set made offline, for the text pipeline's tests.

The texts are real English prose: the sentences of this repository's README and results, which
every checkout has. The encoder is a small BERT-style model with random weights (the mechanics,
not a trained model) and a WordPiece tokenizer trained on those texts, saved the way a Hugging
Face folder is (config.json, model.safetensors, tokenizer.json)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


DOCS = (ROOT / "README.md", ROOT / "bench" / "RESULTS.md")


def sentences(only: Path | None = None) -> list[str]:
    """The prose sentences of README.md and bench/RESULTS.md (no code, tables or headings), or of one of them."""
    out = []
    for doc in (only,) if only else DOCS:
        prose = [line for line in doc.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith(("|", "#", "```", "    ", "-", "$"))]
        for s in re.split(r"(?<=[.!?])\s+", " ".join(prose)):
            s = s.strip()
            if 30 <= len(s) <= 300 and "`" not in s:
                out.append(s)
    return sorted(set(out))


def write_text_dataset(folder: Path, n_train: int = 96, n_test: int = 32, seed: int = 0, labelled: bool = False) -> dict[str, str]:
    """train.jsonl and test.jsonl in ``folder``; returns their sha256 (data.files). ``labelled``:
    each line's label is the document the sentence comes from (0: README, 1: RESULTS)."""
    rows = [{"text": t, "label": label} for label, doc in enumerate(DOCS) for t in sentences(doc)]
    rows = sorted({r["text"]: r for r in rows}.values(), key=lambda r: r["text"])
    random.Random(seed).shuffle(rows)
    assert len(rows) >= n_train + n_test, f"only {len(rows)} sentences"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, part in (("train.jsonl", rows[:n_train]), ("test.jsonl", rows[n_train:n_train + n_test])):
        path = folder / name
        lines = [r if labelled else {"text": r["text"]} for r in part]
        path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
        files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def write_encoder_folder(folder: Path, hidden: int = 32, layers: int = 2, vocab: int = 400, seed: int = 0,
                         classes: int = 0) -> Path:
    """A BERT-style encoder folder: config.json + model.safetensors (random weights) + tokenizer.json
    (WordPiece, trained on :func:`sentences`); with ``classes``, a sequence classifier of that many labels."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(sentences(), tokenizers.trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.decoder = tokenizers.decoders.WordPiece()
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    folder.mkdir(parents=True, exist_ok=True)
    if classes:
        config.num_labels = classes
        transformers.BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    else:
        transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder
