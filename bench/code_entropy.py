"""What entropy coding of the codes saves, per layer of packed files: bits per code, the
empirical entropy of the codes, their bytes bit-packed and range coded (histogram included,
``constriction``'s coder, what the packer writes when it is smaller), and the whole file's size
packed both ways. Codes and weights are identical either way (lossless).

    python bench/code_entropy.py data/model.mpk [more.mpk ...]
"""

from __future__ import annotations

import argparse

import numpy as np

from modelpress.pack import read_packed
from modelpress.pack.format import build_from_packed, decode_affine, decode_pq, decode_sparse, encode_codes, packed_nbytes


def layer_codes(enc: str, p: dict, buf: bytes) -> tuple[np.ndarray, int] | None:
    if enc == "pq":
        return decode_pq(p, buf)[1].numpy(), p["k"]
    if enc == "sparse" and p["values"] == "pq":
        return decode_sparse(p, buf)[1][1].numpy(), p["k"]
    if enc == "affine":
        return decode_affine(p, buf)[2].reshape(-1).numpy(), 2 ** p["bits"]
    return None


def report(path: str, layers: bool) -> tuple[int, int]:
    packed = read_packed(path)
    if layers:
        print(f"{path}")
        print(f"  {'tensor':<26} {'k':>5} {'bits':>4} {'entropy':>7} {'codes':>7} {'packed B':>8} {'coded B':>8} {'saved':>6}")
    for name, enc, p, buf in packed.entries:
        got = layer_codes(enc, p, buf)
        if got is None or not layers:
            continue
        codes, k = got
        prob = np.bincount(codes, minlength=k) / max(1, codes.size)
        prob = prob[prob > 0]
        h = float(-(prob * np.log2(prob)).sum())
        plain = len(encode_codes(codes, k, p["bits"], entropy=False)[1])
        coded = len(encode_codes(codes, k, p["bits"], entropy=True)[1])
        print(f"  {name:<26} {k:>5} {p['bits']:>4} {h:>7.3f} {codes.size:>7} {plain:>8} {coded:>8} {plain - coded:>6}")
    model = build_from_packed(packed, materialize=False)
    dtypes = [(p.get("dtype") or p.get("cb") or p.get("values")) for _, _, p, _ in packed.entries]
    float_dtype = "f32" if "f32" in dtypes else "f16"
    sizes = [packed_nbytes(model, float_dtype, float_dtype, packed.arch, packed.meta, entropy=e) for e in (False, True)]
    return sizes[0], sizes[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--layers", action="store_true", help="one row per layer as well")
    args = ap.parse_args()
    rows = [(f, *report(f, args.layers)) for f in args.files]
    print("\n| file | bytes, codes bit-packed | bytes, codes entropy coded | saved |\n|---|---|---|---|")
    for f, plain, coded in rows:
        print(f"| {f} | {plain:,} | {coded:,} | {plain - coded:,} ({100 * (plain - coded) / plain:.1f} %) |")


if __name__ == "__main__":
    main()
