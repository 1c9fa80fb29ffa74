"""A byte budget instead of hand-picked settings: choose each layer's block size and number of
centroids (or fp16) so the packed file fits ``target_bytes`` with the least damage.

1. Candidates per layer: block sizes that fit its shape (a 3x3 conv: one or two kernels; a
   1x1 conv: 4 or 8 inputs; a linear layer: 4, 8 or 16 inputs) x ``budget_k``, plus fp16.
2. Damage of a candidate: quantize *only that layer* of the dense model (k-means in the
   metric of its own input activations) and measure KL(teacher || model) on calibration
   images. Its cost: the layer's bytes in the packed format.
3. Allocation: the damages are treated as additive and a Lagrange multiplier is bisected
   (each layer picks argmin damage + lambda * bytes), then leftover bytes buy the upgrades
   with the best damage saved per byte. Everything not quantized (BatchNorm, biases, the
   header) is counted exactly by packing a stand-in model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ... import inputs as model_inputs
from ...pack import model_entries, packed_nbytes, round_codebook
from ...pack.entries import dense_nbytes, pq_nbytes
from ...progress import Progress, log
from ...train import distill_loss, output_tensor
from ...walk import matches, named_layers, set_module, weight_name, weight_of
from .config import BlockSpec, PQConfig
from .kmeans import gram_kmeans
from .layer import PQ_LAYERS, input_gram, make_pq, to_subvectors

HEADER_MARGIN = 512  # bytes of header growth allowed for by the plan (stage metadata)


class BudgetError(ValueError):
    """The byte budget cannot be met; the message names the smallest reachable size."""


LINEAR_BLOCKS = [4, 8, 16]


def block_candidates(layer: nn.Module, linear_blocks: list[int] | None = None) -> list[int]:
    """Block sizes a budget tries for a layer; ``linear_blocks``: for Linear layers and attention
    in-projections (default LINEAR_BLOCKS)."""
    row = weight_of(layer)[0].numel()
    if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
        kk = layer.kernel_size[0] * layer.kernel_size[1]
        sizes = [kk, 2 * kk]
    elif isinstance(layer, nn.Conv2d):
        sizes = [4, 8]
    else:
        sizes = linear_blocks or LINEAR_BLOCKS
    return [b for b in sizes if row % b == 0]


def pq_bytes(numel: int, spec: BlockSpec, codebook_dtype: str = "f16") -> int:
    """Bytes of a layer's codes (bit-packed) plus its codebook stored as ``codebook_dtype``:
    the packed file's own size of a "pq" entry."""
    n = numel // spec.block_size
    return pq_nbytes(min(spec.k, n), spec.block_size, n, codebook_dtype)


def layer_bytes(numel: int, spec: BlockSpec | None, float_dtype: str = "f16", codebook_dtype: str = "f16") -> int:
    """Bytes of one layer's weight in the packed file (None = dense)."""
    return dense_nbytes(numel, float_dtype) if spec is None else pq_bytes(numel, spec, codebook_dtype)


def _candidate_layers(model: nn.Module, cfg: PQConfig) -> list[tuple[str, nn.Module]]:
    """The layers a budget allocates: every Conv2d/Linear/attention in-projection not excluded
    (grouped convolutions too)."""
    return [(n, m) for n, m in named_layers(model, extended=True) if not matches(n, cfg.exclude)]


def _kl(out, ref) -> float:
    """The damage of a candidate: KL(teacher || model) on logits (a (batch, classes) tensor, or
    the ``logits`` of a Hugging Face output); on any other output (embeddings, hidden states:
    modelpress.train.output_tensor) the squared error relative to the teacher output's energy."""
    is_logits = (isinstance(out, torch.Tensor) and out.dim() == 2) or (isinstance(out, dict) and "logits" in out)
    if is_logits:
        return float(distill_loss(out, ref))  # the distillation's own KL, at temperature 1
    out, ref = output_tensor(out), output_tensor(ref)
    return float(((out - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30))


@torch.no_grad()
def measure(model: nn.Module, cfg: PQConfig, images: model_inputs.Inputs) -> dict[str, list[dict]]:
    """Every candidate's bytes and damage, per layer (in forward order)."""

    model = copy.deepcopy(model).eval()
    device = next(model.parameters()).device
    images = model_inputs.to(images, device)
    ref = model_inputs.call(model, images)
    layers = _candidate_layers(model, cfg)
    table: dict[str, list[dict]] = {}
    total = sum(len(block_candidates(m, cfg.budget_linear_blocks)) * len(cfg.budget_k) for _, m in layers)
    prog = Progress("budget: candidates", total, unit="candidate")
    for index, (name, layer) in enumerate(layers):
        numel = weight_of(layer).numel()
        rows = [{"spec": None, "bytes": layer_bytes(numel, None), "damage": 0.0}]
        for block in block_candidates(layer, cfg.budget_linear_blocks):
            w = to_subvectors(weight_of(layer).detach().cpu(), block)
            g = input_gram(model, layer, images, block)
            for k in sorted(set(min(k, w.shape[0]) for k in cfg.budget_k)):
                c, codes, _ = gram_kmeans(w, k, g, iters=min(cfg.kmeans_iters, 15), seed=cfg.seed + index,
                                          init=cfg.kmeans_init, repair_empty=cfg.repair_empty)
                # each storage the budget may choose: the damage of the codebook as that storage keeps it
                for storage in cfg.budget_codebooks or [None]:
                    stored = c if storage is None else round_codebook(c, storage)
                    set_module(model, name, make_pq(layer, stored, codes, block))
                    damage = _kl(model_inputs.call(model, images), ref)
                    set_module(model, name, layer)
                    spec = BlockSpec(block_size=block, k=k, codebook=storage)
                    rows.append({"spec": spec, "bytes": layer_bytes(numel, spec), "damage": damage})
                    prog.update(layer=name, block=block, k=k, kl=damage, **({"storage": storage} if storage else {}))
        table[name] = rows
    return table


def fixed_bytes(model: nn.Module, names: list[str], float_dtype: str = "f16", arch: dict | None = None,
                meta: dict | None = None) -> int:
    """Bytes of the packed file outside the weights of ``names`` (exact, by packing a stand-in
    with those weights empty)."""
    stub = copy.deepcopy(model)
    for name in names:
        layer = stub.get_submodule(name)
        setattr(layer, weight_name(layer), nn.Parameter(weight_of(layer).detach().new_zeros(0)))
    return packed_nbytes(stub, float_dtype, "f16", arch, meta) + HEADER_MARGIN


def allocate(table: dict[str, list[dict]], budget: int) -> dict[str, dict]:
    """Least total damage with sum of bytes <= budget (Lagrangian + greedy fill)."""
    def pick(lam: float) -> dict[str, dict]:
        return {n: min(rows, key=lambda r: (r["damage"] + lam * r["bytes"], r["bytes"])) for n, rows in table.items()}

    def size(choice: dict[str, dict]) -> int:
        return sum(r["bytes"] for r in choice.values())

    smallest = {n: min(rows, key=lambda r: (r["bytes"], r["damage"])) for n, rows in table.items()}
    if size(smallest) > budget:
        raise BudgetError(str(size(smallest)))
    lo, hi = 0.0, 1.0
    while size(pick(hi)) > budget:
        hi *= 4
        if hi > 1e12:
            break
    choice = pick(hi) if size(pick(hi)) <= budget else smallest
    for _ in range(60):
        mid = (lo + hi) / 2
        if size(pick(mid)) <= budget:
            hi, choice = mid, pick(mid)
        else:
            lo = mid
    while True:  # spend what is left on the best upgrades per byte
        left = budget - size(choice)
        best = None
        for n, rows in table.items():
            cur = choice[n]
            for r in rows:
                extra = r["bytes"] - cur["bytes"]
                gain = cur["damage"] - r["damage"]
                if 0 < extra <= left and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, r)
        if best is None:
            return choice
        choice[best[1]] = best[2]


def table_to_json(table: dict[str, list[dict]]) -> dict:
    return {n: [{**r, "spec": r["spec"].model_dump() if r["spec"] else None} for r in rows] for n, rows in table.items()}


def table_from_json(obj: dict) -> dict[str, list[dict]]:
    return {n: [{**r, "spec": BlockSpec(**r["spec"]) if r["spec"] else None} for r in rows] for n, rows in obj.items()}


def measure_key(cfg: PQConfig) -> dict:
    """The settings a damage table depends on (not the budget): points of a sweep over budgets
    share one table."""
    return cfg.model_dump(mode="json", include={"budget_k", "budget_images", "calibration_images", "kmeans_iters", "kmeans_init",
                                                 "repair_empty", "exclude", "seed", "budget_linear_blocks", "budget_codebooks"})


def plan_budget(model: nn.Module, cfg: PQConfig, images: model_inputs.Inputs, float_dtype: str = "f16",
                arch: dict | None = None, meta: dict | None = None,
                table: dict[str, list[dict]] | None = None, codebook_dtype: str = "f16") -> tuple[PQConfig, list[dict]]:
    """Turn ``cfg.target_bytes`` into explicit per-layer settings: returns the PQConfig to run
    (overrides + exclusions, no budget) and the allocation table. ``table``: the damages
    :func:`measure` found before with the same :func:`measure_key` (measured here if None).
    Each candidate is costed here for ``float_dtype`` and its codebook storage (its own with
    ``budget_codebooks``, else ``codebook_dtype``: the damages do not depend on it then)."""
    if table is None:
        table = measure(model, cfg, model_inputs.take(images, 0, cfg.budget_images))
    table = {n: [{**r, "bytes": layer_bytes(weight_of(model.get_submodule(n)).numel(), r["spec"], float_dtype,
                                            (r["spec"] and r["spec"].codebook) or codebook_dtype)}
                 for r in rows] for n, rows in table.items()}
    # scope "layers": the budget is the allocated layers' weights alone (nothing else is counted)
    fixed = 0 if cfg.budget_scope == "layers" else fixed_bytes(model, list(table), float_dtype, arch, meta)
    try:
        choice = allocate(table, cfg.target_bytes - fixed)
    except BudgetError as e:
        smallest = int(str(e)) + fixed
        raise BudgetError(
            f"target_bytes={cfg.target_bytes} cannot be met: the smallest reachable packed size is {smallest} bytes "
            f"(every layer at its smallest setting; {fixed} bytes are BatchNorm, biases, unquantized layers and header)"
        ) from None
    overrides, exclude, rows = {}, list(cfg.exclude), []
    for name, r in choice.items():
        if r["spec"] is None:
            exclude.append(name)
        else:
            overrides[name] = r["spec"]
        rows.append({"layer": name, "block_size": r["spec"].block_size if r["spec"] else None,
                     "k": r["spec"].k if r["spec"] else None, "bytes": r["bytes"], "kl_alone": r["damage"],
                     **({"codebook": r["spec"].codebook} if r["spec"] and r["spec"].codebook else {})})
    planned = fixed + sum(r["bytes"] for r in choice.values())
    log.info("budget: %d bytes planned for a budget of %d (%d fixed)", planned, cfg.target_bytes, fixed)
    new = cfg.model_copy(update={"target_bytes": None, "budget_codebooks": None, "overrides": overrides, "exclude": exclude})
    return new, rows


def allocated_nbytes(model: nn.Module, exclude: list[str], float_dtype: str = "f16", codebook_dtype: str = "f16",
                     layer_codebooks: dict[str, str] | None = None) -> int:
    """Bytes in the packed file of what a budget of scope "layers" counts: the weight entry of
    every PQ layer and of every other Conv2d/Linear/attention/Conv1D not in ``exclude``."""
    names = {f"{n}.{weight_name(m)}" for n, m in model.named_modules() if isinstance(m, PQ_LAYERS)}
    names |= {f"{n}.{weight_name(m)}" for n, m in named_layers(model, extended=True) if not matches(n, exclude)}
    entries = model_entries(model, float_dtype, codebook_dtype, layer_codebooks=layer_codebooks)
    return sum(len(data) for name, _, _, data in entries if name in names)


def check_reachable(model: nn.Module, cfg: PQConfig, float_dtype: str = "f16", arch: dict | None = None,
                    meta: dict | None = None, codebook_dtype: str = "f16") -> None:
    """Fail fast (no data, no training) when no allocation can meet ``cfg.target_bytes``."""
    if cfg.target_bytes is None:
        return
    layers = _candidate_layers(model, cfg)
    least = 0
    for _, m in layers:
        numel = weight_of(m).numel()
        options = [layer_bytes(numel, None, float_dtype)]
        for block in block_candidates(m, cfg.budget_linear_blocks):
            n = numel // block
            options += [layer_bytes(numel, BlockSpec(block_size=block, k=min(k, n)), float_dtype, storage)
                        for k in cfg.budget_k for storage in cfg.budget_codebooks or [codebook_dtype]]
        least += min(options)
    smallest = least if cfg.budget_scope == "layers" else least + fixed_bytes(model, [n for n, _ in layers], float_dtype, arch, meta)
    if smallest > cfg.target_bytes:
        raise BudgetError(
            f"target_bytes={cfg.target_bytes} cannot be met: the smallest reachable packed size is {smallest} bytes "
            f"(every layer at its smallest setting)"
        )
