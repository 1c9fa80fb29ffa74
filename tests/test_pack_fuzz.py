"""Fuzz test of the packed-file reader: a seeded mutation corpus of real packed files.

The corpus: a tiny fmnist_cnn compressed every way the packed file can hold it (dense f16/f32;
PQ with f16/f32/i8/i6/i5/i4 codebooks, bit-packed and range-coded codes; sparse weights with a
bitmask or delta positions, raw or PQ values; uniform/affine layers), each packed with entropy
coding on and off. Each mutated file (bit flips, byte edits, truncations, extensions, the header
length, header fields edited and re-compressed with the sha256 fixed so that the edit reaches
the decoders, payload bytes edited with the sha256 fixed, huge claims of shape / n / count / k /
d / pos_bits / tokens / hist_n / payload_bytes, architecture arguments, a decompression bomb,
deep JSON nesting) goes through ``load_packed`` (materialized or not) or ``read_packed(...).summary()``.
The only outcomes allowed: success (a file still valid) or PackedFormatError.

The mutations run in a child process (``python tests/test_pack_fuzz.py --child ...``) under an
address-space limit (RLIMIT_AS = what the process maps once torch is imported and the corpus
built, plus EXTRA_AS), so an abort of native code, a memory blow-up or a hang fails the test
instead of killing pytest. ``bench/fuzz_bench.py`` runs the same campaign longer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
EXTRA_AS = 1 << 30  # bytes of address space the mutation loop may add beyond torch's import and the corpus
MAX_SECONDS_PER_FILE = 10.0
ARCH = {"name": "fmnist_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 4, "hidden": 16}}
MAGIC = b"MPRESS01"


# ---- the corpus: real packed files of every entry kind ----------------------------------------

def build_corpus(tmp: Path) -> list[tuple[str, bytes]]:
    import torch

    from modelpress.methods.pq import PQLayer
    from modelpress.methods.uniform import UniformLayer
    from modelpress.models import build_model
    from modelpress.pack import pack_model
    from modelpress.walk import set_module

    def base(seed):
        torch.manual_seed(seed)
        m = build_model(ARCH["name"], **ARCH["kwargs"])
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_()
                    mod.running_var.uniform_(0.5, 2)
        return m.eval()

    def pq(m, name, d, k, skew, gen, mask=None):
        layer = m.get_submodule(name)
        n = layer.weight.numel() if mask is None else int(mask.sum())
        codebook = torch.randn(k, d, generator=gen) * torch.linspace(0.01, 2, d)
        if skew:  # Zipf-like codes, as a real layer's: range coded
            prob = 1.0 / torch.arange(1, k + 1).double() ** skew
            codes = torch.multinomial(prob, -(-n // d), replacement=True, generator=gen)
        else:
            codes = torch.randint(k, (-(-n // d),), generator=gen)
        set_module(m, name, PQLayer(layer, codebook, codes, d, mask=mask))

    def prune(m, name, share, gen):
        with torch.no_grad():
            w = m.get_submodule(name).weight
            w[torch.rand(w.shape, generator=gen) < share] = 0

    gen = torch.Generator().manual_seed(0)
    models = {"dense": base(0)}
    m = base(1)
    pq(m, "features.2.0", 9, 16, 1.5, gen)
    pq(m, "features.4.0", 9, 200, 0, gen)
    pq(m, "classifier.2", 8, 64, 2.0, gen)
    pq(m, "classifier.5", 4, 5, 0, gen)
    models["pq"] = m
    m = base(2)
    prune(m, "classifier.2", 0.93, gen)  # delta positions
    prune(m, "features.2.0", 0.5, gen)  # bitmask
    prune(m, "features.4.0", 0.995, gen)
    models["sparse"] = m
    m = base(3)
    pq(m, "classifier.2", 4, 32, 1.2, gen, mask=torch.rand(m.get_submodule("classifier.2").weight.shape, generator=gen) > 0.8)
    pq(m, "features.4.0", 9, 16, 0, gen, mask=torch.rand(m.get_submodule("features.4.0").weight.shape, generator=gen) > 0.4)
    pq(m, "features.2.0", 9, 8, 2.5, gen)
    models["sparse_pq"] = m
    m = base(4)
    for name, bits in [("features.0.0", 8), ("features.2.0", 4), ("classifier.2", 2), ("classifier.5", 3)]:
        set_module(m, name, UniformLayer(m.get_submodule(name), bits))
    models["affine"] = m
    m = base(5)
    set_module(m, "features.0.0", UniformLayer(m.get_submodule("features.0.0"), 4))
    pq(m, "classifier.2", 8, 256, 1.0, gen)
    prune(m, "features.4.0", 0.9, gen)
    models["mixed"] = m

    plan = [("dense", "f16", "f16", True), ("dense", "f32", "f32", True)]
    plan += [("pq", fd, cb, ent) for cb, fd in [("f16", "f16"), ("f32", "f32"), ("i8", "f16"), ("i6", "f16"), ("i5", "f32"),
                                                 ("i4", "f16")] for ent in (True, False)]
    plan += [("sparse", "f16", "f16", True), ("sparse", "f32", "f32", True)]
    plan += [("sparse_pq", "f16", cb, ent) for cb in ("f16", "i8", "i4") for ent in (True, False)]
    plan += [("affine", fd, fd, ent) for fd in ("f16", "f32") for ent in (True, False)]
    plan += [("mixed", "f16", "i6", True), ("mixed", "f32", "f16", False)]
    corpus = []
    for i, (name, fd, cb, ent) in enumerate(plan):
        path = tmp / f"corpus{i}.mpk"
        pack_model(models[name], path, ARCH, {"variant": name, "n": i}, float_dtype=fd, codebook_dtype=cb, entropy=ent)
        corpus.append((f"{name}/{fd}/{cb}/{'rc' if ent else 'bp'}", path.read_bytes()))
    return corpus


# ---- mutations -------------------------------------------------------------------------------

def split(raw: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack("<I", raw[8:12])
    return json.loads(zlib.decompress(raw[12:12 + hlen])), raw[12 + hlen:]


def assemble(header: dict, payload: bytes, fix: bool = True) -> bytes:
    if fix:
        header["payload_bytes"] = len(payload)
        header["sha256"] = hashlib.sha256(payload).hexdigest()
    blob = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 1)
    return MAGIC + struct.pack("<I", len(blob)) + blob + payload


def _offsets(header: dict) -> list[tuple[int, int]]:
    out, o = [], 0
    for _, _, p in header["tensors"]:
        if type(p["n"]) is not int or p["n"] < 0:
            raise ValueError("an earlier edit broke n")
        out.append((o, o + p["n"]))
        o += p["n"]
    return out


HUGE = [2 ** 20, 2 ** 28, 2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 62, 2 ** 63, 2 ** 64 + 5, 10 ** 30]
ODD = [0, 1, -1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 25, 32, 64, 255, 256, 65535, 65536, 65537, 1.5, float("nan"), "8", None,
       True, False, [], [1], {}, "f16", "i8", "pq", "range", "delta", "bitmask", -2 ** 31]
KEYS = ["shape", "n", "count", "k", "d", "bits", "cb", "dtype", "pos", "pos_n", "pos_bits", "tokens", "values", "coder", "hist_n"]


def _nasty(rng: random.Random):
    return rng.choice(HUGE) if rng.random() < 0.4 else rng.choice(ODD)


def _edit_param(rng, header, payload):
    name, enc, p = rng.choice(header["tensors"])
    key = rng.choice([k for k in p] + KEYS)
    what = rng.random()
    if what < 0.15:
        p.pop(key, None)
        return f"del {name}.{key}", assemble(header, payload)
    if key == "shape" and isinstance(p.get("shape"), list) and what < 0.6:
        s = list(p["shape"])
        op = rng.randrange(6)
        if op == 0 and s:
            s[rng.randrange(len(s))] = rng.choice(HUGE + [0, 1, -1])
        elif op == 1 and s:
            s[rng.randrange(len(s))] *= 2
        elif op == 2:
            s = s[::-1]
        elif op == 3:
            s = s[:-1]
        elif op == 4:
            s = s + [rng.choice([1, 2, 2 ** 20])]
        else:
            s = [2 ** 14] * rng.randint(2, 12)
        p["shape"] = s
        return f"shape {name} -> {s}", assemble(header, payload)
    if what < 0.35 and isinstance(p.get(key), int) and not isinstance(p.get(key), bool):
        p[key] = p[key] + rng.choice([-8, -4, -1, 1, 4, 8])
        return f"{name}.{key} +-", assemble(header, payload)
    p[key] = _nasty(rng)
    return f"{name}.{key} = {p[key]!r}", assemble(header, payload)


def _huge_claim(rng, header, payload):
    name, enc, p = rng.choice(header["tensors"])
    key = rng.choice(["shape", "n", "count", "k", "d", "pos_bits", "tokens", "hist_n", "payload_bytes", "bits"])
    value = rng.choice(HUGE)
    if key == "payload_bytes":
        header = {**header}
        h = assemble(header, payload)  # correct sha first, then the claim
        header2, _ = split(h)
        header2["payload_bytes"] = value
        return f"payload_bytes = {value}", assemble(header2, payload, fix=False)
    if key == "shape":
        dims = max(1, len(p["shape"]))
        p["shape"] = [value] + p["shape"][1:] if rng.random() < 0.5 else [int(round(value ** (1 / dims)))] * dims
    else:
        p[key] = value
    return f"huge {name}.{key} = {value}", assemble(header, payload)


def _payload_edit(rng, header, payload):
    """Edit bytes inside one entry and fix the checksum: the decoders see the edit."""
    i = rng.randrange(len(header["tensors"]))
    a, b = _offsets(header)[i]
    if b <= a:
        return "payload (empty entry)", assemble(header, payload)
    buf = bytearray(payload)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        pos = rng.randrange(a, b)
        if rng.random() < 0.6:
            buf[pos] ^= 1 << rng.randrange(8)
        else:
            buf[pos] = rng.choice([0, 0xFF, rng.randrange(256)])
    return f"payload bytes of {header['tensors'][i][0]}", assemble(header, bytes(buf))


def _resize_entry(rng, header, payload):
    """Cut or grow one entry's bytes and set its n accordingly: sizes agree, the shape does not."""
    i = rng.randrange(len(header["tensors"]))
    a, b = _offsets(header)[i]
    delta = rng.choice([-64, -8, -4, -1, 1, 3, 4, 8, 100])
    if delta < 0:
        cut = min(-delta, b - a)
        payload = payload[:b - cut] + payload[b:]
        header["tensors"][i][2]["n"] -= cut
    else:
        payload = payload[:b] + bytes(rng.randrange(256) for _ in range(delta)) + payload[b:]
        header["tensors"][i][2]["n"] += delta
    return f"resize {header['tensors'][i][0]} by {delta}", assemble(header, payload)


def _encoding_edit(rng, header, payload):
    t = rng.choice(header["tensors"])
    op = rng.randrange(4)
    if op == 0:
        t[1] = rng.choice(["dense", "pq", "sparse", "affine", "pickle", ""])
        return f"encoding {t[0]} -> {t[1]}", assemble(header, payload)
    p = t[2]
    if op == 1 and "coder" in p:
        del p["coder"]
        p.pop("hist_n", None)
        return f"no coder {t[0]}", assemble(header, payload)
    if op == 2:
        p["coder"] = "range"
        p["hist_n"] = rng.choice([1, 2, 4, 16, 64, p.get("k", 2), 5 * p.get("k", 2), p["n"] // 2])
        return f"coder range {t[0]} hist_n={p['hist_n']}", assemble(header, payload)
    extra = rng.choice(["pos_bits", "tokens", "d", "k", "bits", "cb", "coder", "zzz"])
    p[extra] = _nasty(rng)
    return f"add {t[0]}.{extra}", assemble(header, payload)


def _arch_edit(rng, header, payload):
    arch = header["arch"]
    op = rng.randrange(7)
    if op == 0:
        arch["name"] = rng.choice(["cifar_resnet20", "cifar_resnet56", "os.system", "", "torchvision:resnet18",
                                   "torchvision:nope", "fmnist_cnn", 5, None])
    elif op == 1:
        key = rng.choice(["num_classes", "in_channels", "width", "hidden", "depth", "weights", "blocks"])
        arch.setdefault("kwargs", {})[key] = rng.choice(HUGE + [0, -1, 5, 3, 2 ** 12, "x", None, 1.5, [1]])
    elif op == 2:
        arch["kwargs"] = rng.choice([[], "x", None, {"num_classes": {"a": 1}}, {"__class__": 1}])
    elif op == 3:
        arch.pop("kwargs", None)
    elif op == 4:
        arch.pop("name", None)
    elif op == 5:
        arch["extra"] = 1
    else:
        header["arch"] = rng.choice([None, [], "fmnist_cnn", 3])
    return f"arch {header['arch']!r}"[:120], assemble(header, payload)


def _top_edit(rng, header, payload):
    key = rng.choice(["format", "arch", "meta", "payload_bytes", "sha256", "tensors", "extra"])
    op = rng.randrange(5)
    if op == 0:
        header.pop(key, None)
        return f"del {key}", assemble(header, payload, fix=False)
    if op == 1:
        header[key] = rng.choice([None, 1, True, 2, "1", [], {}, "0" * 64, -1, 1.0])
        return f"{key} = {header[key]!r}", assemble(header, payload, fix=False)
    tensors = header["tensors"]
    offs = _offsets(header)
    if op == 2 and tensors:  # drop a tensor with its bytes: a consistent file, missing a tensor
        i = rng.randrange(len(tensors))
        a, b = offs[i]
        name = tensors.pop(i)[0]
        return f"drop tensor {name}", assemble(header, payload[:a] + payload[b:])
    if op == 3 and tensors:  # duplicate a tensor with its bytes
        i = rng.randrange(len(tensors))
        a, b = offs[i]
        tensors.append(json.loads(json.dumps(tensors[i])))
        if rng.random() < 0.5:
            tensors[-1][0] += ".extra"
        return f"duplicate tensor {tensors[i][0]}", assemble(header, payload + payload[a:b])
    rng.shuffle(tensors)  # reorder the entries, not the bytes
    return "shuffle tensors", assemble(header, payload)


def _json_text(rng, raw):
    (hlen,) = struct.unpack("<I", raw[8:12])
    text = bytearray(zlib.decompress(raw[12:12 + hlen]))
    for _ in range(rng.choice([1, 1, 2, 3])):
        pos = rng.randrange(len(text))
        text[pos] = rng.choice(b'{}[]",:0123456789-e.aZ \\\xff')
    blob = zlib.compress(bytes(text), 1)
    return "header json text", MAGIC + struct.pack("<I", len(blob)) + blob + raw[12 + hlen:]


def _raw_edit(rng, raw):
    buf = bytearray(raw)
    op = rng.randrange(6)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
        return "bit flips", bytes(buf)
    if op == 1:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return "byte edits", bytes(buf)
    if op == 2:
        cut = rng.randrange(len(buf))
        return f"truncate at {cut}", bytes(buf[:cut])
    if op == 3:
        return "extend", bytes(buf) + (bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
                                       if rng.random() < 0.5 else b"\0" * rng.randint(1, 4096))
    if op == 4:
        value = rng.choice([0, 1, len(buf), 2 ** 24, 2 ** 31, 2 ** 32 - 1, struct.unpack("<I", raw[8:12])[0] + rng.choice([-1, 1])])
        buf[8:12] = struct.pack("<I", max(0, value))
        return f"header length {value}", bytes(buf)
    return "magic", bytes(rng.randrange(256) for _ in range(8)) + bytes(buf[8:])


_BOMBS: dict[str, bytes] = {}


def _special(rng, raw):
    """Headers built to hurt: a decompression bomb, deep nesting, a huge but valid header."""
    kind = rng.choice(["bomb", "deep", "big_meta"])
    if kind not in _BOMBS:
        if kind == "bomb":
            text = b'{"meta":"' + b"A" * (17 * 2 ** 20) + b'"}'
        elif kind == "deep":
            text = b"[" * 200_000 + b"]" * 200_000
        else:
            header, _ = split(raw)
            header["meta"] = {"pad": ["x" * 100] * 120_000}
            text = json.dumps(header, separators=(",", ":")).encode()
        _BOMBS[kind] = zlib.compress(text, 9)
    blob = _BOMBS[kind]
    return f"special {kind}", MAGIC + struct.pack("<I", len(blob)) + blob + split(raw)[1]


STRUCTURED = [(_edit_param, 5), (_huge_claim, 3), (_payload_edit, 4), (_resize_entry, 2), (_encoding_edit, 2),
              (_arch_edit, 2), (_top_edit, 2)]


def mutate(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    r = rng.random()
    if r < 0.12:
        return _raw_edit(rng, raw)
    if r < 0.17:
        return _json_text(rng, raw)
    if r < 0.1703:
        return _special(rng, raw)
    descs = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        fn = rng.choices([f for f, _ in STRUCTURED], [w for _, w in STRUCTURED])[0]
        try:  # a later edit builds on the earlier ones, as long as the header still has their shape
            header, payload = split(raw)
            desc, raw = fn(rng, header, payload)
        except Exception:  # noqa: BLE001  (the mutated header no longer has what this edit needs)
            break
        descs.append(desc)
    return "; ".join(descs) or "none", raw


# ---- the campaign, in a child process under an address-space limit -------------------------

def _vm_bytes(field: str = "VmSize") -> int:
    """This process's VmSize (address space) or VmHWM (peak RSS: unlike ru_maxrss, not
    inherited from the parent that forked it) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def child(seed: int, count: int, extra_as: int, workdir: Path, seconds: float | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    from modelpress.pack import PackedFormatError, load_packed, read_packed

    corpus = build_corpus(workdir)
    for _, raw in corpus:  # every corpus file is valid to begin with
        load_packed_bytes = workdir / "check.mpk"
        load_packed_bytes.write_bytes(raw)
        load_packed(load_packed_bytes)
    import torchvision  # noqa: F401  (mapped before the limit: an architecture edit may name a torchvision model)

    rss_before = _vm_bytes("VmHWM") >> 20
    limit = _vm_bytes() + extra_as
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rng = random.Random(seed)
    path, current = workdir / "case.mpk", workdir / "current.txt"
    outcomes = {"ok": 0, "PackedFormatError": 0}
    others, slowest, start = [], (0.0, ""), time.perf_counter()
    peak = (0, rss_before, "")  # the largest rise of the peak RSS (MiB) and the file that caused it
    done = 0
    while done < count and (seconds is None or time.perf_counter() - start < seconds):
        base_name, raw = corpus[rng.randrange(len(corpus))]
        desc, data = mutate(rng, raw)
        how = rng.choice(["load", "load_pq", "summary"])
        desc = f"#{done} {base_name} {how}: {desc}"
        path.write_bytes(data)
        current.write_text(desc)
        t0 = time.perf_counter()
        try:
            if how == "summary":
                read_packed(path).summary()
            else:
                load_packed(path, materialize=how == "load")
            outcomes["ok"] += 1
        except PackedFormatError:
            outcomes["PackedFormatError"] += 1
        except BaseException as e:  # noqa: BLE001  (what the test is looking for)
            if isinstance(e, KeyboardInterrupt):
                raise
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            if len(others) < 20:
                keep = workdir / f"other{len(others)}.mpk"
                keep.write_bytes(data)
                others.append({"case": desc, "error": f"{type(e).__name__}: {e}"[:300], "file": str(keep),
                               "where": traceback.format_exc().strip().splitlines()[-3][:200]})
        dt = time.perf_counter() - t0
        if dt > slowest[0]:
            slowest = (dt, desc)
        rss = _vm_bytes("VmHWM") >> 20
        if rss - peak[1] > peak[0]:
            peak = (rss - peak[1], rss, desc)
        done += 1
    return {"files": done, "outcomes": outcomes, "others": others, "seconds": round(time.perf_counter() - start, 2),
            "slowest_s": round(slowest[0], 3), "slowest": slowest[1][:200], "corpus": len(corpus),
            "limit_as_mib": limit >> 20, "extra_as_mib": extra_as >> 20,
            "rss_before_mib": rss_before, "largest_rss_rise_mib": peak[0], "largest_rss_rise_by": peak[2][:200], "peak_rss_mib": _vm_bytes("VmHWM") >> 20}


def run_campaign(seed: int, count: int, workers: int = 2, extra_as: int = EXTRA_AS, timeout: float = 600,
                 seconds: float | None = None) -> dict:
    """``workers`` children, each ``count // workers`` mutated files (seeds seed, seed+1, ...)."""
    procs, dirs = [], []
    for w in range(workers):
        d = tempfile.mkdtemp(prefix=f"pack_fuzz{w}_")
        dirs.append(Path(d))
        args = [sys.executable, str(Path(__file__).resolve()), "--child", "--seed", str(seed + w), "--count",
                str(count // workers), "--extra-as", str(extra_as), "--workdir", d]
        if seconds is not None:
            args += ["--seconds", str(seconds)]
        procs.append(subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}))
    results = []
    for w, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        current = dirs[w] / "current.txt"
        last = current.read_text() if current.exists() else "(none)"
        if proc.returncode != 0:
            results.append({"worker": w, "rc": proc.returncode, "last_case": last, "stderr": err[-2000:]})
            continue
        results.append({"worker": w, "rc": 0, **json.loads(out.strip().splitlines()[-1])})
    total = {"files": sum(r.get("files", 0) for r in results), "workers": results}
    outcomes: dict[str, int] = {}
    for r in results:
        for k, v in r.get("outcomes", {}).items():
            outcomes[k] = outcomes.get(k, 0) + v
    total["outcomes"] = outcomes
    return total


# ---- the tests -------------------------------------------------------------------------------

FILES = int(os.environ.get("MODELPRESS_FUZZ_FILES", "10000"))


@pytest.mark.pipeline  # 10,000 files in child processes: 40-60 s, too long for the fast tier
def test_mutated_packed_files_load_or_raise_packed_format_error():
    t0 = time.perf_counter()
    result = run_campaign(seed=22, count=FILES, workers=2, timeout=600)
    seconds = time.perf_counter() - t0
    for r in result["workers"]:
        assert r["rc"] == 0, f"the fuzz child died (rc {r['rc']}: an abort or a memory blow-up) on {r['last_case']}\n{r['stderr']}"
        assert not r["others"], "exceptions other than PackedFormatError:\n" + json.dumps(r["others"], indent=1)
        assert r["slowest_s"] < MAX_SECONDS_PER_FILE, r["slowest"]
    assert result["files"] >= FILES - 1
    assert set(result["outcomes"]) == {"ok", "PackedFormatError"} or set(result["outcomes"]) <= {"ok", "PackedFormatError"}
    assert result["outcomes"]["PackedFormatError"] > result["files"] // 2
    print(f"fuzz: {result['files']} files in {seconds:.1f} s, {result['outcomes']}, "
          f"peak RSS {max(r['peak_rss_mib'] for r in result['workers'])} MiB per child "
          f"({max(r['rss_before_mib'] for r in result['workers'])} MiB before the loop)")


@pytest.mark.pipeline  # child processes
def test_the_child_catches_an_abort_and_a_memory_blow_up(tmp_path):
    """The harness itself: a child that aborts or exceeds its address space fails, named."""
    code = ("import resource, os, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
            "if sys.argv[1] == 'abort': os.abort()\n"
            "x = bytearray(2 << 30)\n")
    for what in ("abort", "memory"):
        proc = subprocess.run([sys.executable, "-c", code, what], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0, what


# ---- crafted files seen in the wild, one by one (in process: each is refused before any allocation) --

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    files = dict(build_corpus(tmp_path_factory.mktemp("corpus")))
    torch.set_num_threads(before)
    return files


def _load(tmp_path, data: bytes, materialize: bool = True):
    from modelpress.pack import load_packed

    path = tmp_path / "f.mpk"
    path.write_bytes(data)
    return load_packed(path, materialize=materialize)


def _peak_mib(fn) -> tuple[float, str]:
    """Peak of Python and numpy allocations (tracemalloc) while ``fn()`` raises PackedFormatError."""
    import tracemalloc

    from modelpress.pack import PackedFormatError

    tracemalloc.start()
    try:
        with pytest.raises(PackedFormatError) as info:
            fn()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20, str(info.value)
    finally:
        tracemalloc.stop()


def _entry(header, enc, pred=lambda p: True):
    return next(t for t in header["tensors"] if t[1] == enc and pred(t[2]))


def test_header_decompression_bomb_is_refused_in_bounded_memory(corpus, tmp_path):
    from modelpress.pack import PackedFormatError

    raw = corpus["dense/f16/f16/rc"]
    blob = zlib.compress(b'{"meta":"' + b"A" * (64 * 2 ** 20) + b'"}', 9)  # 64 MiB of header in 64 KiB
    peak, msg = _peak_mib(lambda: _load(tmp_path, MAGIC + struct.pack("<I", len(blob)) + blob + split(raw)[1]))
    assert "more than" in msg and peak < 40, (peak, msg)  # the 16 MiB cap, not 64 MiB
    with pytest.raises(PackedFormatError, match="corrupted"):
        _load(tmp_path, MAGIC + struct.pack("<I", 2 ** 32 - 1) + b"x" * 100)


@pytest.mark.parametrize("field", ["format", "arch", "meta", "payload_bytes", "sha256", "tensors"])
def test_missing_or_mistyped_header_fields_raise_packed_format_error(corpus, tmp_path, field):
    from modelpress.pack import PackedFormatError

    header, payload = split(corpus["pq/f16/f16/rc"])
    for value in (None, "1", [], {}, -1, True, 1.5):
        if field == "meta" and value == {}:
            continue  # empty metadata is valid
        h = json.loads(json.dumps(header))
        h[field] = value
        with pytest.raises(PackedFormatError):
            _load(tmp_path, assemble(h, payload, fix=False))
    h = json.loads(json.dumps(header))
    del h[field]
    with pytest.raises(PackedFormatError):
        _load(tmp_path, assemble(h, payload, fix=False))


@pytest.mark.parametrize("key", ["n", "shape", "k", "d", "bits", "cb", "hist_n", "coder"])
def test_entry_params_missing_or_mistyped_raise_packed_format_error_naming_the_entry(corpus, tmp_path, key):
    from modelpress.pack import PackedFormatError

    header, payload = split(corpus["pq/f16/f16/rc"])
    name, _, p = _entry(header, "pq", lambda p: "coder" in p)
    for value in (None, "x", [], 2 ** 40, -1, 1.5):
        h = json.loads(json.dumps(header))
        _entry(h, "pq", lambda q: q == p)[2][key] = value
        with pytest.raises(PackedFormatError, match=name):
            _load(tmp_path, assemble(h, payload))
    h = json.loads(json.dumps(header))
    del _entry(h, "pq", lambda q: q == p)[2][key]
    with pytest.raises(PackedFormatError, match=name):
        _load(tmp_path, assemble(h, payload))


def test_sparse_entry_claiming_a_4_gib_mask_fails_before_allocating(corpus, tmp_path):

    header, payload = split(corpus["sparse/f16/f16/rc"])
    name, _, p = _entry(header, "sparse", lambda p: p["pos"] == "bitmask")
    p["shape"] = [2 ** 16, 2 ** 16, 8]  # 2**35 weights: a 4 GiB mask
    peak, msg = _peak_mib(lambda: _load(tmp_path, assemble(header, payload)))
    assert name in msg and peak < 40, (peak, msg)


@pytest.mark.parametrize("kwargs", [{"width": 4096, "hidden": 65536}, {"num_classes": 10 ** 9}, {"in_channels": 10 ** 6},
                                    {"hidden": 2 ** 40}, {"depth": 3}, {"num_classes": "10"}, {"num_classes": [10]}])
def test_architecture_arguments_are_bounded_and_checked_against_the_builder(corpus, tmp_path, kwargs):
    """A crafted file cannot make the builder allocate (a crafted file once asked for 52 GB): the arguments are
    bounded, checked against the builder's signature, and the model is first built on the meta device."""

    header, payload = split(corpus["dense/f16/f16/rc"])
    header["arch"]["kwargs"].update(kwargs)
    t0 = time.perf_counter()
    peak, msg = _peak_mib(lambda: _load(tmp_path, assemble(header, payload)))
    assert "arch" in msg and peak < 40 and time.perf_counter() - t0 < 10, (peak, msg)


def test_range_coded_entry_with_a_huge_count_cannot_abort_the_process(corpus, tmp_path):
    """constriction's decoder aborts the process (exit -6) when asked for 2**40 symbols (its
    allocation fails): such a count is refused before the decoder is called. In a child process,
    so that a regression fails this test instead of killing pytest."""
    header, payload = split(corpus["pq/f16/f16/rc"])
    name, _, p = _entry(header, "pq", lambda p: "coder" in p)
    p["shape"] = [2 ** 20, 2 ** 20]
    p["d"] = 1
    (tmp_path / "huge.mpk").write_bytes(assemble(header, payload))
    code = ("import sys\nfrom modelpress.pack import PackedFormatError, load_packed\n"
            "from modelpress.pack.bits import decode_codes\n"
            "import numpy as np\n"
            "try:\n    load_packed(sys.argv[1])\nexcept PackedFormatError as e:\n    print('refused:', e)\n"
            "try:\n    decode_codes({'bits': 1, 'coder': 'range', 'hist_n': 6}, bytes([128, 128, 128, 128, 128, 32, 0]) + bytes(8), 2, 2 ** 40)\n"
            "except PackedFormatError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "huge.mpk")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("refused:") == 2 and name in proc.stdout, proc.stdout


def test_missing_extra_or_reshaped_tensor_is_found_by_check_summary_and_load(corpus, tmp_path):
    from modelpress.pack import PackedFormatError, read_packed

    header, payload = split(corpus["pq/f16/f16/rc"])
    (tmp_path / "ok.mpk").write_bytes(corpus["pq/f16/f16/rc"])
    read_packed(tmp_path / "ok.mpk").check()
    offs = _offsets(header)
    i = next(j for j, t in enumerate(header["tensors"]) if t[0] == "classifier.5.bias")
    a, b = offs[i]
    h = json.loads(json.dumps(header))
    del h["tensors"][i]
    (tmp_path / "missing.mpk").write_bytes(assemble(h, payload[:a] + payload[b:]))
    packed = read_packed(tmp_path / "missing.mpk")  # a well-formed file ...
    for call in (packed.check, packed.summary, lambda: _load(tmp_path, (tmp_path / "missing.mpk").read_bytes())):
        with pytest.raises(PackedFormatError, match=r"missing \['classifier.5.bias'\]"):  # ... that lacks a tensor
            call()
    h = json.loads(json.dumps(header))
    h["tensors"].append(["classifier.9.bias", *h["tensors"][i][1:]])
    (tmp_path / "extra.mpk").write_bytes(assemble(h, payload + payload[a:b]))
    with pytest.raises(PackedFormatError, match="unexpected"):
        read_packed(tmp_path / "extra.mpk").check()
    h = json.loads(json.dumps(header))
    h["tensors"][i][2]["shape"] = [5, 2]
    (tmp_path / "shape.mpk").write_bytes(assemble(h, payload))
    with pytest.raises(PackedFormatError, match="shape"):
        read_packed(tmp_path / "shape.mpk").summary()


def test_rebuild_without_a_registered_layer_type_names_the_encoding(corpus, tmp_path, monkeypatch):
    from modelpress.pack import PackedFormatError, codecs

    monkeypatch.setattr(codecs, "_BY_KIND", {})
    with pytest.raises(PackedFormatError, match="no layer type registered for encoding 'pq'; import modelpress.methods"):
        _load(tmp_path, corpus["pq/f16/f16/rc"], materialize=False)
    _load(tmp_path, corpus["pq/f16/f16/rc"], materialize=True)  # materialized: no layer type needed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--extra-as", type=int, default=EXTRA_AS)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--seconds", type=float)
    a = ap.parse_args()
    print(json.dumps(child(a.seed, a.count, a.extra_as, a.workdir, a.seconds)))


if __name__ == "__main__":
    main()
