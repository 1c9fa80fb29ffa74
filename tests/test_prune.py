"""Iterative magnitude pruning on real data: global thresholds, masks held through training,
the cycle schedule, sparse packing to real bytes, pruning followed by quantization."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from modelpress.methods import compress
from modelpress.methods.prune import (
    PruneConfig,
    PrunePQConfig,
    keep_masks,
    masks_of,
    prunable,
    prune_cycle,
    prune_to,
    schedule,
    sparsity,
)
from modelpress.methods.prune.imp import check_budget, next_sparsity
from modelpress.models import build_model
from modelpress.pack import load_packed, pack_model, read_packed
from modelpress.pack.format import decode_positions, encode_positions, packed_nbytes
from modelpress.train import cosine_lr, evaluate, loader, lr_multiplier

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]
ARCH = {"name": "fmnist_cnn", "kwargs": {}}


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in prunable(model)}


def test_schedule_prunes_a_share_of_the_remaining_weights_and_stops_exactly():
    assert schedule(0.5, 0.2) == [0.2, 0.36, 0.488, 0.5]
    steps = schedule(0.95, 0.2, [0.5, 0.8, 0.9])
    assert {0.5, 0.8, 0.9} <= set(steps) and steps[-1] == 0.95
    assert steps == sorted(steps)
    # Between stops each cycle removes at most 20 % of what is left.
    for a, b in zip([0.0] + steps, steps):
        assert (1 - b) >= (1 - a) * 0.8 - 1e-9
    # A run to 90 % with the same stops is a prefix of the run to 95 %: its cycles are reusable.
    assert schedule(0.9, 0.2, [0.5, 0.8]) == steps[: steps.index(0.9) + 1]


def test_global_threshold_across_layers(trained):
    model = copy.deepcopy(trained)
    before = _weights(model)
    bn_before = model.features[0][1].weight.detach().clone()
    masks = prune_to(model, 0.9)
    assert sparsity(model) == pytest.approx(0.9, abs=1e-6)
    # One threshold for all layers: every pruned weight is smaller than every kept weight.
    pruned = torch.cat([before[n][~m].abs().reshape(-1) for n, m in masks.items()])
    kept = torch.cat([before[n][m].abs().reshape(-1) for n, m in masks.items()])
    assert pruned.max() <= kept.min()
    # ...so layers end with different sparsities (the big classifier layer loses most).
    per_layer = {n: 1 - float(m.float().mean()) for n, m in masks.items()}
    assert per_layer["classifier.2"] > 0.9 > per_layer["features.0.0"]
    # Biases and BatchNorm are never pruned.
    assert torch.equal(model.features[0][1].weight, bn_before)
    assert (model.classifier[2].bias != 0).all()
    # Pruning further keeps every earlier zero.
    prune_to(model, 0.95)
    for n, m in masks.items():
        assert (model.get_submodule(n).weight[~m] == 0).all()


def test_exclusions_are_not_pruned_and_must_exist(trained):
    model = copy.deepcopy(trained)
    first = model.features[0][0].weight.detach().clone()
    prune_to(model, 0.8, exclude=["features.0.0"])
    assert torch.equal(model.features[0][0].weight, first)
    assert sparsity(model, ["features.0.0"]) == pytest.approx(0.8, abs=1e-6)
    with pytest.raises(ValueError, match="'features.9' matches no Conv2d/Linear layer"):
        prune_to(model, 0.8, exclude=["features.9"])
    with pytest.raises(ValueError, match="no prunable layers"):
        prunable(nn.Sequential(nn.Flatten(), nn.ReLU()))
    with pytest.raises(ValueError, match="no prunable layers"):
        prunable(model, ["*"])


def test_masks_hold_through_training_with_momentum_and_weight_decay(trained, data):
    model = copy.deepcopy(trained)
    masks = prune_to(model, 0.7)
    kept_before = {n: model.get_submodule(n).weight[m].clone() for n, m in masks.items()}
    train, _ = data
    batches = loader(torch.utils.data.Subset(train, range(1024)), 128, True)
    from modelpress.train import train_classifier

    with keep_masks(model, masks):
        train_classifier(model, batches, 1.0, 0.05, optimizer="sgd", weight_decay=5e-4)
    for n, m in masks.items():
        w = model.get_submodule(n).weight
        assert (w[~m] == 0).all(), n  # not revived by gradients, momentum or decay
        assert not torch.equal(w[m], kept_before[n]), n  # the survivors did train
    assert masks_of(model).keys() == masks.keys()


def test_lr_rewinding_replays_the_tail_of_the_original_schedule():
    # A 10-step retrain inside a 30-step schedule sees its steps 20..29.
    f = lr_multiplier("cosine", 10, 30, warmup_frac=0.1)
    assert [f(s) for s in range(10)] == [cosine_lr(s + 20, 30, 3) for s in range(10)]
    full = lr_multiplier("cosine", 30, 30, warmup_frac=0.1)
    assert full(0) == pytest.approx(1 / 3)  # replaying the whole schedule includes its warm-up
    assert lr_multiplier("constant", 10, 30)(7) == 1.0


@pytest.mark.pipeline  # retrains a model
def test_prune_cycle_is_deterministic_and_keeps_accuracy(trained, data):
    train, test = data
    sub_test = loader(torch.utils.data.Subset(test, range(2000)), 500, False)
    cfg = PruneConfig(target_sparsity=0.8, epochs=0.3, lr=0.02, weight_decay=5e-4, rewind_fraction=1.0)
    batches = loader(torch.utils.data.Subset(train, range(6000)), 128, True)
    a, b = copy.deepcopy(trained), copy.deepcopy(trained)
    sa = prune_cycle(a, cfg, 3, 0.8, batches)
    prune_cycle(b, cfg, 3, 0.8, batches)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    assert sa["sparsity"] == pytest.approx(0.8, abs=1e-6) and sa["cycle"] == 4
    # Pruning 80 % at once without retraining hurts; the retrained model recovers.
    raw = copy.deepcopy(trained)
    prune_to(raw, 0.8)
    acc_teacher, acc_raw, acc_retrained = (evaluate(m, sub_test) for m in (trained, raw, a))
    assert acc_retrained > acc_raw, (acc_teacher, acc_raw, acc_retrained)
    assert acc_retrained > acc_teacher - 3, (acc_teacher, acc_raw, acc_retrained)


def test_sparse_positions_pick_the_smaller_coding():
    rng = np.random.default_rng(0)
    for density in (0.0, 0.001, 0.05, 0.3, 0.5, 0.9, 1.0):
        mask = rng.random(100_003) < density
        p, buf = encode_positions(mask)
        assert np.array_equal(decode_positions(p, buf, mask.size, int(mask.sum())), np.flatnonzero(mask))
        assert len(buf) <= -(-mask.size // 8)  # never worse than the bitmask
    assert encode_positions(rng.random(10_000) < 0.5)[0]["pos"] == "bitmask"
    assert encode_positions(rng.random(10_000) < 0.05)[0]["pos"] == "delta"


def test_pruned_model_packs_to_real_bytes(trained, data, tmp_path):
    model = copy.deepcopy(trained)
    prune_to(model, 0.9)
    path = tmp_path / "pruned.mpk"
    size = pack_model(model, path, ARCH)
    assert size == os.path.getsize(path) == packed_nbytes(model, arch=ARCH)
    dense = pack_model(trained, tmp_path / "dense.mpk", ARCH)
    assert size < dense / 4  # 10 % of the weights: positions + fp16 values
    rows = {r["tensor"]: r for r in read_packed(path).summary()}
    big = rows["classifier.2.weight"]
    assert big["encoding"] == "sparse"
    kept = int((model.classifier[2].weight != 0).sum())
    assert big["bytes"] < kept * 2 + 802816 / 8  # fp16 values + at most a bitmask
    loaded, _ = load_packed(path)
    for n, _ in prunable(model):
        w, w2 = model.get_submodule(n).weight, loaded.get_submodule(n).weight
        assert torch.equal(w2 == 0, w == 0), n  # the same zeros
        assert torch.equal(w2, w.half().float()), n  # fp16 values, nothing else lost
    _, test = data
    x = next(iter(loader(test, 256, False)))[0]
    half = copy.deepcopy(model)
    for n, _ in prunable(half):
        half.get_submodule(n).weight.data = half.get_submodule(n).weight.data.half().float()
    assert torch.allclose(loaded(x), half.eval()(x), atol=1e-2)


@pytest.mark.pipeline  # retrains a model
def test_prune_then_quantize_survivors(trained, data, tmp_path):
    train, test = data
    cfg = PrunePQConfig.model_validate({
        "prune": {"target_sparsity": 0.8, "rate": 0.5, "epochs": 0.1, "lr": 0.02, "weight_decay": 5e-4},
        "quantize": {"k": 16, "finetune_epochs": 0.05},
    })
    model = copy.deepcopy(trained)
    batches = loader(torch.utils.data.Subset(train, range(6000)), 128, True)
    model, stats = compress(model, cfg, train_batches=batches, teacher=trained, calibration=None)
    assert {s["k"] for s in stats} == {16} and len(stats) == 5
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "codebook"):
                m.codebook.copy_(m.codebook.half().float())  # what the packed file stores
    path = tmp_path / "prune_pq.mpk"
    size = pack_model(model, path, ARCH, float_dtype="f32")  # exact biases/BatchNorm: compare outputs tightly
    pruned_only = copy.deepcopy(trained)
    prune_to(pruned_only, 0.8)
    assert size < packed_nbytes(pruned_only, "f32") * 0.45  # 4-bit values instead of fp16
    loaded, _ = load_packed(path)
    x = next(iter(loader(test, 256, False)))[0]
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-4)
    w = loaded.classifier[2].weight
    assert float((w == 0).float().mean()) > 0.8 and len(torch.unique(w[w != 0])) <= 16
    trainable, _ = load_packed(path, materialize=False)  # codebooks + masks back, for more tuning
    assert torch.equal(trainable.classifier[2].weight, w)
    assert evaluate(loaded, loader(torch.utils.data.Subset(test, range(2000)), 500, False)) > 60


@pytest.mark.pipeline  # prunes and packs many times: seconds
def test_byte_budget(trained):
    at_85 = copy.deepcopy(trained)
    prune_to(at_85, 0.85)
    budget = packed_nbytes(at_85)
    cfg = PruneConfig(target_sparsity=0.5, target_bytes=budget, epochs=1, lr=0.01, weight_decay=0)
    model = copy.deepcopy(trained)
    check_budget(model, cfg)
    assert next_sparsity(model, cfg) == pytest.approx(0.2)  # far from the budget: a normal 20 % step
    prune_to(model, 0.84)
    s = next_sparsity(model, cfg)  # a 20 % step would reach 87.2 %: stop where the file fits
    assert s == pytest.approx(0.85, abs=2e-4)
    trial = copy.deepcopy(model)
    prune_to(trial, s)
    assert packed_nbytes(trial) <= budget < packed_nbytes(model)
    prune_to(model, s)
    assert next_sparsity(model, cfg) is None  # goal met
    with pytest.raises(ValueError, match=r"smallest reachable packed size is \d+ bytes"):
        check_budget(trained, cfg.model_copy(update={"target_bytes": 1_000}))


def test_weight_rewinding_resets_survivors_to_the_earlier_weights(trained, data):
    train, _ = data
    torch.manual_seed(1)
    early = build_model("fmnist_cnn").state_dict()  # stands in for the weights early in training
    cfg = PruneConfig(target_sparsity=0.5, retrain="weight_rewind", epochs=0.02, lr=1e-12, weight_decay=0)
    batches = loader(torch.utils.data.Subset(train, range(512)), 128, True)
    with pytest.raises(ValueError, match="weight_rewind"):
        prune_cycle(copy.deepcopy(trained), cfg, 0, 0.5, batches)
    model = copy.deepcopy(trained)
    prune_cycle(model, cfg, 0, 0.5, batches, rewind_state=early)
    reference = copy.deepcopy(trained)
    masks = prune_to(reference, 0.5)  # the masks come from the *trained* magnitudes
    for n, m in masks.items():
        w = model.get_submodule(n).weight
        assert torch.equal(w != 0, m), n
        assert torch.allclose(w[m], early[f"{n}.weight"][m], atol=1e-6), n  # ...the values from the early weights


def test_compress_returns_the_cycles_of_a_pruning(trained, data):
    """The README's notebook call, `pruned, cycles = compress(model, PruneConfig(...), train_batches=...)`."""
    train, _ = data
    cfg = PruneConfig(target_sparsity=0.5, epochs=0.02, lr=0.01, weight_decay=0)
    pruned, cycles = compress(copy.deepcopy(trained), cfg, train_batches=loader(torch.utils.data.Subset(train, range(512)), 128, True))
    assert [round(c["sparsity"], 3) for c in cycles] == schedule(0.5, 0.2) and cycles[-1]["done"]
    assert sparsity(pruned) == pytest.approx(0.5, abs=1e-6)
