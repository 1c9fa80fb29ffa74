"""Product quantization on a real (briefly trained) Fashion-MNIST CNN with real activations.

The key claim of the method: clustering weight sub-vectors in the metric of the layer's
input activations (G = X^T X) gives a lower layer-*output* error than plain weight-space
k-means at the same size (same k, same block), also on images it was not fitted on.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modelpress.methods.pq import BlockSpec, PQConfig, PQLayer, plan, quantize_pq
from modelpress.methods.pq.kmeans import assign, gram_kmeans, objective
from modelpress.methods.pq.layer import input_rows, to_subvectors
from modelpress.methods.pq.quantize import input_gram, output_error
from modelpress.stages import calibration_images
from modelpress.train import evaluate, loader

FMNIST = "/usr/share/datasets/fashion-mnist"


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def calib(data):
    """Calibration images (training split) and held-out images (test split): disjoint sets."""
    train, test = data
    return calibration_images(train, 1024, seed=1), test.tensors[0][:1024]


def layer_input(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The tensor ``layer`` receives when ``model`` runs on ``images``."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        handle.remove()
    return seen[0]


def dense_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output on x with another weight (no bias: it cancels in the error)."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight)


# ---- 1. the key requirement: activation-weighted beats weight-space k-means ------------------

@pytest.mark.pipeline  # seconds of k-means and distillation: kept out of the fast tier
@pytest.mark.parametrize("name, block", [("features.2.0", 9), ("classifier.2", 8)])
def test_activation_weighted_kmeans_lowers_layer_output_error(trained, calib, name, block):
    fit_images, heldout_images = calib
    layer = trained.get_submodule(name)
    w = to_subvectors(layer.weight.detach(), block)
    g_fit = input_gram(trained, layer, fit_images, block)
    g_heldout = input_gram(trained, layer, heldout_images, block)
    k = 64  # same k and block for both: exactly the same number of bytes
    c_act, codes_act, _ = gram_kmeans(w, k, g_fit, iters=20, seed=0)
    c_plain, codes_plain, _ = gram_kmeans(w, k, None, iters=20, seed=0)
    assert c_act.shape == c_plain.shape == (k, block)
    w_act, w_plain = c_act[codes_act], c_plain[codes_plain]

    # On the images the codebook was fitted on ...
    err_act, err_plain = output_error(w, w_act, g_fit), output_error(w, w_plain, g_fit)
    assert 0 < err_act < err_plain < 1, (err_act, err_plain)
    # ... on held-out images (another split), so the win is not overfitting to the calibration set ...
    held_act, held_plain = output_error(w, w_act, g_heldout), output_error(w, w_plain, g_heldout)
    assert 0 < held_act < held_plain < 1, (held_act, held_plain)
    # ... and on the layer's true output (cross-block terms included), held-out images again.
    x = layer_input(trained, layer, heldout_images[:256])
    y = dense_output(layer, x, layer.weight.detach())
    true_err = [
        float((dense_output(layer, x, wh.reshape(layer.weight.shape)) - y).pow(2).sum() / y.pow(2).sum())
        for wh in (w_act, w_plain)
    ]
    assert true_err[0] < true_err[1], true_err
    # Plain k-means is the better fit in weight space: the win is from the metric, not a better optimiser.
    assert (w - w_plain).norm() < (w - w_act).norm()


# ---- 2. gram_kmeans correctness --------------------------------------------------------------

def random_psd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=gen, dtype=torch.float64)
    a[0] *= 10  # strongly anisotropic, so the metric matters
    return a @ a.T / (3 * d)


def random_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_identity_metric_objective_is_sum_of_squared_distances():
    w = random_rows(600, 4, seed=1)
    c, codes, info = gram_kmeans(w, 16, None, iters=30, seed=0)
    sq = float((w.double() - c.double()[codes]).pow(2).sum())
    assert info["objective"] == pytest.approx(sq, rel=1e-6)
    c_eye, codes_eye, info_eye = gram_kmeans(w, 16, torch.eye(4), iters=30, seed=0)
    assert torch.equal(codes, codes_eye) and torch.equal(c, c_eye)
    assert info_eye["objective"] == pytest.approx(info["objective"], rel=1e-12)


def test_codes_are_brute_force_nearest_centroids_and_centroids_are_member_means():
    w, g = random_rows(500, 6, seed=2), random_psd(6, seed=3)
    k = 12
    c, codes, info = gram_kmeans(w, k, g, iters=300, seed=0)  # small problem: converges
    wd, cd = w.double(), c.double()
    diff = wd[:, None, :] - cd[None, :, :]  # (n, k, d)
    dist = torch.einsum("nkd,de,nke->nk", diff, g, diff)
    assert torch.equal(codes, dist.argmin(1))
    # The brute-force nearest centroid is NOT the Euclidean nearest one for many rows: G matters.
    assert (dist.argmin(1) != (diff.pow(2).sum(2)).argmin(1)).sum() > 10
    assert info["objective"] == pytest.approx(float(dist.min(1).values.sum()), rel=1e-5)
    assert info["empty_final"] == 0 and codes.min() >= 0 and codes.max() < k
    for j in range(k):
        members = wd[codes == j]
        assert len(members) > 0
        torch.testing.assert_close(cd[j], members.mean(0), rtol=1e-5, atol=1e-6)
    # The library's chunked assignment gives the same codes as the brute force.
    assert torch.equal(assign(wd, cd, g), codes)


def test_objective_never_increases_with_more_iterations():
    w, g = random_rows(2000, 8, seed=4), random_psd(8, seed=5)
    objs = [gram_kmeans(w, 32, g, iters=it, seed=7)[2]["objective"] for it in (0, 1, 2, 5, 20)]
    for before, after in zip(objs, objs[1:]):
        assert after <= before * (1 + 1e-9), objs
    assert objs[-1] < 0.95 * objs[0], objs  # the iterations do real work


def test_more_centroids_than_subvectors_is_an_error():
    with pytest.raises(ValueError, match="k=11"):
        gram_kmeans(random_rows(10, 3, seed=0), 11)


def test_unknown_init_is_an_error():
    with pytest.raises(ValueError, match="init"):
        gram_kmeans(random_rows(10, 3, seed=0), 2, init="nope")


@pytest.mark.parametrize("init", ["kmeans++", "random"])
@pytest.mark.parametrize("repair", [True, False])
def test_duplicate_rows_leave_empty_clusters_without_nan(init, repair):
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(5, 4, generator=gen)
    w = distinct[torch.randint(5, (300,), generator=gen)]
    assert len(torch.unique(w, dim=0)) == 5
    k = 8
    c, codes, info = gram_kmeans(w, k, random_psd(4, seed=1), iters=10, seed=0, init=init, repair_empty=repair)
    assert torch.isfinite(c).all()
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < k
    used = torch.unique(codes).numel()
    assert info["empty_final"] == k - used > 0  # 5 distinct vectors cannot fill 8 clusters
    if repair:
        assert info["empty_repaired"] > 0
    else:
        assert info["empty_repaired"] == 0
    if init == "kmeans++":  # k-means++ seeds every distinct vector: exact reconstruction
        assert used == 5
        assert info["objective"] < 1e-10
        assert torch.allclose(c[codes], w, atol=1e-6)


# ---- 3. the Gram shortcut is the explicit sum over activation rows ----------------------------

def test_gram_objective_equals_explicit_activation_form(trained, calib):
    layer = trained.get_submodule("features.2.0")
    images = calib[0][:2]
    x = layer_input(trained, layer, images)
    rows = input_rows(layer, x, 9).double()  # (N * 14 * 14 * 32, 9)
    assert rows.shape == (2 * 14 * 14 * 32, 9)
    g = rows.T @ rows
    torch.testing.assert_close(input_gram(trained, layer, images, 9), g, rtol=1e-10, atol=1e-8)

    w = to_subvectors(layer.weight.detach(), 9).double()
    c, codes, info = gram_kmeans(w, 64, g, iters=10, seed=0)
    r = w - c.double()[codes]  # (2048, 9)
    explicit = sum(float((rows @ r[i:i + 256].T).pow(2).sum()) for i in range(0, len(r), 256))
    assert objective(w, c.double(), codes, g) == pytest.approx(explicit, rel=1e-6)
    # info's objective uses the centroids before their cast to float32.
    assert info["objective"] == pytest.approx(explicit, rel=1e-4)
    # and output_error is the same quantity, relative to ||X W||^2
    total = sum(float((rows @ w[i:i + 256].T).pow(2).sum()) for i in range(0, len(w), 256))
    assert output_error(w, c.double()[codes], g) == pytest.approx(explicit / total, rel=1e-6)


# ---- 4. PQLayer and quantize_pq ------------------------------------------------------------

@pytest.mark.parametrize("name, block", [("features.2.0", 9), ("classifier.5", 8)])
def test_pqlayer_forward_equals_dense_layer_with_decoded_weight(trained, calib, name, block):
    layer = trained.get_submodule(name)
    w = to_subvectors(layer.weight.detach(), block)
    codebook, codes, _ = gram_kmeans(w, 32, None, iters=5)
    pq = PQLayer(layer, codebook, codes, block)
    dense = copy.deepcopy(layer)
    with torch.no_grad():
        dense.weight.copy_(codebook[codes].reshape(layer.weight.shape))
    assert not torch.equal(dense.weight, layer.weight)  # it is really quantized
    x = layer_input(trained, layer, calib[1][:16])
    with torch.no_grad():
        torch.testing.assert_close(pq(x), dense(x), rtol=1e-6, atol=1e-5)
    # Only the codebook (and bias) train; the codes are a buffer.
    assert {n for n, _ in pq.named_parameters()} == {"codebook"} | ({"bias"} if layer.bias is not None else set())
    pq(x).pow(2).mean().backward()
    assert pq.codebook.grad is not None and pq.codebook.grad.abs().sum() > 0


@pytest.mark.pipeline  # seconds of k-means and distillation: kept out of the fast tier
def test_quantize_pq_replaces_planned_layers_and_resume_is_a_no_op(trained, data, calib):
    # Default blocks; k=64 for the linear layers keeps the 100k sub-vectors of classifier.2 cheap.
    cfg = PQConfig(kmeans_iters=5, layer_finetune_epochs=0, linear=BlockSpec(block_size=8, k=64))
    planned = [name for name, _ in plan(trained, cfg)]
    assert planned == ["features.2.0", "features.4.0", "classifier.2", "classifier.5"]
    student = copy.deepcopy(trained)
    student, stats = quantize_pq(student, cfg, calib[0][:256], teacher=trained)
    for name in planned:
        assert isinstance(student.get_submodule(name), PQLayer), name
    assert isinstance(student.get_submodule("features.0.0"), nn.Conv2d)  # 288 weights: stays dense
    assert torch.equal(student.features[0][0].weight, trained.features[0][0].weight)
    assert [s["layer"] for s in stats] == planned
    for s in stats:
        layer = student.get_submodule(s["layer"])
        assert s["k"] == layer.k == min(64 if s["layer"].startswith("classifier") else 256, s["subvectors"])
        assert 0 < s["output_rel_error"] < 1 and 0 < s["weight_rel_error"] < 1
        assert s["bytes"] < 2 * s["weights"]  # smaller than fp16
    # The quantized model is still a classifier (no fine-tuning at all here).
    _, test = data
    batches = loader(torch.utils.data.Subset(test, range(2000)), 500, False)
    acc_dense, acc_pq = evaluate(trained, batches), evaluate(student, batches)
    assert acc_pq > acc_dense - 10, (acc_dense, acc_pq)

    # Resume: every planned layer is already a PQLayer, so nothing changes.
    before = {n: (m.codebook.detach().clone(), m.codes.clone()) for n, m in student.named_modules() if isinstance(m, PQLayer)}
    again, stats2 = quantize_pq(student, cfg, calib[0][:256], teacher=trained)
    assert again is student and stats2 == []
    for n, (cb, codes) in before.items():
        m = student.get_submodule(n)
        assert torch.equal(m.codebook, cb) and torch.equal(m.codes, codes)


def test_quantize_pq_resumes_a_partly_quantized_student(trained, calib):
    """A checkpoint with the first layers done: only the rest is quantized, the done layers are
    untouched, and the result is exactly that of an uninterrupted run (same seeds per layer)."""
    cfg = PQConfig(kmeans_iters=3, layer_finetune_epochs=0, linear=BlockSpec(block_size=8, k=16))
    images = calib[0][:128]
    reference, _ = quantize_pq(copy.deepcopy(trained), cfg, images, teacher=trained)

    class Stop(Exception):
        pass

    done: list[str] = []

    def stop_after_two(name, _student, _stats):
        done.append(name)
        if len(done) == 2:
            raise Stop

    student = copy.deepcopy(trained)
    with pytest.raises(Stop):
        quantize_pq(student, cfg, images, teacher=trained, on_layer=stop_after_two)
    assert done == ["features.2.0", "features.4.0"]
    assert not isinstance(student.get_submodule("classifier.2"), PQLayer)
    first = {n: student.get_submodule(n).codebook.detach().clone() for n in done}
    with pytest.raises(ValueError, match="needs the dense teacher"):
        quantize_pq(student, cfg, images)
    _, stats = quantize_pq(student, cfg, images, teacher=trained)
    assert [s["layer"] for s in stats] == ["classifier.2", "classifier.5"]
    assert [s["index"] for s in stats] == [2, 3]
    for n, cb in first.items():
        assert torch.equal(student.get_submodule(n).codebook, cb)
    for n, m in reference.named_modules():
        if isinstance(m, PQLayer):
            resumed = student.get_submodule(n)
            assert torch.equal(resumed.codes, m.codes) and torch.equal(resumed.codebook, m.codebook), n


# ---- 5. plan() errors ----------------------------------------------------------------------

def test_plan_rejects_exclude_pattern_matching_no_layer(trained):
    with pytest.raises(ValueError, match=r"'classifer\.\*'"):
        plan(trained, PQConfig(exclude=["classifer.*"]))
    with pytest.raises(ValueError, match=r"'features\.9\.0'"):
        plan(trained, PQConfig(overrides={"features.9.0": BlockSpec(block_size=9, k=16)}))
    # A pattern that does match is honoured.
    assert [n for n, _ in plan(trained, PQConfig(exclude=["classifier.*"]))] == ["features.2.0", "features.4.0"]


def test_plan_rejects_block_size_that_does_not_divide_the_input(trained):
    # 3136 = 7 * 448, so a linear block of 7 fits classifier.2 but not classifier.5 (256 inputs).
    with pytest.raises(ValueError, match=r"classifier\.5.*block size 7.*256"):
        plan(trained, PQConfig(linear=BlockSpec(block_size=7, k=256)))
    with pytest.raises(ValueError, match=r"classifier\.2.*block size 5.*3136"):
        plan(trained, PQConfig(overrides={"classifier.2": BlockSpec(block_size=5, k=256)}))


def test_depthwise_and_grouped_convolutions_are_quantized_with_their_groups():
    """Depthwise (groups = channels) and grouped convolutions are product-quantized like any
    layer, not left dense: one block per depthwise 3x3 kernel, rows of (in / groups) weights
    for a grouped 1x1. The PQ layer computes exactly the original layer with its decoded weight."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),  # depthwise: 32 kernels of 9
        nn.Conv2d(32, 64, 1, groups=4), nn.ReLU(),  # grouped pointwise: rows of 8
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()
    images = torch.randn(64, 3, 16, 16)
    cfg = PQConfig(kmeans_iters=3, layer_finetune_epochs=0, conv=BlockSpec(block_size=9, k=8),
                   pointwise=BlockSpec(block_size=4, k=16), linear=BlockSpec(block_size=4, k=16))
    planned = dict(plan(model, cfg))
    assert {"2", "4", "6"} <= set(planned) and planned["2"].block_size == 9 and planned["4"].block_size == 4
    student, stats = quantize_pq(copy.deepcopy(model), cfg, images, teacher=model)
    for name in ("2", "4", "6"):
        layer = student.get_submodule(name)
        assert isinstance(layer, PQLayer) and layer.conv_args["groups"] == model.get_submodule(name).groups
        assert layer.codes.numel() == model.get_submodule(name).weight.numel() // planned[name].block_size
        assert 0 < next(s for s in stats if s["layer"] == name)["output_rel_error"] < 1
    decoded = copy.deepcopy(model)  # the original layers, each PQ layer's decoded weight in them
    with torch.no_grad():
        for name, m in student.named_modules():
            if isinstance(m, PQLayer):
                decoded.get_submodule(name).weight.copy_(m.weight)
        assert torch.allclose(student(images), decoded(images), atol=1e-5, rtol=1e-5)


def test_mobilenet_v2_depthwise_layers_pack_and_load_exactly(tmp_path):
    """torchvision's MobileNetV2 (built offline, no weights): its 17 depthwise convolutions are in
    the plan (none left dense for being grouped); the packed file, rebuilt from the torchvision
    builder's name, gives the compressed model's outputs exactly."""
    from modelpress.models import build_model
    from modelpress.pack import arch_spec, load_packed, pack_model

    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v2", num_classes=10).eval()
    depthwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert len(depthwise) == 17
    cfg = PQConfig(kmeans_iters=1, layer_finetune_epochs=0, conv=BlockSpec(block_size=9, k=16),
                   pointwise=BlockSpec(block_size=4, k=16), linear=BlockSpec(block_size=4, k=16))
    assert depthwise <= {n for n, _ in plan(model, cfg)}
    images = torch.randn(16, 3, 32, 32)
    student, _ = quantize_pq(copy.deepcopy(model), cfg, images, teacher=model)
    assert all(isinstance(student.get_submodule(n), PQLayer) for n in depthwise)
    path = tmp_path / "mobilenet.mpk"
    size = pack_model(student, path, arch_spec("torchvision:mobilenet_v2", num_classes=10), codebook_dtype="f32",
                      float_dtype="f32")
    assert size == path.stat().st_size < sum(p.numel() for p in model.parameters())  # < 1 byte per weight
    loaded, _ = load_packed(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), student.eval()(images))

