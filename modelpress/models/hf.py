"""Hugging Face transformers by reference: a packed file names the model class (from an
allow-list) and carries its configuration (the ``config.json`` contents) as a JSON string; the
model is rebuilt offline from them, with random weights that the file's tensors then replace.
No download, no ``trust_remote_code``: only the allow-listed classes of the installed
``transformers`` package, never code named by a file. ``transformers`` is an optional extra
(``make setup``; elsewhere ``pip install -e '.[hf]'`` in the checkout), imported only when such a model is built."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import torch.nn as nn

HF_PREFIX = "hf:"
# Encoders whose weight matrices are nn.Linear layers, and GPT-2 (Conv1D layers: product
# quantization handles them; the other methods leave them dense).
HF_CLASSES = ("BertModel", "BertForSequenceClassification", "DistilBertModel", "DistilBertForSequenceClassification",
              "RobertaModel", "RobertaForSequenceClassification", "GPT2Model", "GPT2LMHeadModel")
MAX_CONFIG_CHARS = 65_536
# Sizes a configuration may ask for (a crafted file must not make the builder allocate gigabytes).
CONFIG_BOUNDS = {"vocab_size": 1_000_000, "hidden_size": 16_384, "num_hidden_layers": 256, "num_attention_heads": 256,
                 "intermediate_size": 65_536, "max_position_embeddings": 65_536, "type_vocab_size": 1024, "dim": 16_384,
                 "hidden_dim": 65_536, "n_layers": 256, "n_heads": 256, "num_labels": 100_000,
                 "n_embd": 16_384, "n_layer": 256, "n_head": 256, "n_positions": 65_536, "n_inner": 65_536}


def parse_config(arch: str, config: Any) -> dict:
    """The configuration of an ``hf:<Class>`` architecture, checked: an allow-listed class, a JSON
    object of at most MAX_CONFIG_CHARS characters with a ``model_type``, sizes within bounds."""
    name = arch[len(HF_PREFIX):]
    if name not in HF_CLASSES:
        raise ValueError(f"Hugging Face class {name!r} is not on the allow-list ({', '.join(HF_CLASSES)})")
    if not isinstance(config, str) or len(config) > MAX_CONFIG_CHARS:
        raise ValueError(f"{arch}: config must be the config.json contents as a string of at most {MAX_CONFIG_CHARS} characters")
    try:
        cfg = json.loads(config)
    except json.JSONDecodeError as e:
        raise ValueError(f"{arch}: config is not JSON: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ValueError(f"{arch}: config has no model_type")
    for key, most in CONFIG_BOUNDS.items():
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most):
            raise ValueError(f"{arch}: config {key}={value!r} is out of bounds [1, {most}]")
    if cfg.get("auto_map") or cfg.get("trust_remote_code"):
        raise ValueError(f"{arch}: config asks for remote code (auto_map), which is never run")
    return cfg


def build_hf(arch: str, config: Any = None) -> nn.Module:
    """The ``hf:<Class>`` model of this configuration, random weights, offline."""
    cfg = parse_config(arch, config)
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{arch} needs the transformers package: make setup, or pip install -e '.[hf]' in the checkout") from None
    model_type = cfg.pop("model_type")
    config_obj = transformers.AutoConfig.for_model(model_type, **cfg)
    model = getattr(transformers, arch[len(HF_PREFIX):])(config_obj)
    return model.eval()


def hf_arch(model: nn.Module) -> dict:
    """The architecture reference of a Hugging Face model (for arch_spec / pack_model):
    ``{"name": "hf:<Class>", "kwargs": {"config": <config.json contents>}}``."""
    name = type(model).__name__
    if name not in HF_CLASSES:
        raise ValueError(f"Hugging Face class {name!r} is not on the allow-list ({', '.join(HF_CLASSES)})")
    config = model.config.to_dict()  # type: ignore[union-attr,operator]
    for key in ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype"):
        config.pop(key, None)
    return {"name": HF_PREFIX + name, "kwargs": {"config": json.dumps(config, sort_keys=True)}}


def is_folder_ref(arch: str) -> bool:
    """``hf:<folder>`` (a path: it holds a '/'), as a pipeline's teacher.arch, against
    ``hf:<Class>``, an allow-listed class built from a configuration."""
    return arch.startswith(HF_PREFIX) and "/" in arch[len(HF_PREFIX):]


def _folder_config(folder: Path) -> tuple[str, dict]:
    """(class name, config.json contents less its bookkeeping) of a model folder, checked. Read
    and checked once per version of the file (a run asks many times)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face model folder holds config.json and model.safetensors)")
    st = config_file.stat()
    name, raw = _read_folder_config(str(config_file), st.st_size, st.st_mtime_ns)
    return name, copy.deepcopy(raw)


@functools.lru_cache(maxsize=8)
def _read_folder_config(path: str, _size: int, _mtime_ns: int) -> tuple[str, dict]:
    config_file = Path(path)
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    classes = raw.get("architectures") or []
    if len(classes) != 1:
        raise ValueError(f"{config_file}: architectures must name one class, not {classes}")
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    parse_config(HF_PREFIX + classes[0], json.dumps(raw))
    return classes[0], raw


def folder_class(path: str | Path) -> tuple[str, int]:
    """(class name, number of labels) of the model a folder holds, from its config.json."""
    name, raw = _folder_config(Path(path))
    labels = raw.get("num_labels") or len(raw.get("id2label") or {}) or 2
    return name, int(labels)


def is_classifier(name: str) -> bool:
    return name.endswith("ForSequenceClassification")


def folder_arch(path: str | Path) -> dict:
    """The architecture reference (as :func:`hf_arch` gives it) of the model a folder holds, from
    its config.json alone (no weights are read, no model is built)."""
    name, raw = _folder_config(Path(path))
    import transformers

    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw).to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype"):
        config.pop(key, None)
    return {"name": HF_PREFIX + name, "kwargs": {"config": json.dumps(config, sort_keys=True)}}


def load_hf_folder(path: str | Path) -> nn.Module:
    """A local folder with ``config.json`` and ``model.safetensors`` (what ``save_pretrained``
    writes), loaded offline: the class named by config.json's ``architectures`` (allow-listed),
    weights from safetensors (no pickle)."""
    folder = Path(path)
    weights = folder / "model.safetensors"
    name, raw = _folder_config(folder)
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (a Hugging Face model folder holds config.json and model.safetensors)")
    model = build_hf(HF_PREFIX + name, json.dumps(raw))
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ValueError(f"{weights}: does not match {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
