"""The baselines the sweep measures our methods against: per-channel uniform quantization
(its own packed entry) and Deep Compression's scalar k-means weight sharing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modelpress import KMeansConfig, UniformConfig, compress
from modelpress.methods.pq import PQLayer
from modelpress.methods.pq.kmeans import gram_kmeans
from modelpress.methods.uniform import UniformLayer
from modelpress.pack import arch_spec, load_packed, pack_model, read_packed
from modelpress.pack.format import build_from_packed
from modelpress.stages import calibration_images
from modelpress.train import evaluate, loader

ARCH = arch_spec("fmnist_cnn", num_classes=10, in_channels=1)
pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _top1(model, data, n=2000):
    _, test = data
    return evaluate(model, loader(torch.utils.data.Subset(test, range(n)), 500, False))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_uniform_round_trip_and_size(trained, data, tmp_path, bits):
    model, stats = compress(copy.deepcopy(trained), UniformConfig(bits=bits))
    layers = [m for m in model.modules() if isinstance(m, UniformLayer)]
    assert len(layers) == len(stats) == 5
    for m in layers:  # every weight on one of 2**bits evenly spaced levels of its channel
        assert int(m.codes.max()) < 2 ** bits and int(m.codes.min()) >= 0
    path = tmp_path / "u.mpk"
    size = pack_model(model, path, ARCH, {}, "f32", "f32")
    entries = {n: (enc, p) for n, enc, p, _ in read_packed(path).entries}
    for name, m in model.named_modules():
        if isinstance(m, UniformLayer):
            enc, p = entries[f"{name}.weight"]
            out = m.weight_shape[0]
            plain = 2 * 4 * out + math.ceil(m.codes.numel() * bits / 8)
            # bit-packed, or range coded where that is smaller (the codes of a real layer are skewed)
            assert enc == "affine" and (p["n"] == plain if "coder" not in p else p["n"] < plain)
    assert size == path.stat().st_size
    x = torch.stack([data[1][i][0] for i in range(64)])
    with torch.no_grad():
        want = model.eval()(x)
        dense, _ = load_packed(path)
        assert torch.equal(dense(x), want) or torch.allclose(dense(x), want, atol=1e-5)
        tunable = build_from_packed(read_packed(path), materialize=False).eval()
        assert any(isinstance(m, UniformLayer) for m in tunable.modules())
        assert torch.allclose(tunable(x), want, atol=1e-5)


def test_uniform_error_follows_the_bits(trained, data):
    """8 bits per channel is all but lossless on a real model; each bit less doubles the error."""
    base = _top1(trained.eval(), data)
    assert abs(_top1(compress(copy.deepcopy(trained), UniformConfig(bits=8))[0].eval(), data) - base) <= 0.3
    err = {b: [s["weight_rel_error"] for s in compress(copy.deepcopy(trained), UniformConfig(bits=b))[1]] for b in (8, 4, 2)}
    for e8, e4, e2 in zip(err[8], err[4], err[2]):
        assert 8 < e4 / e8 < 32 and 2 < e2 / e4 < 8, err


def test_scalar_kmeans_is_block1_weight_sharing(trained, data):
    """Deep Compression: 2**bits shared values per layer from k-means on the weights."""
    train, _ = data
    model, stats = compress(copy.deepcopy(trained), KMeansConfig(bits=3, kmeans_iters=10),
                            calibration=calibration_images(train, 64, 0))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PQLayer)}
    assert len(layers) == 5 and all(m.block_size == 1 and m.k == 8 for m in layers.values())
    for name, m in layers.items():
        assert torch.unique(m.weight).numel() <= 8
        assert stats[[s["layer"] for s in stats].index(name)]["weight_rel_error"] < 0.5


def test_linear_init_spans_the_weights():
    w = torch.tensor([[-1.0], [-0.9], [0.0], [0.1], [2.0], [1.9]])
    c, codes, _ = gram_kmeans(w, 3, iters=0, init="linear")
    assert torch.allclose(c.flatten().sort().values, torch.tensor([-0.95, 0.05, 1.95]), atol=1e-6)
    with pytest.raises(ValueError, match="length 1"):
        gram_kmeans(torch.randn(8, 2), 2, init="linear")
