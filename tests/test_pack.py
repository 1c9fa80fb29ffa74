"""The packed file: size accounting, exact round trip of a PQ-quantized real model, corruption
detection, no pickle anywhere, atomic writes, and the bit packing of codes."""

from __future__ import annotations

import copy
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

from modelpress.methods.pq import BlockSpec, PQConfig, PQLayer, quantize_pq
from modelpress.models import build_model, parameter_bytes
from modelpress.pack import (
    MAGIC,
    PackedFormatError,
    arch_spec,
    load_packed,
    model_entries,
    pack_model,
    read_packed,
    round_codebook,
    write_packed,
)
from modelpress.pack.bits import decode_codes, encode_codes, pack_bits, unpack_bits
from modelpress.pack.entries import decode_sparse, encode_pq, encode_sparse_pq
from modelpress.stages import calibration_images

FMNIST = "/usr/share/datasets/fashion-mnist"
ARCH = arch_spec("fmnist_cnn", num_classes=10, in_channels=1)
# Codebook sizes chosen so the codes use 9, 8, 6 and 7 bits (not only the byte-aligned path).
OVERRIDES = {
    "features.2.0": BlockSpec(block_size=9, k=256),
    "features.4.0": BlockSpec(block_size=9, k=512),
    "classifier.2": BlockSpec(block_size=8, k=64),
    "classifier.5": BlockSpec(block_size=8, k=100),
}
BITS = {"features.2.0": 8, "features.4.0": 9, "classifier.2": 6, "classifier.5": 7}


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def quantized(data, trained):
    """The briefly trained fmnist_cnn, product-quantized on 256 real calibration images."""
    train, _ = data
    cfg = PQConfig(kmeans_iters=5, layer_finetune_epochs=0, overrides=OVERRIDES)
    student, _ = quantize_pq(copy.deepcopy(trained), cfg, calibration_images(train, 256, seed=0), teacher=trained)
    assert {n for n, m in student.named_modules() if isinstance(m, PQLayer)} == set(OVERRIDES)
    return student.eval()


@pytest.fixture(scope="module")
def packed_path(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "model.mpk"
    size = pack_model(quantized, path, ARCH, {"recipe": "test", "top1": 12.5})
    return path, size


def pq_layers(model: nn.Module) -> dict[str, PQLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PQLayer)}


def fp16_rounded(model: nn.Module) -> nn.Module:
    """What the default packing keeps: every float tensor (codebooks included) rounded to fp16."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(out.parameters()) + list(out.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return out


# ---- 1. size ---------------------------------------------------------------------------------

def test_reported_size_is_the_file_size(quantized, packed_path):
    path, size = packed_path
    assert size == os.path.getsize(path)
    packed = read_packed(path)
    assert packed.size == size
    assert packed.arch == ARCH and packed.meta == {"recipe": "test", "top1": 12.5}
    # Layout: magic, header length, header, then exactly the tensors' bytes.
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<I", raw[8:12])
    assert size == 12 + hlen + sum(row["bytes"] for row in packed.summary())
    rows = {row["tensor"]: row for row in packed.summary()}
    for name, bits in BITS.items():
        row = rows[f"{name}.weight"]
        n = quantized.get_submodule(name).codes.numel()
        assert row["encoding"] == "pq" and row["bits"] == bits
        plain = row["k"] * row["block"] * 2 + math.ceil(n * bits / 8)
        assert row["bytes"] == plain if "coder" not in row else row["bytes"] < plain
    assert rows["features.0.0.weight"]["encoding"] == "dense"
    assert not any("num_batches_tracked" in t or t.endswith(".codes") for t in rows)
    # Much smaller than the same model stored densely in fp16.
    dense = build_model("fmnist_cnn")
    assert size < parameter_bytes(dense, 2) / 4


# ---- 2. exact weights ------------------------------------------------------------------------

def test_unpacked_weights_are_exactly_the_fp16_codebook_lookup(quantized, packed_path):
    path, _ = packed_path
    dense, meta = load_packed(path, materialize=True)
    assert meta == {"recipe": "test", "top1": 12.5}
    kept, _ = load_packed(path, materialize=False)
    for name, m in pq_layers(quantized).items():
        expected = m.codebook.detach().half().float()[m.codes].reshape(m.weight_shape)
        loaded = dense.get_submodule(name)
        assert type(loaded) is (nn.Conv2d if m.kind == "conv2d" else nn.Linear)
        assert torch.equal(loaded.weight, expected), name
        pq = kept.get_submodule(name)
        assert isinstance(pq, PQLayer) and pq.block_size == m.block_size
        assert torch.equal(pq.codes, m.codes), name
        assert torch.equal(pq.codebook, m.codebook.detach().half().float()), name
        assert pq.codebook.requires_grad  # still trainable after loading


def test_f32_round_trip_is_bit_exact(quantized, tmp_path):
    path = tmp_path / "f32.mpk"
    pack_model(quantized, path, ARCH, float_dtype="f32", codebook_dtype="f32")
    loaded, _ = load_packed(path, materialize=False)
    want = {k: v for k, v in quantized.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = {k: v for k, v in loaded.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    with torch.no_grad():
        x = torch.randn(8, 1, 28, 28)
        assert torch.equal(loaded(x), quantized(x))


def test_int8_codebooks_halve_the_codebook_bytes_and_load_as_rounded(quantized, packed_path, data, tmp_path):
    """codebook_dtype i8: the file stores each codebook as int8 with one f16 scale per column;
    what loads is exactly round_codebook's values, and the model predicts like the f16 file."""
    path = tmp_path / "i8.mpk"
    size = pack_model(quantized, path, ARCH, {"recipe": "test", "top1": 12.5}, codebook_dtype="i8")
    assert size == os.path.getsize(path)
    # Smaller by exactly what the codebooks save (k*d*2 -> k*d + 2*d bytes each), up to the header.
    saved = sum(m.k * m.block_size - 2 * m.block_size for m in pq_layers(quantized).values())
    assert abs((packed_path[1] - size) - saved) < 64, (packed_path[1], size, saved)
    kept, _ = load_packed(path, materialize=False)
    for name, m in pq_layers(quantized).items():
        want = round_codebook(m.codebook, "i8")
        got = kept.get_submodule(name).codebook.detach()
        assert torch.equal(got, want), name
        assert torch.equal(round_codebook(want, "i8"), want), name  # rounding is idempotent: re-packing changes nothing
        col_max = m.codebook.detach().abs().amax(0)
        assert float(((got - m.codebook.detach()).abs() - col_max / 254).max()) < 1e-3 * float(col_max.max())
        assert len(torch.unique(got)) > 16  # real values, not a degenerate scale
    x = data[1].tensors[0][:1000]
    with torch.no_grad():
        f16 = load_packed(packed_path[0])[0](x).argmax(1)
        i8 = load_packed(path)[0](x).argmax(1)
    assert float((f16 == i8).float().mean()) > 0.97


def test_storage_aware_training_sees_the_int8_weights_and_passes_gradients_through(quantized):
    layer = copy.deepcopy(pq_layers(quantized)["features.4.0"])
    layer.storage = "i8"
    x = torch.randn(4, 64, 14, 14)
    stored = round_codebook(layer.codebook, "i8")[layer.codes].reshape(layer.weight_shape)
    assert torch.equal(layer.weight, stored)
    layer(x).square().sum().backward()
    straight = copy.deepcopy(layer)
    straight.storage = None
    straight.codebook.grad = None
    with torch.no_grad():
        straight.codebook.copy_(round_codebook(layer.codebook, "i8"))
    straight(x).square().sum().backward()
    # the gradient is the one of the rounded weights, applied to the unrounded codebook
    assert torch.allclose(layer.codebook.grad, straight.codebook.grad, rtol=1e-4, atol=1e-6)
    assert float(layer.codebook.grad.abs().sum()) > 0


@pytest.mark.parametrize("dtype,bits", [("i8", 8), ("i6", 6), ("i5", 5), ("i4", 4)])
def test_integer_codebook_of_a_sparse_layer_round_trips(dtype, bits):
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(32, 16, 3, 3, generator=gen) > 0.8
    n = -(-int(mask.sum()) // 4)
    codebook = torch.randn(32, 4, generator=gen) * torch.tensor([0.01, 0.1, 1.0, 3.0])  # columns of very different scale
    codes = torch.randint(32, (n,), generator=gen)
    p, data = encode_sparse_pq(mask, codebook, codes, dtype)
    assert p["cb"] == dtype and p["n"] == len(data)
    assert len(data) - p["pos_n"] == math.ceil(32 * 4 * bits / 8) + 2 * 4 + math.ceil(n * 5 / 8)
    got_mask, (got_cb, got_codes) = decode_sparse(p, data)
    assert torch.equal(got_mask, mask) and torch.equal(got_codes, codes)
    assert torch.equal(got_cb, round_codebook(codebook, dtype))
    qmax = 2 ** (bits - 1) - 1
    assert len(torch.unique(got_cb[:, 3])) > min(16, qmax)  # many levels used
    # one scale per column: the small column keeps its relative precision
    assert float(((got_cb - codebook).abs() / codebook.abs().amax(0)).max()) <= 0.5 / qmax + 1e-3


# ---- 3. predictions and BatchNorm ----------------------------------------------------------

def test_loaded_model_predicts_like_the_rounded_in_memory_model(quantized, packed_path, data):
    path, _ = packed_path
    _, test = data
    x = test.tensors[0][:1000]
    reference = fp16_rounded(quantized)
    with torch.no_grad():
        want = reference(x)
        for materialize in (True, False):
            got = load_packed(path, materialize=materialize)[0](x)
            assert torch.equal(got.argmax(1), want.argmax(1)), materialize
            assert float((got - want).abs().max()) < 1e-4, materialize
        # The rounding is real (fp16 differs from fp32), so the comparison above is not vacuous.
        assert not torch.equal(quantized(x), want)


def test_batchnorm_running_stats_survive_pack_and_load(quantized, packed_path):
    path, _ = packed_path
    loaded, _ = load_packed(path)
    bns = [(n, m) for n, m in quantized.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3
    for name, bn in bns:
        other = loaded.get_submodule(name)
        # Trained stats, not the defaults a fresh model would have.
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert torch.equal(other.running_mean, bn.running_mean.half().float()), name
        assert torch.equal(other.running_var, bn.running_var.half().float()), name
        assert torch.equal(other.weight, bn.weight.detach().half().float()), name
        assert torch.equal(other.bias, bn.bias.detach().half().float()), name


# ---- 4. bad files, no pickle, atomic writes ------------------------------------------------

def corrupt(src, dst, pos: int | None = None, cut: int = 0):
    raw = bytearray(src.read_bytes())
    if pos is not None:
        raw[pos] ^= 0xFF
    dst.write_bytes(bytes(raw[:len(raw) - cut]))
    return dst


def header_length(path) -> int:
    return struct.unpack("<I", path.read_bytes()[8:12])[0]


def test_truncated_file_is_rejected(packed_path, tmp_path):
    path, _ = packed_path
    with pytest.raises(PackedFormatError, match="truncated"):
        read_packed(corrupt(path, tmp_path / "cut.mpk", cut=100))
    with pytest.raises(PackedFormatError, match="truncated"):
        load_packed(corrupt(path, tmp_path / "cut1.mpk", cut=1))
    (tmp_path / "magic_only.mpk").write_bytes(MAGIC)
    with pytest.raises(PackedFormatError, match="truncated"):
        read_packed(tmp_path / "magic_only.mpk")


def test_flipped_payload_byte_fails_the_checksum(packed_path, tmp_path):
    path, size = packed_path
    start = 12 + header_length(path)
    for pos in (start, (start + size) // 2, size - 1):
        with pytest.raises(PackedFormatError, match="checksum"):
            load_packed(corrupt(path, tmp_path / f"flip{pos}.mpk", pos=pos))


@pytest.mark.parametrize("where", ["magic", "length_low", "length_high", "header_start", "header_mid", "header_end"])
def test_flipped_header_byte_is_rejected(packed_path, tmp_path, where):
    path, _ = packed_path
    hlen = header_length(path)
    pos = {"magic": 3, "length_low": 8, "length_high": 11, "header_start": 12,
           "header_mid": 12 + hlen // 2, "header_end": 12 + hlen - 1}[where]
    with pytest.raises(PackedFormatError):
        load_packed(corrupt(path, tmp_path / "bad.mpk", pos=pos))


def test_not_a_packed_file_and_missing_file(tmp_path):
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(PackedFormatError, match="bad magic"):
        load_packed(tmp_path / "random.bin")
    (tmp_path / "empty.mpk").write_bytes(b"")
    with pytest.raises(PackedFormatError, match="bad magic"):
        load_packed(tmp_path / "empty.mpk")
    torch.save({"w": torch.zeros(3)}, tmp_path / "model.pt")  # a pickle-based checkpoint
    with pytest.raises(PackedFormatError, match="bad magic"):
        load_packed(tmp_path / "model.pt")
    with pytest.raises(PackedFormatError, match="no such"):
        load_packed(tmp_path / "absent.mpk")


def test_valid_file_that_does_not_fit_its_architecture_is_rejected(quantized, tmp_path):
    entries = model_entries(quantized)
    write_packed(tmp_path / "classes.mpk", arch_spec("fmnist_cnn", num_classes=5), {}, entries)
    with pytest.raises(PackedFormatError, match="shape"):
        load_packed(tmp_path / "classes.mpk")
    write_packed(tmp_path / "arch.mpk", {"name": "os.system", "kwargs": {}}, {}, entries)
    with pytest.raises(PackedFormatError, match="cannot rebuild"):
        load_packed(tmp_path / "arch.mpk")
    write_packed(tmp_path / "missing.mpk", ARCH, {}, entries[:-1])
    with pytest.raises(PackedFormatError, match="missing"):
        load_packed(tmp_path / "missing.mpk")
    name, _, p, buf = entries[0]
    write_packed(tmp_path / "enc.mpk", ARCH, {}, [(name, "pickle", p, buf)] + entries[1:])
    with pytest.raises(PackedFormatError, match="unknown encoding"):
        read_packed(tmp_path / "enc.mpk")
    # Codes pointing past the codebook (k = 100 fits 7 bits, so 120 is representable).
    m = quantized.get_submodule("classifier.5")
    codes = m.codes.clone()
    codes[3] = 120
    p, buf = encode_pq(m.codebook, codes, m.weight_shape, "f16")
    bad = [(n, "pq", p, buf) if n == "classifier.5.weight" else (n, e, q, b) for n, e, q, b in entries]
    write_packed(tmp_path / "codes.mpk", ARCH, {}, bad)
    with pytest.raises(PackedFormatError, match="beyond codebook"):
        load_packed(tmp_path / "codes.mpk")


def test_a_weight_stored_with_addends_loads_as_their_sum_and_a_bad_addend_is_named(tmp_path, capsys):
    """``<tensor>+<i>`` entries add to ``<tensor>`` (a layer whose weight is a sum of parts): the
    loader sums them and `modelpress inspect` reads the file; an addend of another shape, of a
    tensor the file does not hold, or numbered with a gap is refused, naming it."""
    from modelpress import cli
    from modelpress.pack.entries import encode_dense

    arch = arch_spec("fmnist_cnn", width=4, hidden=16)
    model = build_model("fmnist_cnn", width=4, hidden=16)
    entries = model_entries(model, "f32")
    extra = torch.randn(10, 16)
    write_packed(tmp_path / "sum.mpk", arch, {}, [*entries, ("classifier.5.weight+1", "dense", *encode_dense(extra, "f32"))])
    loaded, _ = load_packed(tmp_path / "sum.mpk")
    assert torch.equal(loaded.classifier[5].weight, model.classifier[5].weight + extra)
    assert cli.main(["inspect", str(tmp_path / "sum.mpk")]) == 0 and "classifier.5.weight+1" in capsys.readouterr().out
    for name, value, message in (("classifier.5.weight+1", torch.randn(10, 15), r"'classifier.5.weight\+1': shape \(10, 15\)"),
                                 ("classifier.9.weight+1", extra, "which the file does not hold"),
                                 ("classifier.5.weight+2", extra, r"addends \[2\], not numbered 1, 2")):
        write_packed(tmp_path / "bad.mpk", arch, {}, [*entries, (name, "dense", *encode_dense(value, "f32"))])
        with pytest.raises(PackedFormatError, match=message):
            load_packed(tmp_path / "bad.mpk")
        with pytest.raises(PackedFormatError, match=message):
            read_packed(tmp_path / "bad.mpk").summary()


def test_loading_never_unpickles(packed_path, monkeypatch):
    path, _ = packed_path
    raw = path.read_bytes()
    assert raw.startswith(MAGIC) and raw[0] != 0x80  # 0x80 = PROTO opcode that opens every pickle >= v2
    with pytest.raises(pickle.UnpicklingError):  # torch's safe unpickler refuses the file's first bytes
        torch.load(path, weights_only=True)

    def refuse(*_a, **_k):
        raise AssertionError("the loader unpickled something")

    for mod, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, attr, refuse)
    model, _ = load_packed(path, materialize=False)
    assert pq_layers(model)


def test_write_is_atomic(quantized, tmp_path, monkeypatch):
    entries = model_entries(quantized)
    target = tmp_path / "out" / "model.mpk"
    size = write_packed(target, ARCH, {}, entries)
    assert sorted(os.listdir(target.parent)) == ["model.mpk"] and size == os.path.getsize(target)
    good = target.read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk gone")

    # Failing at the final rename: no partial file, and the existing file is untouched.
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        write_packed(target, ARCH, {"v": 2}, entries)
    assert sorted(os.listdir(target.parent)) == ["model.mpk"] and target.read_bytes() == good
    # Failing before anything exists: neither the target nor a partial file is left.
    fresh = tmp_path / "fresh" / "model.mpk"
    with pytest.raises(OSError, match="disk gone"):
        write_packed(fresh, ARCH, {}, entries)
    assert os.listdir(fresh.parent) == []
    monkeypatch.undo()
    # Failing midway, after the data went into the temporary file but before it is synced.
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk gone"):
        write_packed(fresh, ARCH, {}, entries)
    assert os.listdir(fresh.parent) == []


# ---- 5. bit packing --------------------------------------------------------------------------

def reference_pack(values, bits: int) -> bytes:
    """The documented layout, written the slow obvious way: one LSB-first bit stream."""
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (i * bits)
    return acc.to_bytes(math.ceil(len(values) * bits / 8), "little")


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 1001):
        values = rng.integers(0, 2**bits, n)
        values[0] = 2**bits - 1  # the largest code must survive
        buf = pack_bits(values, bits)
        assert len(buf) == math.ceil(n * bits / 8)
        assert buf == reference_pack(values, bits)
        out = unpack_bits(buf, bits, n)
        assert out.dtype == np.int64 and np.array_equal(out, values)


def test_entry_shorter_than_its_shape_is_rejected(quantized, tmp_path):
    """A file with a valid checksum but too few code bytes must not load as code 0."""
    entries = model_entries(quantized)
    for i, (name, enc, p, buf) in enumerate(entries):
        if enc == "pq" or name.endswith("running_var"):
            short = entries[:i] + [(name, enc, {**p, "n": p["n"] - 4}, buf[:-4])] + entries[i + 1:]
            write_packed(tmp_path / "short.mpk", ARCH, {}, short)
            with pytest.raises(PackedFormatError, match="corrupted entry"):
                load_packed(tmp_path / "short.mpk")
        if enc == "pq":  # cut inside the codebook itself
            cut = entries[:i] + [(name, enc, {**p, "n": 10}, buf[:10])] + entries[i + 1:]
            write_packed(tmp_path / "cut.mpk", ARCH, {}, cut)
            with pytest.raises(PackedFormatError, match="corrupted entry"):
                load_packed(tmp_path / "cut.mpk")


# ---- 6. entropy coding of the codes ----------------------------------------------------------

@pytest.mark.parametrize("k,n,skew", [(16, 5000, 2.0), (256, 20000, 1.0), (512, 3000, 1.5), (4, 1, 1.0)])
def test_entropy_coded_codes_decode_exactly(k, n, skew):
    """Skewed codes (Zipf-like, as a real layer's) are range coded with their histogram and
    come back identical; uniform ones stay bit-packed, which is then smaller."""
    rng = np.random.default_rng(k + n)
    prob = 1.0 / np.arange(1, k + 1) ** skew
    codes = rng.choice(k, size=n, p=prob / prob.sum())
    bits = max(1, (k - 1).bit_length())
    p, data = encode_codes(codes, k, bits)
    assert len(data) <= math.ceil(n * bits / 8)
    if n > 1000:
        assert p == {"coder": "range", "hist_n": p["hist_n"]} and len(data) < math.ceil(n * bits / 8)
    out = decode_codes({"bits": bits, **p}, data, k, n)
    assert out.dtype == np.int64 and np.array_equal(out, codes)
    flat = rng.integers(0, k, 4096)
    p, data = encode_codes(flat, k, bits)
    assert p == {} and data == pack_bits(flat, bits)


def test_entropy_coded_file_holds_the_same_codes_and_is_smaller(trained, data, tmp_path):
    """A real layer's scalar k-means codes (4 bits) are far from uniform: the packed file range
    codes them, is smaller than bit-packing, and loads back the very same codes and weights."""
    from modelpress import KMeansConfig, compress

    model, _ = compress(copy.deepcopy(trained), KMeansConfig(bits=4, kmeans_iters=10),
                        calibration=calibration_images(data[0], 64, 0))
    plain, coded = tmp_path / "plain.mpk", tmp_path / "coded.mpk"
    plain_size = pack_model(model, plain, ARCH, entropy=False)
    coded_size = pack_model(model, coded, ARCH)
    rows = read_packed(coded).summary()
    assert any(r.get("coder") == "range" for r in rows)
    assert not any("coder" in r for r in read_packed(plain).summary())
    assert coded_size < plain_size * 0.95
    a, _ = load_packed(plain, materialize=False)
    b, _ = load_packed(coded, materialize=False)
    for (name, m), (_, m2) in zip(pq_layers(a).items(), pq_layers(b).items()):
        assert torch.equal(m.codes, m2.codes) and torch.equal(m.codebook, m2.codebook), name
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_packed(plain)[0](x), load_packed(coded)[0](x))


def test_corrupted_entropy_coded_codes_are_rejected():
    rng = np.random.default_rng(0)
    codes = rng.choice(8, size=3000, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01])
    p, data = encode_codes(codes, 8, 3)
    p = {"bits": 3, **p}
    with pytest.raises(PackedFormatError, match="corrupted entry"):
        decode_codes(p, data[:-4], 8, len(codes))  # a word short
    with pytest.raises(PackedFormatError, match="corrupted entry"):
        decode_codes(p, data, 8, len(codes) + 1)  # histogram and count disagree
    bad = bytearray(data)
    bad[p["hist_n"] + 5] ^= 0xFF  # a flipped bit inside the coded stream
    with pytest.raises(PackedFormatError, match="corrupted entry"):
        decode_codes(p, bytes(bad), 8, len(codes))


# ---- 7. one size function per encoding; pack never imports the methods ----------------------

@pytest.mark.parametrize("cb", ["f16", "f32", "i8", "i6", "i5", "i4"])
def test_budget_byte_costs_are_the_packed_entry_sizes(cb):
    """The PQ byte budget prices a layer with the packed file's own size function."""
    from modelpress.methods.pq.budget import layer_bytes, pq_bytes
    from modelpress.pack.entries import encode_dense

    gen = torch.Generator().manual_seed(0)
    for shape, d, k in [((64, 32, 3, 3), 9, 256), ((10, 256), 8, 100), ((16, 8), 4, 3), ((7, 4), 4, 64), ((256, 3136), 16, 512)]:
        numel = math.prod(shape)
        spec = BlockSpec(block_size=d, k=k)
        kk = min(k, numel // d)
        _, data = encode_pq(torch.randn(kk, d, generator=gen), torch.randint(kk, (numel // d,), generator=gen), shape, cb,
                            entropy=False)
        assert pq_bytes(numel, spec, cb) == layer_bytes(numel, spec, "f16", cb) == len(data), (shape, d, k)
        for fd in ("f16", "f32"):
            assert layer_bytes(numel, None, fd, cb) == len(encode_dense(torch.zeros(shape), fd)[1])


def test_pack_never_imports_the_methods():
    """methods -> pack only: a method registers its layer type in pack.codecs."""
    import ast
    from pathlib import Path

    import modelpress.pack

    for path in Path(modelpress.pack.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "methods" not in (node.module or ""), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any("methods" in a.name for a in node.names), path.name


def test_inspect_reports_distinct_values_and_entropy(tmp_path, capsys):
    """`modelpress inspect` says how many distinct weight values the file holds network-wide and
    their entropy: 4 values used equally often are 2 bits per weight."""
    from modelpress import cli
    from modelpress.models import build_model
    from modelpress.pack import arch_spec, pack_model

    model = build_model("fmnist_cnn")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.copy_(torch.tensor([-0.5, -0.25, 0.25, 0.5]).repeat(p.numel() // 4 + 1)[: p.numel()].reshape(p.shape))
    path = tmp_path / "m.mpk"
    pack_model(model, path, arch_spec("fmnist_cnn"), float_dtype="f32")
    assert cli.main(["inspect", str(path)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert " 4 distinct values network-wide, entropy 2.00 bits per weight" in line, line


class _OwnNet(nn.Module):
    """A model of the user's own class: no builder name can rebuild it."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width * 28 * 28, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_a_model_no_name_rebuilds_fails_at_pack_time_and_loads_into_its_skeleton(tmp_path):
    """Packing names an architecture that load_packed must be able to rebuild: a model of another
    class fails at pack time with one message that names the escape, and writes nothing; packed
    as ``custom:<name>``, the file loads into a skeleton the user passes (nothing executed from
    the file), exactly, and refuses a skeleton of another shape or none at all."""
    torch.manual_seed(0)
    model = _OwnNet().eval()
    images = torch.randn(32, 1, 28, 28)
    cfg = PQConfig(kmeans_iters=2, layer_finetune_epochs=0, conv=BlockSpec(block_size=9, k=8), linear=BlockSpec(block_size=8, k=64))
    student, _ = quantize_pq(copy.deepcopy(model), cfg, images, teacher=model)
    path = tmp_path / "own.mpk"
    for arch, reason in ((ARCH, "file does not match architecture fmnist_cnn"), (arch_spec("own_net"), "unknown model 'own_net'")):
        with pytest.raises(ValueError, match="cannot pack the model as architecture") as e:
            pack_model(student, path, arch)
        assert reason in str(e.value) and "arch_spec('custom:<name>')" in str(e.value) and "skeleton=" in str(e.value)
        assert not path.exists() and not list(tmp_path.iterdir())

    size = pack_model(student, path, arch_spec("custom:OwnNet"), float_dtype="f32", codebook_dtype="f32")
    assert size == path.stat().st_size
    with pytest.raises(PackedFormatError, match=r"'custom:OwnNet' is a class of the user's own.*skeleton="):
        load_packed(path)
    with pytest.raises(PackedFormatError, match="tensor conv.weight: shape"):
        load_packed(path, skeleton=_OwnNet(width=8))
    loaded, _ = load_packed(path, skeleton=_OwnNet())
    coded, _ = load_packed(path, materialize=False, skeleton=_OwnNet())
    assert isinstance(coded.head, PQLayer)
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images)) and torch.equal(coded(images), student(images))
    assert read_packed(path).summary()  # inspect reads it without a skeleton


def test_grouped_integer_codebooks_survive_outlier_centroids(tmp_path):
    """An integer codebook with one scale per position lets a few outlier centroids (transformers'
    outlier weights) coarsen every centroid's grid; with one scale row per group of 16 centroids
    (g6) the others keep a fine grid: a several times lower error at 6 bits, for the bytes of the
    extra scales. The file holds exactly the rounded codebook."""
    from modelpress.pack.codebook import GROUP, codebook_nbytes

    torch.manual_seed(0)
    k, d = 256, 4
    codebook = torch.randn(k, d) * 0.05
    codebook[[3, 200]] *= 40  # two outlier centroids
    errors = {}
    for dtype in ("i6", "g6"):
        rounded = round_codebook(codebook, dtype)
        errors[dtype] = float((rounded - codebook).norm() / codebook.norm())
        errors[dtype + " without the outlier groups"] = float(
            (rounded[GROUP:192] - codebook[GROUP:192]).norm() / codebook[GROUP:192].norm())
    assert errors["g6"] < errors["i6"] / 2, errors
    assert errors["g6 without the outlier groups"] < errors["i6 without the outlier groups"] / 10, errors
    assert codebook_nbytes(k, d, "g6") - codebook_nbytes(k, d, "i6") == (k // GROUP - 1) * d * 2

    model = nn.Sequential(nn.Linear(64, 32)).eval()
    cfg = PQConfig(kmeans_iters=3, layer_finetune_epochs=0, linear=BlockSpec(block_size=4, k=64))
    student, _ = quantize_pq(model, cfg, torch.randn(64, 64))
    with torch.no_grad():
        student[0].codebook.copy_(round_codebook(student[0].codebook, "g5"))
    path = tmp_path / "g5.mpk"
    pack_model(student, path, arch_spec("custom:Sequential"), float_dtype="f32", codebook_dtype="g5")
    entry = next(p for name, _, p, _ in read_packed(path).entries if name == "0.weight")
    assert entry["cb"] == "g5"
    loaded, _ = load_packed(path, skeleton=nn.Sequential(nn.Linear(64, 32)))
    assert torch.equal(loaded[0].weight, student[0].weight)
