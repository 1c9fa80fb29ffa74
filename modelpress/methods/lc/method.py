"""The LC algorithm as a method of the pipeline (the contract: modelpress/methods/base.py).

Compression as a constrained problem, min L(w) subject to w = Delta(theta), solved by an
augmented Lagrangian with a penalty mu that grows (mu_j = mu0 * growth^(j-1)):

- step 0, direct compression: theta = C(w) of the teacher's weights, lambda = 0;
- step j >= 1: the **L step** trains w on L(w) + mu/2 ||w - Delta(theta) - lambda/mu||^2 (the
  shared training loop on the task loss, distillation from the teacher by default, each step
  followed by the penalty's proximal step); the **C step** sets
  theta = argmin ||w - lambda/mu - Delta(theta)||^2 per task (cstep.py); then
  lambda <- lambda - mu (w - Delta(theta)).

Each step is one checkpointed step of the pipeline. The model checkpointed is w; lambda and
Delta(theta) (for a low-rank layer: its two factors) travel to the next step in the record's
``tensors`` (stored exactly beside the checkpoint), the warm start of the codebooks in its
``state``. The step's top-1 and bytes are those of Delta(theta) (``view``). ``finish`` makes the
model Delta(theta): a quantized layer becomes a PQLayer with a k x 1 codebook (codes range coded
in the file), a per-channel binary or ternary one a UniformLayer (an affine entry), a pruned one
keeps its zeros (a sparse entry), a low-rank one a LowRankLayer.

Additive combinations (Carreira-Perpinan & Idelbayev; the LC toolkit): a layer in several tasks,
each ``additive``, has Delta(theta) = the sum of their schemes' outputs (a quantized weight plus a
sparse correction, ...). The C step fits the parts by alternation (``c_step``); the record keeps
the sum as the layer's ``delta.<layer>`` and each part as ``part<i>.*``; ``finish`` makes the
layer an AdditiveLayer of the parts, one entry each in the file (``<layer>.weight``, ``+1``, ...).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import inputs as model_inputs
from ...flops import output_positions
from ...pack.codebook import FLOAT_DTYPES, float_nbytes, is_int_codebook
from ...progress import log
from ...train import as_loss, fit, reseed
from ...walk import check_patterns, matches, named_layers, set_module
from ..base import Context, Method, Steps, batch_size_of_teacher, codebooks, run_steps
from ..pq import PQLayer
from ..uniform.layer import UniformLayer
from .additive import AdditiveLayer, WeightPart
from .config import LCConfig, LCTask
from .cstep import (
    binarize,
    binarize_rows,
    keep_largest,
    kmeans_1d,
    l1_threshold,
    low_rank,
    select_rank,
    soft_threshold,
    ternarize,
    ternarize_rows,
)
from .lowrank import LowRankLayer

QUANTIZERS = ("quantize", "binary", "ternary")


# ---- which layer belongs to which task -----------------------------------------------------

def assignments(model: nn.Module, cfg: LCConfig) -> list[list[tuple[str, nn.Conv2d | nn.Linear]]]:
    """The layers of each task, in model order. A layer may be in several tasks only if each of
    them is additive (its Delta(theta) is then the sum of theirs). Raises ValueError for a
    pattern matching no layer, a layer claimed by two tasks not both additive, or a layer the
    task's scheme cannot take."""
    layers = [(n, m) for n, m in named_layers(model) if isinstance(m.weight, nn.Parameter)]
    owners: dict[str, list[int]] = {}
    out: list[list[tuple[str, Any]]] = []
    for i, task in enumerate(cfg.tasks):
        check_patterns(model, task.layers, f"lc: task {i + 1} ({task.scheme}): layers")
        mine = [(n, m) for n, m in layers if matches(n, task.layers)]
        for n, m in mine:
            for j in owners.get(n, []):
                if not (task.additive and cfg.tasks[j].additive):
                    raise ValueError(f"lc: {n} is claimed by task {j + 1} ({cfg.tasks[j].scheme}) and task {i + 1} "
                                     f"({task.scheme}); give each layer to one task, or set additive: true on both tasks "
                                     f"to sum them")
            owners.setdefault(n, []).append(i)
            if isinstance(m, nn.Conv2d) and m.groups != 1 and task.scheme == "lowrank":
                raise ValueError(f"lc: {n} is a grouped convolution (groups={m.groups}); scheme {task.scheme} does not "
                                 f"support it: leave it out of the task's layers or prune it")
            if task.scheme == "lowrank" and task.rank is not None:
                full = min(m.weight.shape[0], m.weight[0].numel())
                if task.rank >= full:
                    raise ValueError(f"lc: rank {task.rank} for {n} is not below its full rank {full} "
                                     f"({tuple(m.weight.shape)} as {m.weight.shape[0]} x {m.weight[0].numel()})")
        out.append(mine)
    return out


def owners_of(groups: list[list[tuple[str, Any]]]) -> dict[str, list[int]]:
    """{layer: the indices of the tasks it is in}, in model order; several: an additive layer."""
    owners: dict[str, list[int]] = {}
    for i, layers in enumerate(groups):
        for n, _ in layers:
            owners.setdefault(n, []).append(i)
    return owners


def _per_layer_codebooks(cfg: LCConfig) -> bool:
    """Whether a task learns a codebook per layer (a quantizer without ``per_channel``): its values
    must be stored as floats, as an integer codebook would move them."""
    return any(t.scheme in QUANTIZERS and not t.per_channel for t in cfg.tasks)


def check(model: nn.Module, cfg: LCConfig, ctx: Context) -> None:
    """Fails in seconds, before any data or teacher: patterns, overlaps, ranks, storage."""
    assignments(model, cfg)
    if is_int_codebook(ctx.codebook_dtype) and _per_layer_codebooks(cfg):
        raise ValueError(f"lc: pack.codebook_dtype {ctx.codebook_dtype} would move the learned values (integer codebooks "
                         f"are scaled per layer); use f16 or f32")


# ---- the C step ----------------------------------------------------------------------------

ADDITIVE_ROUNDS = 10  # rounds of the alternation over the parts of additive layers (fewer once it stops decreasing)


def _cost_per_rank(name: str, shape: torch.Size, task: LCTask, positions: dict[str, int], float_dtype: str) -> float:
    out, rest = shape[0], math.prod(shape[1:])
    if task.cost == "flops":
        return 2.0 * (out + rest) * positions.get(name, 1)
    return float(float_nbytes(out + rest, float_dtype))


class TaskTheta(NamedTuple):
    """One task's C step: ``tensors`` ``delta.<layer>`` = Delta(theta) (``u.<layer>`` and
    ``v.<layer>`` for a low-rank layer), and per layer its adaptive codebook or its rank."""

    tensors: dict[str, torch.Tensor]
    codebooks: dict[str, list[float]]
    ranks: dict[str, int]


def task_c_step(index: int, task: LCTask, targets: dict[str, torch.Tensor], mu: float, inits: dict[str, list[float]],
                l1_radius: dict[str, float], positions: dict[str, int], float_dtype: str) -> TaskTheta:
    """theta = argmin ||target - Delta(theta)||^2 of task ``index`` over its layers' ``targets``
    together (a network-wide l0 keep or l1 bound spans them all). ``inits``: {layer: codebook}
    warm starts of adaptive quantization; ``l1_radius``: {task and layers: bound}, set here the
    first time (a share of the targets' l1 norm), the same afterwards."""
    tensors: dict[str, torch.Tensor] = {}
    codebooks: dict[str, list[float]] = {}
    ranks: dict[str, int] = {}
    if task.scheme in QUANTIZERS:
        for n, v in targets.items():
            if task.per_channel:  # Delta(theta) row by row: +-scale (binary), -scale/0/+scale (ternary)
                scale, codes = binarize_rows(v) if task.scheme == "binary" else ternarize_rows(v, task.nonzero)
                signs = codes * 2 - 1 if task.scheme == "binary" else codes - 1
                tensors[f"delta.{n}"] = (scale[:, None] * signs).reshape(v.shape)
                continue
            if task.scheme == "binary":
                c, codes = binarize(v)
            elif task.scheme == "ternary":
                c, codes = ternarize(v, task.nonzero)
            else:
                init = inits.get(n)
                c, codes = kmeans_1d(v, task.k, None if init is None else torch.tensor(init, dtype=torch.float64))
                codebooks[n] = [float(x) for x in c]
            tensors[f"delta.{n}"] = c[codes].reshape(v.shape)
    elif task.scheme == "prune":
        names = list(targets)
        for part in ([[n] for n in names] if task.per_layer else [names]):
            vs = [targets[n] for n in part]
            if task.norm == "l0":
                kappa = int(round(task.keep * sum(x.numel() for x in vs)))
                for n, mask in zip(part, keep_largest(vs, kappa)):
                    tensors[f"delta.{n}"] = targets[n] * mask
            else:
                key = f"{index}:{','.join(part)}"
                radius = l1_radius.setdefault(key, task.l1_fraction * float(sum(x.abs().sum() for x in vs)))
                tau = l1_threshold(vs, radius)
                for n in part:
                    tensors[f"delta.{n}"] = soft_threshold(targets[n], tau)
    else:  # lowrank
        for n, v in targets.items():
            rank = task.rank
            if rank is None:
                assert task.alpha is not None
                rank = select_rank(v, mu, task.alpha, _cost_per_rank(n, v.shape, task, positions, float_dtype))
            ranks[n] = rank
            if rank == 0:  # no rank pays for itself: the target stays as it is
                tensors[f"delta.{n}"] = v.clone()
                continue
            tensors[f"u.{n}"], tensors[f"v.{n}"] = low_rank(v, rank)
    return TaskTheta(tensors, codebooks, ranks)


@torch.no_grad()
def c_step(weights: dict[str, torch.Tensor], lambdas: dict[str, torch.Tensor], mu: float, cfg: LCConfig,
           groups: list[list[tuple[str, Any]]], state: dict, positions: dict[str, int], float_dtype: str,
           previous: dict[str, torch.Tensor] | None = None, rounds: int = ADDITIVE_ROUNDS) -> tuple[dict, dict]:
    """theta = argmin ||w - lambda/mu - Delta(theta)||^2 for every task. Returns (tensors, state):
    ``delta.<layer>`` = Delta(theta) (``u.<layer>``/``v.<layer>`` for a low-rank layer) and the new
    JSON state (codebooks as warm start, ranks, l1 radii).

    A layer in several (additive) tasks has Delta(theta) = sum_i Delta_i(theta_i), fitted by
    alternation (block coordinate descent, as the LC toolkit): starting from the ``previous``
    step's parts (else zeros), each round runs each of those tasks' C step on its residual
    targets v - sum_{j != i} Delta_j, for ``rounds`` rounds or until the objective stops
    decreasing (a round after the first that would increase it is undone; the first is kept, the
    previous step's parts having been fitted to another v). Its ``delta.<layer>`` is then the sum,
    and each part is kept too: ``part<i>.delta.<layer>`` (or ``part<i>.u/v.<layer>``), i the
    task's index, its codebook or rank in the state as ``part<i>.<layer>``."""
    v = {n: (weights[n].double() - lambdas[n].double() / mu).float() if n in lambdas else weights[n].float()
         for layers in groups for n, _ in layers}
    owners = owners_of(groups)
    shared = {n for n, tasks in owners.items() if len(tasks) > 1}
    radii: dict[str, float] = dict(state.get("l1_radius", {}))
    saved: dict[str, list[float]] = state.get("codebooks", {})

    def key(i: int, n: str) -> str:
        return f"part{i}.{n}" if n in shared else n

    def run(i: int, targets: dict[str, torch.Tensor], last: TaskTheta | None) -> TaskTheta:
        inits = {n: c for n in targets if (c := last.codebooks.get(n) if last else saved.get(key(i, n))) is not None}
        return task_c_step(i, cfg.tasks[i], targets, mu, inits, radii, positions, float_dtype)

    coupled = [i for i, layers in enumerate(groups) if any(n in shared for n, _ in layers)]
    thetas = {i: run(i, {n: v[n] for n, _ in layers}, None) for i, layers in enumerate(groups) if i not in coupled}
    if coupled:
        thetas |= _alternate(v, groups, owners, coupled, run, previous or {}, rounds)
    tensors: dict[str, torch.Tensor] = {}
    new_state: dict[str, Any] = {"codebooks": {}, "ranks": {}, "l1_radius": radii}
    for i, theta in thetas.items():
        for name, t in theta.tensors.items():
            tensors[f"part{i}.{name}" if name.partition(".")[2] in shared else name] = t
        new_state["codebooks"].update({key(i, n): c for n, c in theta.codebooks.items()})
        new_state["ranks"].update({key(i, n): r for n, r in theta.ranks.items()})
    for n, tasks in owners.items():
        if len(tasks) > 1:
            parts = [delta_of(n, tensors, v[n].shape, f"part{i}.") for i in tasks]
            tensors[f"delta.{n}"] = sum(parts[1:], parts[0])  # in order, as AdditiveLayer adds its parts
    return tensors, new_state


def _alternate(v: dict[str, torch.Tensor], groups: list[list[tuple[str, Any]]], owners: dict[str, list[int]],
               coupled: list[int], run: Callable[[int, dict[str, torch.Tensor], TaskTheta | None], TaskTheta],
               previous: dict[str, torch.Tensor], rounds: int) -> dict[int, TaskTheta]:
    """The C steps of the tasks with additive layers (``coupled``), by block coordinate descent
    on the sum over their layers of ||v - the sum of the layer's parts||^2 (see c_step)."""
    layers = [n for n, tasks in owners.items() if any(i in coupled for i in tasks)]  # in model order: a fixed sum

    def start(i: int, n: str) -> torch.Tensor:
        prefix = f"part{i}."
        found = f"{prefix}delta.{n}" in previous or f"{prefix}u.{n}" in previous
        return delta_of(n, previous, v[n].shape, prefix).float() if found else torch.zeros_like(v[n])

    parts = {i: {n: start(i, n) for n, _ in groups[i]} for i in coupled}

    def objective() -> float:
        return sum(float((v[n].double() - sum(parts[j][n].double() for j in owners[n])).square().sum()) for n in layers)

    thetas: dict[int, TaskTheta] = {}
    best = objective()
    for r in range(rounds):
        before = (dict(thetas), dict(parts))
        for i in coupled:
            targets = {n: (v[n].double() - sum(parts[j][n].double() for j in owners[n] if j != i)).float()
                       for n, _ in groups[i]}
            thetas[i] = run(i, targets, thetas.get(i))
            parts[i] = {n: delta_of(n, thetas[i].tensors, v[n].shape) for n in targets}
        value = objective()
        if value > best and r > 0:  # (rank selection trades the error for fewer ranks)
            thetas, parts = before
            break
        done = best - value <= 1e-6 * best
        best = value
        if done:
            break
    return thetas


def delta_of(name: str, tensors: dict[str, torch.Tensor], shape: torch.Size, prefix: str = "") -> torch.Tensor:
    """Delta(theta) of a layer from a step's tensors (``prefix`` "part<i>.": of one of its parts)."""
    if f"{prefix}delta.{name}" in tensors:
        return tensors[f"{prefix}delta.{name}"]
    return (tensors[f"{prefix}u.{name}"] @ tensors[f"{prefix}v.{name}"]).reshape(shape)


# ---- the steps -----------------------------------------------------------------------------

def identity(cfg: LCConfig, index: int, _ctx: Context) -> list | None:
    """Step ``index`` depends on the settings and on mu up to it: a run with more steps reuses
    the steps it shares with a shorter one."""
    if index > cfg.lc_steps:
        return None
    return [cfg.model_dump(mode="json", exclude={"lc_steps", "tolerance"}), index]


def count(cfg: LCConfig) -> int:
    return cfg.lc_steps + 1


def is_last(cfg: LCConfig, index: int, relative_distance: float) -> bool:
    """The last step: the plan's last, or one after the first whose ||w - Delta(theta)|| / ||w|| is
    under the tolerance."""
    return index == cfg.lc_steps or (index > 0 and relative_distance < cfg.tolerance)


def prepare(model: nn.Module, cfg: LCConfig, ctx: Context) -> None:
    check(model, cfg, ctx)


def _example(ctx: Context) -> torch.Tensor | None:
    if ctx.calibration is not None:
        return ctx.calibration[:1]
    if ctx.train_batches is not None:
        return next(iter(ctx.train_batches))[0][:1]
    return None


def _positions(model: nn.Module, cfg: LCConfig, ctx: Context, state: dict) -> dict[str, int]:
    if "positions" in state:
        return state["positions"]
    if not any(t.scheme == "lowrank" and t.alpha is not None and t.cost == "flops" for t in cfg.tasks):
        return {}
    example = _example(ctx)
    if example is None:
        raise ValueError("lc: rank selection by FLOPs needs an example input (train_batches=... or calibration=...)")
    return output_positions(model, example)


def _distance(model: nn.Module, groups, tensors) -> tuple[float, float]:
    num = den = 0.0
    for layers in groups:
        for n, m in layers:
            w = m.weight.detach().cpu()
            num += float((w - delta_of(n, tensors, w.shape)).double().square().sum())
            den += float(w.double().square().sum())
    return math.sqrt(num), math.sqrt(num / den) if den else 0.0


def penalty(pairs: list[tuple[torch.Tensor, torch.Tensor]], mu: float) -> torch.Tensor:
    """mu/2 * sum ||w - target||^2 over (w, target) pairs, target = Delta(theta) + lambda/mu: its
    gradient in w is mu (w - Delta(theta)) - lambda."""
    return mu / 2 * torch.stack([(w - t).square().sum() for w, t in pairs]).sum()


@torch.no_grad()
def proximal(pairs: list[tuple[torch.Tensor, torch.Tensor]], mu: float, lr: float) -> None:
    """The proximal step of the penalty with step size ``lr``, in place: w <- argmin_z
    mu/2 ||z - target||^2 + 1/(2 lr) ||z - w||^2 = (w + lr mu target) / (1 + lr mu). To first
    order in lr it is the gradient step w - lr (mu (w - Delta(theta)) - lambda), but it stays stable
    however large mu grows (a gradient step diverges once lr mu > 2)."""
    a = lr * mu
    for w, t in pairs:
        w.add_(t, alpha=a).div_(1 + a)


def l_step(model: nn.Module, cfg: LCConfig, index: int, mu: float, targets: dict[str, torch.Tensor],
           ctx: Context) -> list[float]:
    """Minimise task + mu/2 * sum ||w - target||^2 over every parameter, target = Delta(theta) +
    lambda/mu (one tensor per compressed layer), for ``l_step_epochs``: a step of the shared loop on
    the task loss, then the penalty's proximal step (stable for any mu). LR lr * lr_decay^(index-1),
    constant within the step (as the LC toolkit); batch order seeded by the step."""
    if ctx.train_batches is None:
        raise ValueError("lc: the L step needs training batches (train_batches=...)")
    if cfg.loss == "distill" and ctx.teacher is None:
        raise ValueError("lc: loss='distill' needs the teacher (teacher=...)")
    torch.manual_seed(cfg.seed + index)
    reseed(ctx.train_batches, cfg.seed + index)
    teacher = ctx.teacher
    if teacher is not None:
        teacher.eval()
    pairs = [(model.get_submodule(n).weight, t.to(model.get_submodule(n).weight.device)) for n, t in targets.items()]
    lr = cfg.lr * cfg.lr_decay ** (index - 1)

    distill_task = as_loss(ctx.loss)

    def loss_fn(x, y: torch.Tensor) -> torch.Tensor:
        out = model_inputs.call(model, x)
        if cfg.loss == "labels":
            return F.cross_entropy(out, y)
        assert teacher is not None
        with torch.no_grad():
            t = model_inputs.call(teacher, x)
        return distill_task(out, t)

    return fit(model, model.parameters(), ctx.train_batches, loss_fn, cfg.l_step_epochs, lr, optimizer=cfg.optimizer,
               weight_decay=cfg.weight_decay, stage=f"lc L step {index}", device=ctx.device, schedule="constant",
               on_step=lambda *_: proximal(pairs, mu, lr))


def run_step(model: nn.Module, cfg: LCConfig, index: int, ctx: Context) -> dict | None:
    """LC step ``index``: 0 is the direct compression, then L step, C step, multipliers."""
    if index > cfg.lc_steps:
        return None
    t0 = time.perf_counter()
    groups = assignments(model, cfg)
    prev = ctx.previous or {}
    state = dict(prev.get("state") or {})
    state["positions"] = _positions(model, cfg, ctx, state)
    mu = cfg.mu(max(index, 1))
    losses: list[float] = []
    tensors = prev.get("tensors") or {}
    if index == 0:
        lambdas: dict[str, torch.Tensor] = {}
    else:
        if not tensors:
            raise ValueError(f"lc: step {index} needs the record of step {index - 1} (ctx.previous['tensors'])")
        lambdas = {n: tensors[f"lambda.{n}"] for layers in groups for n, _ in layers}
        targets = {n: delta_of(n, tensors, lambdas[n].shape) + lambdas[n] / mu for n in lambdas}
        losses = l_step(model, cfg, index, mu, targets, ctx)
    weights = {n: m.weight.detach().cpu() for layers in groups for n, m in layers}
    lam_cpu = {n: t.detach().cpu() for n, t in lambdas.items()}
    out, new_state = c_step(weights, lam_cpu, mu, cfg, groups, state, state["positions"], ctx.float_dtype, tensors)
    new_state["positions"] = state["positions"]
    for layers in groups:
        for n, _ in layers:
            w = weights[n]
            lam = lam_cpu.get(n, torch.zeros_like(w))
            out[f"lambda.{n}"] = (lam.double() - mu * (w.double() - delta_of(n, out, w.shape).double())).float()
    distance, relative = _distance(model, groups, out)
    done = is_last(cfg, index, relative)
    log.info("lc: step %d/%d: mu=%.4g ||w - Delta(theta)|| = %.4g (%.3g%% of ||w||)%s", index, cfg.lc_steps, mu, distance,
             100 * relative, f", loss {sum(losses[-20:]) / len(losses[-20:]):.4g}" if losses else "")
    ranks = new_state.get("ranks") or {}
    return {
        "step": index, "mu": mu if index else 0.0, "distance": distance, "relative_distance": relative,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "mean_rank": sum(ranks.values()) / len(ranks) if ranks else None,
        "seconds": time.perf_counter() - t0, "done": done, "state": new_state, "tensors": out,
    }


# ---- Delta(theta) as a model ---------------------------------------------------------------

@torch.no_grad()
def compressed(model: nn.Module, cfg: LCConfig, tensors: dict[str, torch.Tensor], inplace: bool = False) -> tuple[nn.Module, list[dict]]:
    """The model whose compressed layers are Delta(theta): quantized layers as PQLayers (k x 1
    codebook of the distinct values; per channel: UniformLayers), pruned ones with their zeros,
    low-rank ones as LowRankLayers, additive ones as AdditiveLayers of such parts (a pruned part: a WeightPart).
    Per-layer rows (scheme, values or rank, kept share; of an additive layer, its schemes joined
    by "+" and its parts' fields, a field two parts have as a list)."""
    target = model if inplace else copy.deepcopy(model)
    groups = assignments(target, cfg)
    layers = {n: m for group in groups for n, m in group}
    rows = []
    for n, tasks in owners_of(groups).items():
        m = layers[n]
        row: dict[str, Any] = {"layer": n, "scheme": "+".join(cfg.tasks[i].scheme for i in tasks), "weights": m.weight.numel()}
        if len(tasks) == 1:
            part, fields = _theta_part(m, cfg.tasks[tasks[0]], tensors, n, "")
            if isinstance(part, torch.Tensor):
                m.weight.copy_(part)
            else:
                set_module(target, n, part)
            row.update(fields)
        else:
            parts, found = [], {}
            for i in tasks:
                part, fields = _theta_part(m, cfg.tasks[i], tensors, n, f"part{i}.")
                parts.append(WeightPart(part) if isinstance(part, torch.Tensor) else part)
                for k, x in fields.items():
                    found.setdefault(k, []).append(x)
            set_module(target, n, AdditiveLayer(m, parts))
            row.update({k: xs[0] if len(xs) == 1 else xs for k, xs in found.items()})
        rows.append(row)
    return target, rows


def _theta_part(layer: nn.Module, task: LCTask, tensors: dict[str, torch.Tensor], name: str,
                prefix: str) -> tuple[nn.Module | torch.Tensor, dict[str, Any]]:
    """Delta(theta) of one task on a layer (``prefix`` "part<i>.": one part of an additive layer):
    a LowRankLayer, a PQLayer, or the weight itself (pruned: with its zeros); and its row's fields."""
    w = layer.weight
    if task.scheme == "lowrank" and f"{prefix}u.{name}" in tensors:
        u, v = tensors[f"{prefix}u.{name}"], tensors[f"{prefix}v.{name}"]
        return LowRankLayer(layer, u.to(w.device), v.to(w.device)), {"rank": u.shape[1]}
    d = tensors[f"{prefix}delta.{name}"].to(w.device, w.dtype).reshape(w.shape)
    if task.per_channel:  # binary or ternary (LCTask allows it on no other scheme)
        return _per_channel_layer(layer, task.scheme, d), {"k": 2 if task.scheme == "binary" else 3, "per_channel": True}
    if task.scheme in QUANTIZERS:
        values, codes = torch.unique(d.cpu().float().reshape(-1), return_inverse=True)
        return PQLayer(layer, values[:, None], codes, block_size=1), {"k": values.numel()}
    return d, {"kept": float((d != 0).float().mean()), **({"rank": "full"} if task.scheme == "lowrank" else {})}


def _per_channel_layer(layer: nn.Module, scheme: str, d: torch.Tensor) -> UniformLayer:
    """Delta(theta) of a per-channel binary or ternary layer as a UniformLayer (an affine entry
    in the file): offset -c and scale 2c (binary, codes 0/1) or c (ternary, codes 0/1/2) per
    channel, so offset + code * scale is exactly -c, (0,) +c."""
    rows = d.detach().cpu().float().reshape(d.shape[0], -1)
    c = rows.abs().amax(1)
    if scheme == "binary":
        return UniformLayer(layer, 1, (rows > 0).long(), 2 * c, -c)
    return UniformLayer(layer, 2, (torch.sign(rows) + 1).long(), c, -c)


def view(model: nn.Module, cfg: LCConfig, record: dict) -> nn.Module:
    """What step ``record`` stands for: Delta(theta) (its top-1 and bytes are the step's)."""
    return compressed(model, cfg, record["tensors"])[0]


def finish(model: nn.Module, cfg: LCConfig, ctx: Context) -> list[dict]:
    """The model becomes Delta(theta) of the last step."""
    if is_int_codebook(ctx.codebook_dtype) and _per_layer_codebooks(cfg):
        raise ValueError(f"lc: pack.codebook_dtype {ctx.codebook_dtype} cannot hold the learned values; use f16 or f32")
    tensors = (ctx.previous or {}).get("tensors")
    if not tensors:
        raise ValueError("lc: finish needs the last step's record (ctx.previous['tensors']); run the steps first")
    _, rows = compressed(model, cfg, tensors, inplace=True)
    return rows


def trainable(model: nn.Module, cfg: LCConfig) -> list[nn.Parameter]:
    """Fine-tuning after LC: the codebooks, the low-rank factors, the pruned layers' (and pruned
    parts') survivors."""
    params = codebooks(model)
    params += [p for m in model.modules() if isinstance(m, LowRankLayer) for p in (m.u, m.v)]
    params += [p for m in model.modules() if isinstance(m, UniformLayer) for p in (m.scale, m.offset)]
    params += [model.get_submodule(n).weight for n in held_zero(model, cfg)]
    return params


def held_zero(model: nn.Module, cfg: LCConfig) -> dict[str, torch.Tensor]:
    """The pruned layers' masks (True = kept), and those of the pruned parts of additive layers
    (``<layer>.parts.<j>``): the fine-tuning keeps their zeros."""
    names = {n for t in cfg.tasks if t.scheme == "prune" for n, _ in named_layers(model) if matches(n, t.layers)}
    masks = {n: m.weight.detach() != 0 for n, m in named_layers(model) if n in names}
    for n, m in model.named_modules():
        if isinstance(m, AdditiveLayer):  # its parts in the order of the tasks that claim it
            tasks = [t for t in cfg.tasks if matches(n, t.layers)]
            masks.update({f"{n}.parts.{j}": part.weight.detach() != 0 for j, (t, part) in enumerate(zip(tasks, m.parts))
                          if t.scheme == "prune"})
    return masks


STEPS = Steps(identity=identity, count=count, run=run_step, prepare=prepare, finish=finish,
              batch_size=lambda cfg: cfg.batch_size, label="lc-step", view=view,
              done=lambda cfg, index, record: is_last(cfg, index, record["relative_distance"]))


METHOD = Method(
    name="lc", config=LCConfig,
    summary="LC algorithm: learning-compression alternation (Carreira-Perpinan & Idelbayev) for quantization, "
            "pruning and low rank",
    check=check, steps=STEPS, defaults=batch_size_of_teacher, trainable=trainable, held_zero=held_zero,
    layers=(PQLayer, LowRankLayer, UniformLayer, AdditiveLayer),
)


def lc_compress(model: nn.Module, cfg: LCConfig, train_batches=None, teacher: nn.Module | None = None,
                device: torch.device | None = None, on_step=None, float_dtype: str = "f16") -> tuple[nn.Module, list[dict]]:
    """Run every LC step, then make the model Delta(theta) (notebook entry point; the pipeline's
    loop). Returns the model and the per-step records (without state and tensors)."""
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {', '.join(FLOAT_DTYPES)}")
    ctx = Context(train_batches=train_batches, teacher=teacher, device=device, float_dtype=float_dtype)
    records = run_steps(STEPS, model, cfg, ctx, on_step=on_step)
    finish(model, cfg, ctx)
    return model, [{k: v for k, v in r.items() if k not in ("state", "tensors")} for r in records]
