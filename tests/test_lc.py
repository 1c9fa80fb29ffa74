"""The LC algorithm: each C step against brute force or a closed form, the L step's penalty and
the multipliers' update, convergence of w to Delta(theta) on a real model, exact packing of
binary, ternary, sparse and low-rank layers, additive combinations (the alternation, the
AdditiveLayer, its packing and fine-tuning), resume equality, bad settings refused up front."""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from modelpress import stages
from modelpress.flops import layer_macs
from modelpress.methods import REGISTRY, compress
from modelpress.methods.base import Context
from modelpress.methods.lc import (
    METHOD,
    AdditiveLayer,
    LCConfig,
    LowRankLayer,
    WeightPart,
    binarize,
    binarize_rows,
    c_step,
    keep_largest,
    kmeans_1d,
    l1_threshold,
    lc_compress,
    low_rank,
    select_rank,
    soft_threshold,
    ternarize,
    ternarize_rows,
)
from modelpress.methods.lc.method import assignments, delta_of, penalty, proximal
from modelpress.methods.pq import PQLayer
from modelpress.methods.prune.magnitude import keep_masks
from modelpress.methods.uniform.layer import UniformLayer
from modelpress.models import build_model
from modelpress.pack import build_from_packed, extra_tensors, load_packed, pack_model, packed_nbytes, read_packed
from modelpress.train import loader

from helpers import tiny_recipe

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]
ARCH = {"name": "fmnist_cnn", "kwargs": {}}


def _err(v, d):
    return float((v.double() - d.double()).square().sum())


# ---- C steps ---------------------------------------------------------------------------------

def test_binarize_is_the_best_scaled_sign_vector():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(7, generator=g)
        c, codes = binarize(v)
        best = min(_err(v, max(0.0, float(s @ v) / 7) * s) for s in
                   (torch.tensor(x, dtype=torch.float32) for x in itertools.product((-1.0, 1.0), repeat=7)))
        assert _err(v, c[codes]) == pytest.approx(best, rel=1e-6, abs=1e-9)
        assert torch.equal(c, torch.stack([-c[1], c[1]]))


def test_ternarize_is_the_best_scaled_ternary_vector():
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        v = torch.randn(7, generator=g) * torch.rand(7, generator=g)
        c, codes = ternarize(v)
        best = float(v.double().square().sum())
        for s in itertools.product((-1.0, 0.0, 1.0), repeat=7):
            s = torch.tensor(s)
            if s.abs().sum() == 0:
                continue
            scale = max(0.0, float(s @ v) / float(s @ s))
            best = min(best, _err(v, scale * s))
        assert _err(v, c[codes]) == pytest.approx(best, rel=1e-6, abs=1e-9)
        assert c[1] == 0 and c[0] == -c[2]


def test_ternarize_with_a_bound_on_non_zeros_is_the_best_within_it():
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        v = torch.randn(7, generator=g) * torch.rand(7, generator=g)
        for nonzero, most in ((0.3, 2), (3 / 7, 3), (0.01, 1)):
            c, codes = ternarize(v, nonzero)
            assert int((codes != 1).sum()) <= most
            best = float(v.double().square().sum())
            for s in itertools.product((-1.0, 0.0, 1.0), repeat=7):
                s = torch.tensor(s)
                if not 0 < s.abs().sum() <= most:
                    continue
                best = min(best, _err(v, max(0.0, float(s @ v) / float(s @ s)) * s))
            assert _err(v, c[codes]) == pytest.approx(best, rel=1e-6, abs=1e-9)
        assert torch.equal(ternarize(v, 1.0)[1], ternarize(v)[1])  # a bound of everything is no bound
    rows = torch.randn(5, 40, generator=g)
    scale, codes = ternarize_rows(rows, 0.25)
    for r in range(5):  # per row: the per-layer closed form of that row, at most 10 non-zero
        c, row_codes = ternarize(rows[r], 0.25)
        assert torch.equal(codes[r], row_codes) and int((row_codes != 1).sum()) <= 10


def test_per_channel_binarize_and_ternarize_solve_each_row_and_never_lose_to_one_scale():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(6, 3, 2, 2, generator=g) * torch.rand(6, 1, 1, 1, generator=g) * 3  # rows of different scales
    v[2] = 0  # a channel of zeros: scale 0, not NaN
    for rows_fn, layer_fn, signs in ((binarize_rows, binarize, lambda c: c * 2 - 1), (ternarize_rows, ternarize, lambda c: c - 1)):
        scale, codes = rows_fn(v)
        assert scale.shape == (6,) and codes.shape == (6, 12)
        for r in range(6):  # each row is the per-layer closed form (itself checked against brute force above) of that row
            c, row_codes = layer_fn(v[r])
            assert torch.equal(codes[r], row_codes) and float(scale[r]) == pytest.approx(float(c[-1]), rel=1e-6)
        assert float(scale[2]) == 0
        d = (scale[:, None] * signs(codes)).reshape(v.shape)
        c, one = layer_fn(v)
        assert _err(v, d) < _err(v, c[one].reshape(v.shape))


def _best_partition(xs: list[float], k: int) -> float:
    """Optimal 1-D k-means by brute force: clusters of the sorted values are contiguous."""
    n, best = len(xs), float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        sse = 0.0
        for a, b in zip(bounds, bounds[1:]):
            part = torch.tensor(xs[a:b], dtype=torch.float64)
            sse += float((part - part.mean()).square().sum())
        best = min(best, sse)
    return best


def test_kmeans_1d_reaches_the_brute_force_optimum_and_is_a_fixed_point():
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        centres = torch.tensor([-1.0, 0.1, 2.0])
        v = (centres[torch.randint(0, 3, (10,), generator=g)] + 0.05 * torch.randn(10, generator=g))
        c, codes = kmeans_1d(v, 3)
        assert _err(v, c[codes]) == pytest.approx(_best_partition(sorted(v.tolist()), 3), rel=1e-5, abs=1e-9)
    v = torch.randn(1000, generator=g)
    c, codes = kmeans_1d(v, 4)
    for j in range(4):  # Lloyd's fixed point: each value the mean of its weights, each weight at its nearest value
        assert float(c[j]) == pytest.approx(float(v[codes == j].double().mean()), abs=1e-5)
    assert torch.equal(codes, (v[:, None] - c[None, :]).abs().argmin(1))
    again, _ = kmeans_1d(v, 4, init=c.double())
    assert torch.allclose(again, c)  # a warm start at the optimum stays there


def test_l0_keeps_the_largest_over_all_layers_together():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 2, generator=g), torch.randn(4, generator=g)
    masks = keep_largest([a, b], 4)
    flat = torch.cat([a.reshape(-1), b])
    kept = torch.cat([m.reshape(-1) for m in masks])
    best = min(float(flat[list(set(range(10)) - set(s))].square().sum()) for s in itertools.combinations(range(10), 4))
    assert int(kept.sum()) == 4 and float(flat[~kept].square().sum()) == pytest.approx(best)


def test_l1_threshold_is_the_projection_onto_the_l1_ball():
    g = torch.Generator().manual_seed(4)
    vs = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    radius = 3.0
    tau = l1_threshold(vs, radius)
    theta = [soft_threshold(v, tau) for v in vs]
    assert sum(float(t.abs().sum()) for t in theta) == pytest.approx(radius, rel=1e-6)
    lo, hi = 0.0, max(float(v.abs().max()) for v in vs)  # bisection on the same condition
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(float((v.abs() - mid).clamp_min(0).sum()) for v in vs) > radius else (lo, mid)
    assert tau == pytest.approx(lo, abs=1e-6)
    assert l1_threshold(vs, 1e9) == 0.0  # already inside


def test_low_rank_is_eckart_young_and_rank_selection_minimises_its_objective():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 3, 2, 2, generator=g)
    u, v = low_rank(w, 2)
    s = torch.linalg.svdvals(w.reshape(6, -1).double())
    assert u.shape == (6, 2) and v.shape == (2, 12)
    assert _err(w.reshape(6, -1), u @ v) == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-5)
    for mu, alpha in ((1.0, 0.01), (10.0, 0.001), (0.1, 1.0)):
        r = select_rank(w, mu, alpha, cost_per_rank=18.0)
        objective = {q: alpha * q * 18.0 + mu / 2 * float((s[q:] ** 2).sum()) for q in range(1, 6) if q * 18 < 72}
        dense = alpha * 72 * 18.0 / 18
        best = min(objective, key=objective.get)
        assert r == (best if objective[best] < dense else 0)


def test_flops_are_counted_on_a_forward_pass():
    model = build_model("fmnist_cnn")
    macs = layer_macs(model, torch.zeros(1, 1, 28, 28))
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert macs["features.0.0"] == first.weight.numel() * 28 * 28  # 'same' padding: 28 x 28 positions
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(macs[n] == model.get_submodule(n).weight.numel() for n in linear)
    lr = LowRankLayer(first, torch.randn(first.out_channels, 2), torch.randn(2, first.weight[0].numel()))
    model.features[0][0] = lr
    assert layer_macs(model, torch.zeros(1, 1, 28, 28))["features.0.0"] == 2 * (first.out_channels + first.weight[0].numel()) * 784


# ---- the L step, the multipliers, convergence --------------------------------------------------

def test_penalty_gradient_and_its_proximal_step():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 3, generator=g).requires_grad_()
    delta, lam, mu, lr = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), 0.7, 0.3
    penalty([(w, delta + lam / mu)], mu).backward()
    grad = mu * (w.detach() - delta) - lam
    assert torch.allclose(w.grad, grad, atol=1e-5)
    z = w.detach().clone()
    proximal([(z, delta + lam / mu)], mu, lr)
    # the exact minimiser of mu/2 ||z - target||^2 + ||z - w||^2 / (2 lr): its gradient vanishes
    assert torch.allclose(mu * (z - delta) - lam + (z - w.detach()) / lr, torch.zeros_like(z), atol=1e-5)
    small = w.detach().clone()
    proximal([(small, delta + lam / mu)], mu, 1e-4)  # to first order, the gradient step
    assert torch.allclose(small, w.detach() - 1e-4 * grad, atol=1e-7)


def _subsets(data, n_train=2000):
    train, _ = data
    return loader(torch.utils.data.Subset(train, range(n_train)), 100, True)


@pytest.mark.pipeline  # trains: seconds each, kept out of the fast tier
def test_multipliers_update_and_w_converges_to_delta_theta(trained, data):
    batches = _subsets(data)
    cfg = LCConfig(tasks=[{"scheme": "binary"}], lc_steps=6, mu0=0.1, mu_growth=2.5, l_step_epochs=0.5, lr=0.05)
    model, previous, distances = copy.deepcopy(trained), None, []
    for index in range(cfg.lc_steps + 1):
        ctx = Context(train_batches=batches, teacher=trained, previous=previous)
        before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        record = METHOD.steps.run(model, cfg, index, ctx)
        t = record["tensors"]
        mu = cfg.mu(max(index, 1))
        for n, w in before.items():
            w_now = model.get_submodule(n).weight.detach()
            old = previous["tensors"][f"lambda.{n}"] if previous else torch.zeros_like(w)
            expected = old.double() - mu * (w_now.double() - delta_of(n, t, w.shape).double())
            assert torch.allclose(t[f"lambda.{n}"].double(), expected, atol=1e-6), n
            if index == 0:
                assert torch.equal(w_now, w)  # direct compression: no training
        distances.append(record["relative_distance"])
        previous = record
    assert record["done"] and distances[-1] < distances[0] / 10, distances  # w -> Delta(theta)


@pytest.mark.pipeline
def test_a_resumed_run_equals_an_uninterrupted_one_and_packs_exactly(trained, data, tmp_path):
    """Each step from a checkpoint (the model in f32, lambda and Delta(theta) as its extra
    tensors, the record through JSON) gives what the loop in one process gives; the result
    (binary, ternary, sparse, low rank in one model) packs and loads exactly."""
    batches = _subsets(data, 500)
    cfg = LCConfig(lc_steps=2, l_step_epochs=0.05, tasks=[
        {"layers": ["features.0.*"], "scheme": "ternary"},
        {"layers": ["features.2.*"], "scheme": "binary"},
        {"layers": ["features.4.*"], "scheme": "lowrank", "rank": 4},
        {"layers": ["classifier.2"], "scheme": "prune", "keep": 0.2},
        {"layers": ["classifier.5"], "scheme": "quantize", "k": 4}])
    straight, _ = lc_compress(copy.deepcopy(trained), cfg, batches, trained)
    model, previous = copy.deepcopy(trained), None
    for index in range(cfg.lc_steps + 1):
        record = METHOD.steps.run(model, cfg, index, Context(train_batches=batches, teacher=trained, previous=previous))
        tensors = record.pop("tensors")
        path = tmp_path / f"step-{index}.mpk"
        pack_model(model, path, ARCH, {"cycle": json.loads(json.dumps(record))}, "f32", "f32", extra=tensors)
        packed = read_packed(path)
        model = build_from_packed(packed)
        previous = {**packed.meta["cycle"], "tensors": extra_tensors(packed)}
    METHOD.steps.finish(model, cfg, Context(previous=previous))
    for (n, a), (_, b) in zip(model.state_dict().items(), straight.state_dict().items()):
        assert not a.is_floating_point() or torch.equal(a, b), n  # (the file keeps no BatchNorm counter)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n in
             ("features.0.0", "features.2.0", "features.4.0", "classifier.2", "classifier.5")}
    assert kinds == {"features.0.0": "PQLayer", "features.2.0": "PQLayer", "features.4.0": "LowRankLayer",
                     "classifier.2": "Linear", "classifier.5": "PQLayer"}
    assert model.features[0][0].k <= 3 and model.features[2][0].k <= 2 and model.classifier[5].k <= 4
    assert float((model.classifier[2].weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    x = torch.randn(8, 1, 28, 28)
    path = tmp_path / "lc.mpk"
    pack_model(model, path, ARCH, {}, "f32", "f32")
    encodings = {n: e for n, e, _, _ in read_packed(path).entries}
    assert encodings["features.4.0.weight"] == "lowrank" and encodings["classifier.2.weight"] == "sparse"
    assert encodings["features.2.0.weight"] == "pq"
    for materialize in (True, False):
        loaded, _ = load_packed(path, materialize=materialize)
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    two_layers, _ = load_packed(path, materialize=False)
    assert isinstance(two_layers.features[4][0], LowRankLayer) and isinstance(two_layers.features[0][0], PQLayer)
    small = tmp_path / "f16.mpk"  # the default storage: f16 values, same structure
    pack_model(model, small, ARCH, {})
    assert small.stat().st_size < path.stat().st_size


# ---- settings refused before any work ----------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    ({"mu0": 0}, "mu0"),
    ({"mu_growth": 1.0}, "mu_growth"),
    ({"tasks": []}, "tasks"),
    ({"tasks": [{"scheme": "lowrank"}]}, "exactly one of rank"),
    ({"tasks": [{"scheme": "binary", "rank": 2}]}, "settings of scheme lowrank"),
    ({"tasks": [{"scheme": "quantize", "k": 1}]}, "k"),
    ({"tasks": [{"scheme": "prune", "keep": 0}]}, "keep"),
    ({"tasks": [{"scheme": "magic"}]}, "scheme"),
    ({"tasks": [{"scheme": "quantize", "per_channel": True}]}, "per_channel is a setting of schemes binary and ternary"),
    ({"tasks": [{"scheme": "binary", "nonzero": 0.4}]}, "nonzero is a setting of scheme ternary"),
    ({"tasks": [{"scheme": "ternary", "nonzero": 0}]}, "greater than 0"),
])
def test_bad_settings_are_refused_naming_the_field(raw, message):
    with pytest.raises(ValidationError, match=message):
        LCConfig(**raw)


@pytest.mark.parametrize("tasks, message", [
    ([{"layers": ["no_such.*"], "scheme": "binary"}], "'no_such.\\*' matches no Conv2d/Linear layer"),
    ([{"layers": ["features.*"], "scheme": "binary"}, {"layers": ["features.0.0"], "scheme": "ternary"}],
     "features.0.0 is claimed by task 1 .binary. and task 2"),
    ([{"layers": ["features.*"], "scheme": "binary", "additive": True}, {"layers": ["features.0.0"], "scheme": "prune"}],
     r"features.0.0 is claimed by task 1 \(binary\) and task 2 \(prune\); give each layer to one task, or set additive: "
     r"true on both tasks to sum them"),
    ([{"layers": ["classifier.5"], "scheme": "lowrank", "rank": 10}], "rank 10 for classifier.5 is not below its full rank 10"),
])
def test_check_refuses_what_the_model_cannot_take_before_any_work(tasks, message):
    with pytest.raises(ValueError, match=message):
        METHOD.check(build_model("fmnist_cnn"), LCConfig(tasks=tasks), Context())
    with pytest.raises(ValueError, match="codebook_dtype i8"):
        METHOD.check(build_model("fmnist_cnn"), LCConfig(), Context(codebook_dtype="i8"))


def test_registered_and_reachable_through_compress():
    assert REGISTRY["lc"] is METHOD
    model = build_model("fmnist_cnn")
    with pytest.raises(ValueError, match="training batches"):
        compress(model, LCConfig(lc_steps=1))


def test_c_step_combines_schemes_per_task():
    model = build_model("fmnist_cnn")
    cfg = LCConfig(tasks=[{"layers": ["features.*"], "scheme": "ternary"},
                          {"layers": ["classifier.*"], "scheme": "prune", "keep": 0.5}])
    groups = assignments(model, cfg)
    weights = {n: m.weight.detach() for layers in groups for n, m in layers}
    out, _ = c_step(weights, {}, 1.0, cfg, groups, {}, {}, "f16")
    for n, _ in groups[0]:
        assert len(torch.unique(out[f"delta.{n}"])) <= 3
    kept = sum(int((out[f"delta.{n}"] != 0).sum()) for n, _ in groups[1])
    assert kept == round(0.5 * sum(weights[n].numel() for n, _ in groups[1]))


# ---- additive combinations ---------------------------------------------------------------------

TINY = {"name": "fmnist_cnn", "kwargs": {"width": 4, "hidden": 16}}


def test_additive_c_step_alternates_to_a_fixed_point_below_either_part_alone():
    """binary + an l0 sparse correction on one tensor: each round of the alternation lowers
    ||v - binary - sparse||^2 (never raises it), ending far below binary alone; at the end each
    part is the best answer to the other's residual, and a warm start there stays there; the
    layer's delta is the sum; with keep = 1 the sum is v itself."""
    g = torch.Generator().manual_seed(7)
    v = torch.randn(6, 5, generator=g)
    groups = [[("w", None)], [("w", None)]]
    cfg = LCConfig(tasks=[{"scheme": "binary", "additive": True}, {"scheme": "prune", "keep": 0.2, "additive": True}])
    errors = []
    for rounds in range(1, 9):
        out, _ = c_step({"w": v}, {}, 1.0, cfg, groups, {}, {}, "f16", rounds=rounds)
        errors.append(_err(v, out["part0.delta.w"].double() + out["part1.delta.w"].double()))
    assert all(b <= a for a, b in zip(errors, errors[1:])) and errors[-1] < errors[0], errors
    c, codes = binarize(v)
    assert errors[-1] < _err(v, c[codes].reshape(v.shape)) / 2
    binary, sparse = out["part0.delta.w"], out["part1.delta.w"]
    assert torch.equal(out["delta.w"], binary + sparse) and set(out) == {"delta.w", "part0.delta.w", "part1.delta.w"}
    assert len(torch.unique(binary)) == 2 and int((sparse != 0).sum()) == 6
    c, codes = binarize(v - sparse)
    assert torch.allclose(c[codes].reshape(v.shape), binary, atol=1e-4)
    assert torch.equal((v - binary) * keep_largest([v - binary], 6)[0], sparse)
    again, _ = c_step({"w": v}, {}, 1.0, cfg, groups, {}, {}, "f16", previous=out, rounds=1)
    assert _err(v, again["delta.w"]) == pytest.approx(errors[-1], rel=1e-5)
    everything = LCConfig(tasks=[{"scheme": "binary", "additive": True}, {"scheme": "prune", "keep": 1.0, "additive": True}])
    out, _ = c_step({"w": v}, {}, 1.0, everything, groups, {}, {}, "f16")
    assert torch.allclose(out["delta.w"], v, atol=1e-6)


def test_a_layer_in_two_additive_tasks_is_summed_and_the_others_keep_their_keys():
    """With additive on both tasks the shared layers get both parts (a ternary weight plus rank-2
    factors) and their sum; the layers of one task keep today's keys; an additive task alone on
    its layers is that task as it was (additive: true is no longer refused)."""
    model = build_model(TINY["name"], **TINY["kwargs"])
    cfg = LCConfig(tasks=[{"layers": ["*"], "scheme": "ternary", "additive": True},
                          {"layers": ["classifier.*"], "scheme": "lowrank", "rank": 2, "additive": True}])
    METHOD.check(model, cfg, Context())
    groups = assignments(model, cfg)
    weights = {n: m.weight.detach() for layers in groups for n, m in layers}
    out, state = c_step(weights, {}, 1.0, cfg, groups, {}, {}, "f16")
    for n in ("features.0.0", "features.2.0", "features.4.0"):
        assert not any(k.endswith(f".{n}") and k != f"delta.{n}" for k in out) and len(torch.unique(out[f"delta.{n}"])) <= 3
    for n in ("classifier.2", "classifier.5"):
        ternary, u, v = out[f"part0.delta.{n}"], out[f"part1.u.{n}"], out[f"part1.v.{n}"]
        assert len(torch.unique(ternary)) <= 3 and u.shape[1] == 2
        assert torch.equal(out[f"delta.{n}"], ternary + (u @ v).reshape(ternary.shape))
        assert state["ranks"][f"part1.{n}"] == 2
    alone = [{"layers": ["features.*"], "scheme": "ternary"}, {"layers": ["classifier.*"], "scheme": "prune", "keep": 0.5}]
    flagged = [{**alone[0], "additive": True}, {**alone[1], "additive": True}]
    groups = assignments(model, LCConfig(tasks=alone))
    plain, _ = c_step(weights, {}, 1.0, LCConfig(tasks=alone), groups, {}, {}, "f16")
    summed, _ = c_step(weights, {}, 1.0, LCConfig(tasks=flagged), groups, {}, {}, "f16")
    assert plain.keys() == summed.keys() and all(torch.equal(plain[k], summed[k]) for k in plain)


def _loads_exactly(model: nn.Module, path, x: torch.Tensor) -> None:
    """The packed file at ``path`` gives ``model``'s outputs exactly, loaded either way."""
    with torch.no_grad():
        expected = model(x)
        for materialize in (True, False):
            loaded, _ = load_packed(path, materialize=materialize)
            assert torch.equal(loaded(x), expected), materialize


def test_lc_compress_ternary_plus_sparse_correction_packs_exactly_and_fine_tunes_its_parts(tmp_path):
    """Every layer ternary + a 2 % sparse correction: the layers end as AdditiveLayers whose weight
    is the step's Delta(theta); the file (a pq and a sparse entry per layer) is the size
    packed_nbytes says, smaller than the same weights as plain layers, and loads exactly both
    ways; rebuilt compressed, the codebooks and the corrections train while their zeros stay."""
    torch.manual_seed(0)
    teacher = build_model(TINY["name"], **TINY["kwargs"]).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    cfg = LCConfig(lc_steps=2, l_step_epochs=1.0, tasks=[{"layers": ["*"], "scheme": "ternary", "additive": True},
                                                        {"layers": ["*"], "scheme": "prune", "keep": 0.02, "additive": True}])
    records: list[dict] = []
    model, _ = lc_compress(copy.deepcopy(teacher), cfg, batches, teacher, on_step=lambda _i, _m, r: records.append(r))
    model.eval()
    names = [n for n, m in teacher.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    last = records[-1]["tensors"]
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, AdditiveLayer) and isinstance(layer.parts[1], WeightPart)
        assert isinstance(layer.parts[0], PQLayer) and layer.parts[0].k <= 3
        assert torch.equal(last[f"delta.{n}"], last[f"part0.delta.{n}"] + last[f"part1.delta.{n}"])
        assert torch.equal(layer.weight, last[f"delta.{n}"])
    total = sum(teacher.get_submodule(n).weight.numel() for n in names)
    assert sum(int((model.get_submodule(n).parts[1].weight != 0).sum()) for n in names) == round(0.02 * total)

    path = tmp_path / "additive.mpk"
    size = pack_model(model, path, TINY, {}, "f32", "f32")
    assert size == os.path.getsize(path) == packed_nbytes(model, "f32", "f32", arch=TINY)
    packed = read_packed(path)
    encodings = {n: e for n, e, _, _ in packed.entries}
    assert all(encodings[f"{n}.weight"] == "pq" and encodings[f"{n}.weight+1"] == "sparse" for n in names)
    rows = {r["tensor"]: r for r in packed.summary()}  # what `modelpress inspect` shows
    assert len(rows) == len(packed.entries) and "sparsity" not in rows["classifier.5.weight+1"]
    with torch.no_grad():
        zeros = float((model.classifier[5].weight == 0).float().mean())
    assert rows["classifier.5.weight"]["sparsity"] == round(zeros, 4)  # of the sum
    _loads_exactly(model, path, torch.randn(4, 1, 28, 28, generator=g))
    plain = tmp_path / "plain.mpk"
    pack_model(load_packed(path)[0], plain, TINY, {}, "f32", "f32")
    assert os.path.getsize(path) < os.path.getsize(plain)

    coded, _ = load_packed(path, materialize=False)
    params, masks = METHOD.trainable(coded, cfg), METHOD.held_zero(coded, cfg)
    assert set(masks) == {f"{n}.parts.1" for n in names}
    parts = [coded.get_submodule(n).parts for n in names]
    assert all(any(p is q[0].codebook for p in params) and any(p is q[1].weight for p in params) for q in parts)
    before = [(q[0].codebook.detach().clone(), q[1].weight.detach().clone()) for q in parts]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    coded.train()
    with keep_masks(coded, masks):
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(coded(batches[0][0]), batches[0][1]).backward()
            opt.step()
        for n, q in zip(names, parts):
            assert not q[1].weight[~masks[f"{n}.parts.1"]].any(), n  # zeros held during training, not only after
    assert any(not torch.equal(q[0].codebook, c) for q, (c, _) in zip(parts, before))
    assert any(not torch.equal(q[1].weight, w) for q, (_, w) in zip(parts, before))


def test_per_channel_binary_and_ternary_pack_as_affine_entries_and_load_exactly(tmp_path):
    """Convolutions ternary and the classifier binary, one scale per output channel: the layers end
    as UniformLayers whose weight is the last step's Delta(theta), every row on its own {-c, 0, c}
    (or {-c, c}); the file holds affine entries, is the size packed_nbytes says, loads exactly
    both ways, and the fine-tuning trains the scales and offsets."""
    torch.manual_seed(0)
    teacher = build_model(TINY["name"], **TINY["kwargs"]).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    cfg = LCConfig(lc_steps=2, tasks=[{"layers": ["features.*"], "scheme": "ternary", "per_channel": True},
                                      {"layers": ["classifier.*"], "scheme": "binary", "per_channel": True}])
    METHOD.check(teacher, cfg, Context(codebook_dtype="i8"))  # the scales are floats whatever the codebooks' dtype
    records: list[dict] = []
    model, _ = lc_compress(copy.deepcopy(teacher), cfg, batches, teacher, on_step=lambda _i, _m, r: records.append(r))
    model.eval()
    last = records[-1]["tensors"]
    names = [n for n, m in teacher.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, UniformLayer), n
        w = layer.weight.detach()
        assert torch.equal(w, last[f"delta.{n}"])
        for row in w.reshape(w.shape[0], -1):
            values = set(torch.unique(row.abs()).tolist())
            assert len(values - {0.0}) <= 1 and (0.0 not in values or n.startswith("features")), n
    path = tmp_path / "per-channel.mpk"
    size = pack_model(model, path, TINY, {}, "f32", "f32")
    assert size == os.path.getsize(path) == packed_nbytes(model, "f32", "f32", arch=TINY)
    assert {e for n, e, _, _ in read_packed(path).entries if n.endswith(".weight") and n[:-7] in names} == {"affine"}
    _loads_exactly(model, path, torch.randn(4, 1, 28, 28, generator=g))
    coded, _ = load_packed(path, materialize=False)
    params = METHOD.trainable(coded, cfg)
    assert all(any(p is m.scale for p in params) and any(p is m.offset for p in params)
               for m in coded.modules() if isinstance(m, UniformLayer))


@pytest.mark.pipeline
def test_pipeline_resumes_at_the_unfinished_step_bit_identical(trained_workdir, tmp_path):
    """Through the pipeline's stages: a run stopped after step 1 (its checkpoint with lambda and
    Delta(theta), the additive layers' parts too, beside it) resumes at step 2 and ends
    bit-identical to an uninterrupted run; each step's figures are those of Delta(theta). The
    convolutions are ternary plus a sparse correction (additive): the fine-tuning stage rebuilds
    them from the file, trains their parts and keeps the corrections' zeros, and the final file
    holds them as such."""
    method = {"name": "lc", "lc_steps": 2, "l_step_epochs": 0.01,
              "tasks": [{"layers": ["features.*"], "scheme": "ternary", "additive": True},
                        {"layers": ["features.*"], "scheme": "prune", "keep": 0.01, "additive": True},
                        {"layers": ["classifier.*"], "scheme": "binary"}]}
    ref, work = tmp_path / "ref", tmp_path / "resumed"
    shutil.copytree(trained_workdir, ref)
    shutil.copytree(trained_workdir, work)
    stages.compress_stage(tiny_recipe(ref, method=method))
    recipe = tiny_recipe(work, method=method)
    stages.method_step(recipe, 0)
    second = stages.method_step(recipe, 1)
    assert not second["done"] and "tensors" not in second
    assert not (work / "compress" / "cycles" / "cycle-03.mpk").exists()
    stages.compress_stage(recipe)
    a = (ref / "compress" / "compressed.mpk").read_bytes()
    b = (work / "compress" / "compressed.mpk").read_bytes()
    assert read_packed(ref / "compress" / "compressed.mpk").entries == read_packed(work / "compress" / "compressed.mpk").entries
    assert len(a) == len(b)
    cycles = stages.read_json(work / "compress" / "cycles.json")["cycles"]
    assert [c["step"] for c in cycles] == [0, 1, 2] and all("state" not in c and "tensors" not in c for c in cycles)
    weights = sum(m.weight.numel() for m in build_model("fmnist_cnn").modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert all(c["packed_bytes"] < weights * 2 / 8 for c in cycles)  # the bytes of Delta(theta) (< 2 bits a weight), not of w
    model, _ = load_packed(work / "compress" / "compressed.mpk", materialize=False)
    convs = {n: m for n, m in model.named_modules() if n.startswith("features.") and isinstance(m, AdditiveLayer)}
    assert len(convs) == 3 and all(len(torch.unique(m.parts[0].weight)) <= 3 for m in convs.values())
    assert all(len(torch.unique(m.weight)) <= 2 for n, m in model.named_modules() if n.startswith("classifier.") and isinstance(m, PQLayer))
    zeros = {n: m.parts[1].weight == 0 for n, m in convs.items()}
    assert 0.9 < sum(int(z.sum()) for z in zeros.values()) / sum(z.numel() for z in zeros.values()) < 1

    recipe = tiny_recipe(work, method=method, finetune={"epochs": 0.05})
    tuned, _ = load_packed(stages.finetune_stage(recipe), materialize=False)
    for n, z in zeros.items():
        layer = tuned.get_submodule(n)
        assert isinstance(layer, AdditiveLayer) and torch.equal(layer.parts[1].weight == 0, z), n  # zeros kept
    assert any(not torch.equal(tuned.get_submodule(n).parts[1].weight, convs[n].parts[1].weight) for n in convs)  # trained
    final = read_packed(stages.pack_stage(recipe))
    encodings = {name: enc for name, enc, _, _ in final.entries}
    assert all(encodings[f"{n}.weight"] == "pq" and encodings[f"{n}.weight+1"] == "sparse" for n in convs)


def test_step_plot_for_mlflow(tmp_path):
    from modelpress.report import plot_steps

    steps = [{"top1": 80 + i, "packed_bytes": 40000 - i, "relative_distance": 0.5 / (i + 1)} for i in range(4)]
    png = plot_steps(steps, tmp_path / "s.png", 91.7, "lc", "lc-step")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.pipeline
def test_a_run_stopped_early_by_the_tolerance_is_not_extended_when_reused(trained_workdir, tmp_path):
    """LC ends at the first step whose ||w - Delta(theta)|| / ||w|| is under the tolerance: going
    over the steps again (a retry, a rerun, the compress stage after the flow's step tasks)
    reuses them and stops at that step, instead of training one more."""
    from modelpress.stages.pipeline import run_method_steps

    work = shutil.copytree(trained_workdir, tmp_path / "work")
    method = {"name": "lc", "lc_steps": 3, "l_step_epochs": 0.01, "tolerance": 0.99,
              "tasks": [{"layers": ["*"], "scheme": "ternary"}]}
    recipe = tiny_recipe(work, method=method)
    stages.method_step(recipe, 0)
    assert stages.method_step(recipe, 1)["done"]
    assert run_method_steps(recipe) == 1
    assert not (work / "compress" / "cycles" / "cycle-03.mpk").exists()
