"""The one parameter schema: params.yaml, the CLI, the Prefect UI form and DVC all use it.

Every section forbids unknown keys, so a typo fails at once with the field's name, before
any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .data.datasets import DATASET_INFO
from .methods import METHOD_NAMES, MethodConfig
from .methods.pq.config import PQConfig

_FMNIST = DATASET_INFO["fashion-mnist"]


class RecipeError(ValueError):
    """params.yaml (or a parameter override) is invalid; the message names the field."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one
    silently, so a duplicated section would quietly lose half its settings)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_mapping(path: Path, what: str) -> dict:
    """A YAML (or JSON) file holding a mapping; RecipeError naming the file otherwise."""
    try:
        raw = load_yaml(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory, not a {what}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (a {what} is YAML or JSON)") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        raise RecipeError(f"{path}: empty {what} (no parameters); the defaults are `modelpress schema`'s")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping, got {type(raw).__name__}")
    return raw


# Mappings keyed by names of their own, which may hold dots (file names, layer names): in a
# ``section.key`` path the rest after one of them names an entry whole, not more sections. Of
# NAMED_ENTRIES (entries that are mappings) the rest is an entry and a field of it when the entry
# exists or the value is not a mapping (``method.overrides.layer1.0.conv1.k=32``).
NAMED_VALUES = ("data.files", "teacher.arch_kwargs")
NAMED_ENTRIES = ("method.overrides",)


def _override_path(raw: dict, key: str, value: Any) -> list[str]:
    for named in NAMED_VALUES + NAMED_ENTRIES:
        if not key.startswith(named + "."):
            continue
        rest = key[len(named) + 1:]
        if named in NAMED_VALUES or isinstance(value, dict):
            return [*named.split("."), rest]
        node: Any = raw
        for part in named.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        entry = next((e for e in sorted(node or {}, key=len, reverse=True) if rest.startswith(e + ".")), None)
        if entry is None and "." in rest:
            entry = rest.rsplit(".", 1)[0]
        return [*named.split("."), entry, rest[len(entry) + 1:]] if entry else [*named.split("."), rest]
    return key.split(".")


def apply_overrides(raw: dict, items: list[tuple[str, Any]]) -> dict:
    """Set ``section.key`` paths in a raw recipe mapping. Switching method
    (``method.name=prune``) starts that section afresh, since the other settings belong to the
    other method; method switches apply before other overrides. Under a mapping keyed by names
    (``data.files``, ``method.overrides``) a name keeps its dots."""
    for key, value in sorted(items, key=lambda kv: kv[0] != "method.name"):
        if key == "method.name" and (raw.get("method") or {}).get("name", "pq") != value:
            raw["method"] = {}
        node = raw
        *parents, leaf = _override_path(raw, key, value)
        for p in parents:
            if node.get(p) is None:  # absent, or left empty (arch_kwargs: null)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise RecipeError(f"override {key!r}: {p!r} is not a section")
        node[leaf] = value
    return raw


def merge_recipe(base: dict, over: dict) -> dict:
    """A partial parameter file on top of a full one: each ``section.key`` it sets replaces the
    base's (values are taken whole: a list or a mapping such as ``data.files`` is not merged);
    a ``method`` of another ``name`` replaces the whole method section (one without a ``name``
    keeps the base's method)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        if not isinstance(values, dict) or not isinstance(out.get(section), dict):
            out[section] = values
        elif section == "method" and values.get("name", out[section].get("name", "pq")) != out[section].get("name", "pq"):
            out[section] = dict(values)
        else:
            out[section].update(values)
    return out


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Fields added after runs were made: left empty (None), they are not written, so the keys of
    # work done before they existed stay. ``model_dump(context={"every_field": True})`` writes
    # them (a params.yaml for DVC, which wants every parameter dvc.yaml names).
    _later: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _leave_out_empty_later_fields(self, handler, info):
        data = handler(self)
        if isinstance(data, dict) and not (info.context or {}).get("every_field"):
            for name in self._later:
                if name in data and data[name] is None:
                    del data[name]
        return data


# Names that become file names, MLflow names or URL parts: letters, digits, '.', '_', '-'.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class RunConfig(_Section):
    name: str = Field("fmnist-cnn-pq", pattern=SAFE_NAME,
                      description="Run name, used for the MLflow run and output names (letters, digits, '.', '_', '-').")
    seed: int = Field(0, description="Seed of every random choice (shuffles, k-means, calibration images).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when present, else the CPU.")
    workdir: str = Field("data", min_length=1, description="Where every stage writes its outputs (tracked by DVC).")
    version_outputs: bool = Field(True, description="Record the outputs in dvc.lock and push them to the DVC remote "
                                                    "(off for a sweep's points: experiments, not the pipeline's state).")


class DataConfig(_Section):
    _later = ("max_tokens",)
    name: Literal["fashion-mnist", "cifar10", "text-jsonl"] = Field(
        "fashion-mnist", description="Dataset format to read: fashion-mnist (IDX files), cifar10 (npz), text-jsonl "
                                     "(train.jsonl and test.jsonl, one {\"text\": ...} per line, for a teacher.arch hf:<folder>).")
    sources: list[str] = Field(
        list(_FMNIST["sources"]), min_length=1,
        description="Where to get the files, tried in order: local directory, http(s):// base URL or s3://bucket/prefix.",
    )
    files: dict[str, str] = Field(dict(_FMNIST["files"]), min_length=1, description="File name -> expected sha256.")
    batch_size: int = Field(256, ge=1, le=65536, description="Batch size for evaluation and calibration.")
    max_tokens: int | None = Field(None, ge=2, le=65536, description="text-jsonl: tokens per text (longer texts are "
                                                                      "truncated); empty: 128.")
    test_images: int | None = Field(
        None, ge=1,
        description="Measure every top-1 of the run (teacher, steps, packed file) on the first N test images; empty: "
                    "the whole test set. For quick checks: the results and the registry say how many images they used.",
    )

    @field_validator("files")
    @classmethod
    def _sha256s(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"sha256 of {name!r} must be 64 hex digits, got {digest!r}")
        return v

    @model_validator(mode="after")
    def _files_of_the_dataset(self) -> DataConfig:
        from .data.datasets import DATASET_FILES

        missing = [f for f in DATASET_FILES[self.name] if f not in self.files]
        if missing:
            raise ValueError(f"files: {self.name} is read from {', '.join(DATASET_FILES[self.name])}; "
                             f"files does not list {', '.join(missing)}")
        return self


class TeacherConfig(_Section):
    _later = ("arch_kwargs",)
    arch: str = Field("fmnist_cnn", description="Project model (fmnist_cnn, cifar_resnet20/32/44/56, cifar_vit), "
                                                "torchvision:<name>, or hf:<folder> (a local Hugging Face model folder: "
                                                "config.json, model.safetensors, tokenizer.json; never a download).")
    arch_kwargs: dict[str, int | float | bool | str | None] | None = Field(
        None, description="Keyword arguments of the architecture's builder besides num_classes and in_channels, e.g. "
                          "{image_size: 32} for torchvision:vit_b_16, {width_mult: 0.5} for torchvision:mobilenet_v2, "
                          "{num_layers: 6, hidden_dim: 128, mlp_dim: 256} for cifar_vit; recorded in the packed file.")
    weights: str | None = Field(
        None, description="Weights: a checkpoint path (loaded with weights_only=True) or an MLflow models:/ or runs:/ URI. Empty: train one."
    )
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$",
                                       description="Expected sha256 of the weights file, checked before loading.")
    epochs: float = Field(3.0, gt=0, le=1000, description="Training epochs when no weights are given.")
    lr: float = Field(0.05, gt=0, description="Peak learning rate (SGD + Nesterov, cosine schedule).")
    batch_size: int = Field(128, ge=1, le=65536)
    weight_decay: float = Field(5e-4, ge=0)
    snapshots: list[float] = Field(
        [], description="When training: keep the weights at these fractions of the schedule (0 = the initial "
                        "weights). Pruning with retrain=weight_rewind rewinds to the one at 1 - rewind_fraction.",
    )

    @model_validator(mode="after")
    def _sha_needs_weights(self) -> TeacherConfig:
        from .models.hf import is_folder_ref

        if is_folder_ref(self.arch) and self.weights:
            raise ValueError(f"weights must be empty for {self.arch}: a Hugging Face model folder carries its weights")
        if self.arch_kwargs:
            from .models import check_kwargs

            if is_folder_ref(self.arch):
                raise ValueError(f"arch_kwargs must be empty for {self.arch}: the folder's config.json sets the architecture")
            if {"num_classes", "in_channels"} & set(self.arch_kwargs):
                raise ValueError("arch_kwargs: num_classes and in_channels come from the data set")
            check_kwargs(self.arch, self.arch_kwargs)
        if self.weights_sha256 and not self.weights:
            raise ValueError("weights_sha256 is given but weights is empty (the teacher would be trained, not checked)")
        return self

    @field_validator("snapshots")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        for f in v:
            if not 0 <= f < 1:
                raise ValueError(f"snapshot {f} must be in [0, 1)")
        return sorted(set(v))

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from .models import is_known

        if not is_known(v):
            from .models import known_models

            raise ValueError(f"unknown model {v!r}; known: {', '.join(known_models())}")
        return v


class DistillFrom(_Section):
    arch: str = Field(..., description="Architecture of the model to distil from (as teacher.arch).")
    weights: str = Field(..., description="Its weights: a local checkpoint (loaded with weights_only=True) or packed file.")
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$",
                                       description="Expected sha256 of the weights file, checked before loading.")


class FinetuneConfig(_Section):
    _later = ("loss",)
    epochs: float = Field(1.0, ge=0, le=1000, description="Distillation epochs over all codebooks together (0 skips).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW, cosine schedule).")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature.")
    augment: bool = Field(False, description="Distil on randomly flipped and shifted images (CIFAR-style augmentation).")
    loss: Literal["kl", "mse", "cosine"] | None = Field(
        None, description="Distillation loss: kl on logits, mse or cosine on an encoder's hidden states; empty: kl, "
                          "or cosine for a text encoder (data.name text-jsonl).")
    batch_size: int = Field(128, ge=1, le=65536)
    train_other: bool = Field(True, description="Also tune biases, BatchNorm scales and the weights of layers left dense (e.g. a first conv kept fp16), not only codebooks.")
    bn_batches: int = Field(100, ge=0, description="Batches used to re-estimate BatchNorm statistics (0 skips).")
    distill_from: DistillFrom | None = Field(
        None, description="Distil from another, e.g. larger, model trained on the same data (same classes and input) "
                          "instead of the teacher being compressed. Only this final fine-tuning uses it.")


class PackConfig(_Section):
    float_dtype: Literal["f16", "f32"] = Field("f16", description="Storage of every tensor that is not quantized.")
    codebook_dtype: Literal["f16", "f32", "i8", "i6", "i5", "i4", "g8", "g6", "g5", "g4"] = Field(
        "f16", description="Storage of PQ codebooks: iB = B-bit integers with one f16 scale per sub-vector position "
                           "(i8: half the bytes of f16; a byte budget then buys more centroids); gB = the same with "
                           "one scale per position and group of 16 centroids (outlier centroids, as transformers have, "
                           "coarsen only their group).")


class RegistryConfig(_Section):
    enabled: bool = Field(True, description="Register the packed model in the MLflow model registry.")
    model_name: str | None = Field(None, pattern=SAFE_NAME,
                                   description="Registered model name (letters, digits, '.', '_', '-'); default '<teacher arch>-<method>'.")
    experiment: str = Field("modelpress", pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._/-]{0,199}$",
                            description="MLflow experiment of the run (letters, digits, ' ._/-'; no '..').")
    max_top1_drop: float = Field(
        1.0, ge=0, description="Promotion rule: 'champion' goes to the smallest version losing at most this many top-1 points "
                    "(against the best teacher among the versions it is compared with)."
    )

    @field_validator("experiment")
    @classmethod
    def _no_parent(cls, v: str) -> str:
        if ".." in v:
            raise ValueError(f"must not contain '..' (got {v!r})")
        return v


def _method_schema(schema: dict) -> None:
    """JSON Schema of ``method``: besides the discriminated ``oneOf`` (a choice in the Prefect UI
    form), one ``if name == X then <X's schema>`` per method, so that a JSON Schema validator
    (the Prefect API's) reports a bad field inside the chosen method by its name instead of
    "not valid under any of the given schemas"."""
    method = schema.get("properties", {}).get("method", {})
    mapping = method.get("discriminator", {}).get("mapping", {})
    method["allOf"] = [{"if": {"properties": {"name": {"const": name}}, "required": ["name"]}, "then": {"$ref": ref}}
                       for name, ref in mapping.items()]


class Recipe(_Section):
    """Everything a compression run depends on."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_method_schema)

    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    method: MethodConfig = Field(PQConfig(), description=f"Compression method by 'name': {', '.join(METHOD_NAMES)}.")
    finetune: FinetuneConfig = FinetuneConfig()
    pack: PackConfig = PackConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_defaults_to_pq(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {**data["method"], "name": "pq"}}
        return data

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None, base: str | Path | None = None) -> "Recipe":
        """Read params.yaml; ``overrides`` are ``section.key=value`` strings (YAML values). With
        ``base`` (another parameter file, e.g. the checkout's params.yaml), ``path`` may be
        partial: what it sets is merged onto ``base`` (``merge_recipe``)."""
        path = Path(path)
        raw = read_mapping(path, "parameter file")
        if base is not None and Path(base).is_file() and Path(base).resolve() != path.resolve():
            raw = merge_recipe(read_mapping(Path(base), "parameter file"), raw)
        items = []
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise RecipeError(f"override {item!r} must look like section.key=value")
            if not all(part.strip() for part in key.split(".")):
                raise RecipeError(f"override {item!r}: the key {key!r} has an empty part (section.key=value)")
            try:
                items.append((key, load_yaml(value)))
            except yaml.YAMLError as e:
                raise RecipeError(f"override {item!r}: the value is not valid YAML: {' '.join(str(e).split())}") from None
        return cls.parse(apply_overrides(raw, items), source=str(path))

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> Recipe:
        """A copy with ``section.key: value`` overrides applied (validated like params.yaml)."""
        return self.parse(apply_overrides(self.model_dump(mode="json"), list(overrides.items())), source)

    @classmethod
    def parse(cls, raw: dict[str, Any], source: str = "parameters") -> "Recipe":
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            loc = list(err["loc"])
            if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in METHOD_NAMES:
                del loc[1]  # pydantic names the union member; the user's path has no such level
            where = ".".join(str(x) for x in loc) or "(top level)"
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            more = f" [+{e.error_count() - 1} more]" if e.error_count() > 1 else ""
            raise RecipeError(f"{source}: {where}: {err['msg']}{got}{more}") from None

    def section_hash(self, *sections: str, extra: Any = None) -> str:
        """Stable hash of some sections (and extra inputs): the cache key of a stage."""
        blob = json.dumps([self.model_dump(include=set(sections), mode="json"), extra], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @model_validator(mode="after")
    def _text_needs_an_encoder_folder(self) -> Recipe:
        from .models.hf import is_folder_ref

        if self.data.name == "text-jsonl" and not is_folder_ref(self.teacher.arch):
            raise ValueError(f"data.name text-jsonl needs teacher.arch hf:<folder> (a local model folder with its "
                             f"tokenizer.json), not {self.teacher.arch}")
        if is_folder_ref(self.teacher.arch) and self.data.name != "text-jsonl":
            raise ValueError(f"teacher.arch {self.teacher.arch} is a text encoder: it needs data.name text-jsonl")
        return self

    def registered_name(self) -> str:
        return self.registry.model_name or f"{self.arch_slug()}-{self.method.name}"

    def arch_slug(self) -> str:
        """The teacher's architecture as the start of a registered name (letters, digits, '.', '_', '-')."""
        from .models.hf import is_folder_ref

        safe = lambda text: "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "-" for c in text)  # noqa: E731
        if is_folder_ref(self.teacher.arch):
            return "hf-" + safe(Path(self.teacher.arch[3:]).resolve().name)[:60]
        return safe(self.teacher.arch.replace("torchvision:", "tv-").replace("_", "-"))
