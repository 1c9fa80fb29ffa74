"""The contract every compression method fulfils, and the one loop iterative methods share.

A method is a subpackage that exposes ``METHOD = Method(...)``, plus one line in
``modelpress/methods/__init__.py``'s registry. The pipeline (``modelpress.stages``) knows
methods only through this contract:

- ``config``: the pydantic settings (its ``name`` literal is the method's name in params.yaml);
- ``check(model, cfg, ctx)``: refuse settings the architecture cannot take, in seconds, before
  any data is fetched or teacher trained (ValueError naming the problem);
- ``plan(model, cfg, ctx) -> (cfg, rows)``: settings resolved from the teacher and data before
  the work (PQ's byte budget allocation) and a table describing them; the pipeline keeps the
  result, so a resumed run reuses it;
- ``calibration(cfg) -> (images, seed) | None``: how many in-domain inputs ``apply`` needs;
- ``apply(model, cfg, ctx) -> stats``: compress ``model`` in place, per-layer statistics;
- ``steps``: for iterative methods (pruning cycles), one step at a time, so that the pipeline
  checkpoints after each and a killed run resumes at the step it was in;
- ``trainable(model, cfg)`` / ``held_zero(model, cfg)``: what the shared fine-tuning trains
  besides biases and BatchNorm, and which weights it must hold at zero;
- ``defaults(cfg, schedule)``: settings left empty filled from the teacher's training schedule
  (``epochs``, ``lr``, ``weight_decay``, ``batch_size``); ``rewind_point(cfg)``: the fraction
  of the teacher's training whose weights the method needs (``ctx.rewind_state``), if any;
- ``layers``: the module types it puts in the model (each registers its packed-file codec).

``Context`` carries what methods need; each reads what it uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from pydantic import BaseModel
from torch.utils.data import DataLoader

from ..inputs import Inputs

SizeFn = Callable[[nn.Module], int]
LayerCallback = Callable[[str, nn.Module, dict], None]


@dataclass
class Context:
    """What the pipeline (or a notebook) hands a method."""

    calibration: Inputs | None = None  # in-domain inputs, no labels (PQ's activation statistics): see modelpress.inputs
    train_batches: DataLoader | None = None  # (input, label) batches: fine-tuning, retraining
    teacher: nn.Module | None = None  # the dense model (distillation)
    on_layer: LayerCallback | None = None  # called after each layer (the pipeline checkpoints there)
    device: torch.device | None = None
    float_dtype: str = "f16"  # how the packed file stores tensors that are not compressed
    codebook_dtype: str = "f16"  # how it stores codebooks (f16, f32, i8, i6, i5, i4)
    size_fn: SizeFn | None = None  # bytes of the packed file a model would make
    rewind_state: dict[str, torch.Tensor] | None = None  # weights of the original training to rewind to
    snapshots: list[float] | None = None  # fractions of the teacher's training kept (None: teacher not trained here)
    cache: Callable[[str, Any, Callable[[], Any]], Any] | None = None  # cache(name, key, compute): results reused across runs
    previous: dict | None = None  # the record of the step before this one (its "state" carries a method's own state)
    arch: dict | None = None  # the packed file's architecture and metadata (exact sizes of what is not compressed)
    meta: dict | None = None
    loss: Any = "kl"  # what a method's own distillation minimises: a distill_loss kind, or a function (student out, teacher out)

    @classmethod
    def of(cls, **data: Any) -> Context:
        """A context from keyword arguments; a name that is not a field is refused (a misspelt
        ``calibraton=`` fails instead of vanishing)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown argument(s) {', '.join(unknown)}; a method takes {', '.join(sorted(known))}")
        return cls(**data)


def _nothing(*_args: Any) -> None:
    return None


def _unchanged(_model: nn.Module, cfg: BaseModel, _ctx: Context) -> tuple[BaseModel, list[dict]]:
    return cfg, []


def _no_params(_model: nn.Module, _cfg: BaseModel) -> list[nn.Parameter]:
    return []


def _no_masks(_model: nn.Module, _cfg: BaseModel) -> dict[str, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class Steps:
    """An iterative method, one checkpointed step at a time.

    ``identity(cfg, index, ctx)``: what step ``index`` depends on besides the teacher (steps of
    an earlier run with the same identities are reused); None when the plan has no such step.
    ``count(cfg)``: the number of steps when known in advance, else None.
    ``run(model, cfg, index, ctx)``: do step ``index`` in place; returns its record, with
    ``done`` (no further step), or None when the goal was met before it. A record's ``state``
    (JSON, e.g. which weights are fixed) is kept in the step's checkpoint and handed to the next
    step as ``ctx.previous["state"]``; it is left out of logs and tables.
    A record's ``tensors`` (name -> tensor, e.g. LC's multipliers) are kept exactly (f32) beside
    the step's checkpoint and handed to the next step as ``ctx.previous["tensors"]``.
    ``view(model, cfg, record)``: the model the step stands for, whose top-1 and packed bytes the
    step reports (default: the model itself; LC: Delta(theta), not the weights it trains).
    ``prepare(model, cfg, ctx)``: checks on the starting model before step 0.
    ``finish(model, cfg, ctx) -> stats``: after the last step (e.g. quantize the survivors).
    ``done(cfg, index, record)``: whether a reused step (whose identity leaves out what decides
    the end, e.g. LC's step count and tolerance) ends the plan of ``cfg`` (default: it is step
    ``count(cfg)`` - 1).
    """

    identity: Callable[[BaseModel, int, Context], Any]
    count: Callable[[BaseModel], int | None]  # how many steps, when known in advance (None: until the goal is met)
    run: Callable[[nn.Module, BaseModel, int, Context], dict | None]
    prepare: Callable[[nn.Module, BaseModel, Context], None] = _nothing
    finish: Callable[[nn.Module, BaseModel, Context], list[dict]] = lambda _m, _c, _x: []
    batch_size: Callable[[BaseModel], int] | None = None  # the steps' own batch size (None: the pipeline's)
    label: str = "step"  # what a step is called (task names: <label>-<n>)
    view: Callable[[nn.Module, BaseModel, dict], nn.Module] | None = None  # the model a step's figures are of
    done: Callable[[BaseModel, int, dict], bool] | None = None  # a reused step: the last of this plan?


@dataclass(frozen=True)
class Method:
    name: str
    config: type[BaseModel]
    summary: str
    apply: Callable[[nn.Module, BaseModel, Context], list[dict]] | None = None
    check: Callable[[nn.Module, BaseModel, Context], None] = _nothing
    plan: Callable[[nn.Module, BaseModel, Context], tuple[BaseModel, list[dict]]] = _unchanged
    calibration: Callable[[BaseModel], tuple[int, int] | None] = lambda _cfg: None
    steps: Steps | None = None
    trainable: Callable[[nn.Module, BaseModel], list[nn.Parameter]] = _no_params
    held_zero: Callable[[nn.Module, BaseModel], dict[str, torch.Tensor]] = _no_masks
    defaults: Callable[[BaseModel, dict[str, Any]], BaseModel] = lambda cfg, _schedule: cfg
    rewind_point: Callable[[BaseModel], float | None] = lambda _cfg: None
    layers: tuple[type[nn.Module], ...] = field(default=())

    def __post_init__(self) -> None:
        if (self.apply is None) == (self.steps is None):
            raise TypeError(f"method {self.name}: give either apply or steps")

    def run(self, model: nn.Module, cfg: BaseModel, ctx: Context) -> list[dict]:
        """Compress ``model`` in place: ``apply``, or every step then ``finish``. Returns the
        per-layer statistics, or for a method with nothing to finish (pruning) its steps' records."""
        cfg, _ = self.plan(model, cfg, ctx)
        if self.apply is not None:
            return self.apply(model, cfg, ctx)
        assert self.steps is not None  # __post_init__: one of the two
        records = run_steps(self.steps, model, cfg, ctx)
        return self.steps.finish(model, cfg, ctx) or records


StepCallback = Callable[[int, nn.Module, dict], None]


def until_done(step: Callable[[int], dict | None], start: int = 0) -> list[dict]:
    """The one loop of iterative methods: ``step(index)`` for index = start, start + 1, ...
    until a step reports ``done`` (or returns None: no further step was needed). The library
    (``run_steps``), the DVC stage and the Prefect flow (one task per step) all loop with it."""
    records, index = [], start
    while (record := step(index)) is not None:
        records.append(record)
        if record["done"]:
            break
        index += 1
    return records


def run_steps(steps: Steps, model: nn.Module, cfg: BaseModel, ctx: Context, start: int = 0,
              on_step: StepCallback | None = None) -> list[dict]:
    """The loop of an iterative method: steps ``start``, ``start + 1``, ... until one reports
    ``done`` (or none is needed). ``on_step(index, model, record)`` after each (checkpoint)."""
    if start == 0:
        steps.prepare(model, cfg, ctx)

    def one(index: int) -> dict | None:
        record = steps.run(model, cfg, index, ctx)
        if record is not None:
            ctx.previous = record
            if on_step:
                on_step(index, model, record)
        return record

    return until_done(one, start)


def batch_size_of_teacher(cfg: BaseModel, schedule: dict[str, Any]) -> BaseModel:
    """``Method.defaults`` of a method whose only schedule setting is ``batch_size``: left empty,
    it is the teacher's."""
    if getattr(cfg, "batch_size", None) is None and schedule.get("batch_size"):
        return cfg.model_copy(update={"batch_size": schedule["batch_size"]})
    return cfg


def codebooks(model: nn.Module, _cfg: BaseModel | None = None) -> list[nn.Parameter]:
    """Every trainable codebook in the model (the layers that have one)."""
    return [p for m in model.modules() if isinstance(p := getattr(m, "codebook", None), nn.Parameter)]
