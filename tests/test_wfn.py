"""Weight Fixing Networks on real data: the candidate values and the fixing rule, fixed weights
held exactly through retraining, the whole method through compress(), packing bit for bit, a
resumed run equal to an uninterrupted one, bad settings refused."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from modelpress import stages
from modelpress.methods import REGISTRY, compress
from modelpress.methods.base import Context, run_steps
from modelpress.methods.pq import PQLayer
from modelpress.methods.wfn import (
    METHOD,
    WFNConfig,
    candidate_levels,
    choose,
    decode_mask,
    encode_mask,
    fix_to,
    fixable,
    fixed_masks,
    retrain,
    value_stats,
)
from modelpress.methods.wfn.values import nearest
from modelpress.pack import build_from_packed, load_packed, pack_model, read_packed
from modelpress.train import evaluate, loader

from helpers import tiny_recipe

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]
ARCH = {"name": "fmnist_cnn", "kwargs": {}}
GAMMA = 2 ** -7


def _is_signed_pow2_sum(v: float, terms: int) -> bool:
    """v is a sum of at most ``terms`` signed powers of two (greedy on the nearest power of two)."""
    for _ in range(terms):
        if v == 0:
            return True
        v -= np.sign(v) * 2.0 ** np.round(np.log2(abs(v)))
    return v == 0


def _subsets(data, n_train=3000, n_test=1000):
    train, test = data
    return (loader(torch.utils.data.Subset(train, range(n_train)), 64, True),
            loader(torch.utils.data.Subset(test, range(n_test)), 500, False))


def test_candidates_are_signed_sums_of_powers_of_two_exact_in_f16():
    one, two, three = candidate_levels(3, GAMMA, 0.9)
    assert 0.0 in one and np.array_equal(one, -one[::-1])  # symmetric, with zero
    assert set(np.abs(one[one != 0])) == {2.0 ** e for e in range(-7, 1)}  # 2**-7 (gamma_0) .. 1 (covers 0.9)
    assert set(one) <= set(two) <= set(three) and len(one) < len(two) < len(three)
    for level, terms in ((one, 1), (two, 2), (three, 3)):
        assert all(_is_signed_pow2_sum(float(v), terms) for v in level)
        assert np.array_equal(level.astype(np.float16).astype(np.float64), level)  # exact in the packed file's f16
        assert np.abs(level).max() <= 1.0 and np.abs(level[level != 0]).min() >= GAMMA
    assert 0.75 in two and 0.375 in two and 1 + 2 ** -10 not in two  # 1 - 1/4, 1/4 + 1/8; over f16's 11 bits: no


def test_fixing_rule_on_hand_made_weights():
    levels = candidate_levels(2, GAMMA, 2.0)
    w = np.array([
        0.5 * 1.005,   # within 1 % of a power of two
        -0.25 * 0.992,  # the same, negative
        1.0035,        # within 1 % of 1 (order 1), even nearer to 1 + 2**-8 (order 2): the power of two wins
        0.001,         # below gamma_0: 0
        0.75 * 1.002,  # nowhere near a power of two, within 1 % of 1 - 1/4 (order 2)
        0.3,           # 4 % from its nearest value (0.3125): beyond delta
    ])
    idx, values, info = choose(w, 5, levels, 0.01, GAMMA, "each")
    assert dict(zip(idx.tolist(), values.tolist())) == {0: 0.5, 1: -0.25, 2: 1.0, 3: 0.0, 4: 0.75}
    assert info["beyond_delta"] == 0 and info["order_reached"] == 2 and info["max_rel_distance"] <= 0.01
    # Asked for all six, the last one goes to its nearest value with a relaxed distance (as the reference).
    idx, values, info = choose(w, 6, levels, 0.01, GAMMA, "each")
    assert values[idx.tolist().index(5)] == 0.3125 and info["beyond_delta"] == 1 and info["delta_used"] > 0.04
    # Powers of two only (max_order 1): 0.75 cannot be reached within delta, so it is relaxed too.
    idx, values, _ = choose(w, 5, levels[:1], 0.01, GAMMA, "each")
    assert set(values.tolist()) <= {0.0, 0.5, -0.25, 1.0} or 0.75 not in values
    # Fewer to fix than could be: the value shared by most weights first, closest weights first.
    w = np.array([0.5 * 1.004, 0.5 * 0.999, 0.5 * 1.009, 0.25 * 1.001, 0.25 * 1.002, 0.4])
    idx, values, _ = choose(w, 2, levels, 0.01, GAMMA, "each")
    assert sorted(idx.tolist()) == [0, 1] and set(values.tolist()) == {0.5}


def test_mean_rule_bounds_the_mean_distance_of_what_one_value_takes():
    """The reference code's rule: a value takes its closest free weights while their mean relative
    distance stays within delta, so it may take weights further than delta on their own."""
    levels = candidate_levels(1, GAMMA, 1.0)  # powers of two only
    w = np.array([0.5 * 1.001, 0.5 * 1.005, 0.5 * 0.988, 0.5 * 1.02, 0.5 * 1.05, 0.25 * 1.001, 0.25 * 1.003])
    rel = np.abs(w - np.array([0.5] * 5 + [0.25] * 2)) / w
    idx, values, info = choose(w, 7, levels, 0.01, GAMMA, "mean")
    # 0.5 has the most weights nearest to it: its four closest have a mean distance within 1 %
    # (the 5th would pass it), 0.25 takes both; the 5 % weight comes last, at a relaxed distance.
    taken_first = set(range(4)) | {5, 6}
    assert rel[[0, 1, 2, 3]].mean() <= 0.01 < rel[[0, 1, 2, 3, 4]].mean() and rel[3] > 0.01
    idx6, _, info6 = choose(w, 6, levels, 0.01, GAMMA, "mean")
    assert set(idx6.tolist()) == taken_first and info6["delta_used"] == 0.01 and info6["beyond_delta"] == 2
    assert info6["mean_rel_distance"] <= 0.01
    assert dict(zip(idx.tolist(), values.tolist()))[4] == 0.5 and info["delta_used"] > 0.01
    # Each weight on its own within delta: the 1.2 % and 2 % weights need delta doubled.
    idx_each, _, info_each = choose(w, 6, levels, 0.01, GAMMA, "each")
    assert set(idx_each.tolist()) == taken_first and info_each["delta_used"] == 0.02
    with pytest.raises(ValueError, match="unknown fixing rule"):
        choose(w, 1, levels, 0.01, GAMMA, "median")


def test_mask_state_round_trips_compactly():
    mask = torch.rand(256, 3136, generator=torch.Generator().manual_seed(0)) < 0.9
    text = encode_mask(mask)
    assert torch.equal(decode_mask(text, (256, 3136)), mask) and len(text) < mask.numel() / 6
    json.dumps(text)
    with pytest.raises(ValueError, match="does not fit"):
        decode_mask(text, (10, 10))


@pytest.mark.pipeline  # trains: seconds each, kept out of the fast tier
def test_fixed_weights_stay_exact_through_retraining_with_momentum_and_weight_decay(trained, data):
    model = copy.deepcopy(trained)
    cfg = WFNConfig(optimizer="sgd", lr=0.05, weight_decay=5e-3, epochs_per_iteration=0.3, loss="labels",
                    regularisation_ratio=0.5)
    masks = {n: torch.zeros(m.weight.shape, dtype=torch.bool) for n, m in fixable(model)}
    fix_to(model, cfg, masks, 0.6)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.6 * sum(m.numel() for m in masks.values()))
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    levels = candidate_levels(cfg.max_order, cfg.zero_distance, 10.0)
    used = np.union1d(np.unique(torch.cat([before[n][m] for n, m in masks.items()]).double().numpy()), [0.0])
    assert set(used) <= set(levels[-1])  # every fixed value is a candidate
    batches, _ = _subsets(data)
    losses = retrain(model, cfg, masks, used, 0, batches, None, None)
    assert len(losses) > 10
    moved = 0
    for n, m in masks.items():
        after = model.get_submodule(n).weight.detach()
        assert torch.equal(after[m], before[n][m]), f"{n}: a fixed weight moved"
        moved += int((after[~m] != before[n][~m]).sum())
    assert moved > 0.9 * sum(int((~m).sum()) for m in masks.values())  # the free ones did train


@pytest.mark.pipeline  # trains: seconds each, kept out of the fast tier
def test_the_regulariser_pulls_free_weights_onto_the_values_in_use(trained, data):
    """What makes the next iteration fix onto the values already in use (few values, low
    entropy): after retraining with the term, far more free weights lie within delta of one of
    them than after the same retraining without it."""
    batches, _ = _subsets(data)

    def within_delta(ratio: float) -> float:
        model = copy.deepcopy(trained)
        cfg = WFNConfig(distance_allowed=0.01, epochs_per_iteration=1.0, regularisation_ratio=ratio)
        masks = {n: torch.zeros(m.weight.shape, dtype=torch.bool) for n, m in fixable(model)}
        fix_to(model, cfg, masks, 0.3)
        used = np.union1d(np.unique(torch.cat([model.get_submodule(n).weight.detach()[m] for n, m in masks.items()]).double().numpy()), [0.0])
        retrain(model, cfg, masks, used, 0, batches, trained, None)
        free = torch.cat([model.get_submodule(n).weight.detach()[~m] for n, m in masks.items()]).double().numpy()
        nearest_used = used[nearest(used, free)]
        rel = np.where(np.abs(free) < cfg.zero_distance, 0.0, np.abs(free - nearest_used) / np.abs(free))
        return float((rel <= cfg.distance_allowed).mean())

    without, default = within_delta(0.0), within_delta(WFNConfig().regularisation_ratio)
    print(f"free weights within delta of a value in use after retraining: {default:.1%} (ratio 5), {without:.1%} (ratio 0)")
    assert default > 2 * without and default > 0.5, (default, without)


@pytest.mark.pipeline  # trains: seconds each, kept out of the fast tier
def test_wfn_end_to_end_packs_bit_exact_and_small(trained, data, tmp_path):
    batches, test = _subsets(data)
    teacher_top1 = evaluate(trained, test)
    model = copy.deepcopy(trained)
    cfg = WFNConfig(fractions=[0.5, 0.9, 1.0], epochs_per_iteration=0.1, distance_allowed=0.01)
    model, stats = compress(model, cfg, train_batches=batches, teacher=trained)
    layers = [m for m in model.modules() if isinstance(m, PQLayer)]
    assert len(layers) == len(stats) == 5 and all(s["bytes"] > 0 for s in stats)
    # One network-wide set of few values, every one a signed sum of <= 2 powers of two, exact in f16.
    everything = torch.cat([m.weight.detach().reshape(-1) for m in layers]).double().numpy()
    values = np.unique(everything)
    assert len(values) <= 200 and set(values) <= set(candidate_levels(2, GAMMA, 8.0)[-1])
    unique, entropy = value_stats(everything)
    assert entropy < 4.5
    top1 = evaluate(model, test)
    assert top1 >= teacher_top1 - 3.0, (top1, teacher_top1)
    # The packed file holds exactly these weights, with f16 and with f32 codebooks.
    dense = tmp_path / "dense.mpk"
    dense_bytes = pack_model(trained, dense, ARCH)
    for dtype in ("f16", "f32"):
        path = tmp_path / f"wfn-{dtype}.mpk"
        size = pack_model(model, path, ARCH, codebook_dtype=dtype)
        assert size == os.path.getsize(path)
        loaded, _ = load_packed(path)
        for name, m in model.named_modules():
            if isinstance(m, PQLayer):
                assert torch.equal(loaded.get_submodule(name).weight, m.weight), (dtype, name)
        assert size < 0.3 * dense_bytes, (size, dense_bytes)
    print(f"teacher {teacher_top1:.2f} wfn {top1:.2f}, {unique} values, {entropy:.3f} bits/weight, "
          f"{os.path.getsize(tmp_path / 'wfn-f16.mpk')} bytes vs {dense_bytes} fp16 dense")


@pytest.mark.pipeline  # trains: seconds each, kept out of the fast tier
def test_a_resumed_run_equals_an_uninterrupted_one(trained, data):
    """Each step from a checkpoint (the model packed in f32, the record through JSON) gives the
    same weights as the loop in one process: what the pipeline's kill-and-resume relies on."""
    batches, _ = _subsets(data, n_train=1000)
    cfg = WFNConfig(fractions=[0.4, 0.8, 1.0], epochs_per_iteration=0.05, distance_allowed=0.015)
    straight = copy.deepcopy(trained)
    run_steps(METHOD.steps, straight, cfg, Context(train_batches=batches, teacher=trained))
    model, previous = copy.deepcopy(trained), None
    for index in range(3):
        ctx = Context(train_batches=batches, teacher=trained, previous=previous)
        record = METHOD.steps.run(model, cfg, index, ctx)
        assert record["done"] == (index == 2) and record["fraction_fixed"] == pytest.approx(cfg.fractions[index], abs=1e-6)
        previous = json.loads(json.dumps(record))
        path = f"/tmp/wfn-resume-{os.getpid()}.mpk"
        pack_model(model, path, ARCH, {"cycle": previous}, "f32", "f32")
        model = build_from_packed(read_packed(path))
        os.unlink(path)
    for (n, a), (_, b) in zip(model.named_parameters(), straight.named_parameters()):
        assert torch.equal(a, b), n
    masks = fixed_masks(model, cfg, Context(previous=previous), 3)
    assert all(bool(m.all()) for m in masks.values())


def test_identity_lets_a_longer_schedule_reuse_earlier_iterations():
    short, long = WFNConfig(fractions=[0.3, 0.6, 1.0]), WFNConfig(fractions=[0.3, 0.6, 0.9, 1.0])
    ident = METHOD.steps.identity
    assert ident(short, 1, Context()) == ident(long, 1, Context())
    assert ident(short, 2, Context()) != ident(long, 2, Context())
    assert ident(short, 3, Context()) is None
    assert ident(WFNConfig(fractions=[0.3, 1.0], distance_allowed=0.02), 0, Context()) != ident(short, 0, Context())
    assert METHOD.steps.count(long) == 4 and REGISTRY["wfn"] is METHOD


@pytest.mark.parametrize("field, value, message", [
    ("fractions", [0.5, 0.4, 1.0], "strictly increasing"),
    ("fractions", [0.5, 0.9], "end at 1.0"),
    ("fractions", [0.0, 1.0], "in \\(0, 1\\]"),
    ("fractions", [], "at least one"),
    ("distance_allowed", 0.0, "greater than 0"),
    ("zero_distance", -1.0, "greater than 0"),
    ("max_order", 4, "less than or equal to 3"),
])
def test_bad_settings_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValidationError, match=message) as err:
        WFNConfig(**{field: value})
    assert field in str(err.value)


def test_check_refuses_what_the_model_cannot_take_before_any_work():
    from modelpress.models import build_model
    from modelpress.recipe import Recipe

    model = build_model("fmnist_cnn")
    with pytest.raises(ValueError, match="'features.9' matches no Conv2d/Linear layer"):
        METHOD.check(model, WFNConfig(exclude=["features.9"]), Context())
    with pytest.raises(ValueError, match="no layer to fix"):
        METHOD.check(model, WFNConfig(exclude=["*"]), Context())
    with pytest.raises(ValueError, match="codebook_dtype i8"):
        METHOD.check(model, WFNConfig(), Context(codebook_dtype="i8"))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    METHOD.check(grouped, WFNConfig(), Context())  # grouped convolutions are fixed like any other
    with pytest.raises(ValueError, match="method.fractions: .*end at 1.0"):
        Recipe.parse({"method": {"name": "wfn", "fractions": [0.5, 0.9]}})
    recipe = Recipe.parse({"method": {"name": "wfn", "distance_allowed": 0.0075}})
    assert recipe.method.distance_allowed == 0.0075 and "delta=0.0075" in recipe.method.key_params()


@pytest.mark.pipeline
def test_pipeline_resumes_at_the_unfinished_iteration_and_keeps_the_values_through_finetuning(trained_workdir, tmp_path):
    """Through the pipeline's stages: a run stopped after iteration 1 (its checkpoint only)
    resumes at iteration 2 and ends bit-identical to an uninterrupted run; the final
    fine-tuning and packing leave every fixed value where it was."""
    method = {"name": "wfn", "fractions": [0.6, 1.0], "epochs_per_iteration": 0.01}
    ref, work = tmp_path / "ref", tmp_path / "resumed"
    shutil.copytree(trained_workdir, ref)
    shutil.copytree(trained_workdir, work)
    stages.compress_stage(tiny_recipe(ref, method=method))
    recipe = tiny_recipe(work, method=method)
    first = stages.method_step(recipe, 0)
    assert first["fraction_fixed"] == pytest.approx(0.6, abs=1e-6) and not first["done"]
    assert not (work / "compress" / "cycles" / "cycle-02.mpk").exists()
    stages.compress_stage(recipe)

    def weights(path):
        model = build_from_packed(read_packed(path))
        return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    a, b = weights(ref / "compress" / "compressed.mpk"), weights(work / "compress" / "compressed.mpk")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    cycles = stages.read_json(work / "compress" / "cycles.json")["cycles"]
    assert [c["iteration"] for c in cycles] == [1, 2] and all("state" not in c and "top1" in c for c in cycles)
    assert cycles[-1]["unique_values"] == len(torch.unique(torch.cat([w.reshape(-1) for w in b.values()])))
    stages.finetune_stage(recipe)
    stages.pack_stage(recipe)
    final = weights(work / "model.mpk")
    assert all(torch.equal(final[n], b[n]) for n in b)
