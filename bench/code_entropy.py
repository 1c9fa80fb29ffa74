"""How much would entropy coding of the PQ codes save? Per layer of a packed file: stored bits
per code, the empirical entropy of its codes, and the bytes an ideal coder would save after
paying for the layer's code histogram (k counts of 2 bytes).

    python bench/code_entropy.py data/model.mpk
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from modelpress.pack import read_packed
from modelpress.pack.format import decode_pq, decode_sparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    args = ap.parse_args()
    packed = read_packed(args.file)
    total_saved = 0
    print(f"{'tensor':<28} {'k':>5} {'bits':>4} {'entropy':>8} {'codes':>8} {'stored B':>9} {'ideal B':>9} {'saved B':>8}")
    for name, enc, p, buf in packed.entries:
        if enc == "pq":
            _, codes = decode_pq(p, buf)
        elif enc == "sparse" and p["values"] == "pq":
            _, (_, codes) = decode_sparse(p, buf)
        else:
            continue
        counts = np.bincount(codes.numpy(), minlength=p["k"])
        prob = counts[counts > 0] / counts.sum()
        h = float(-(prob * np.log2(prob)).sum())
        stored = math.ceil(len(codes) * p["bits"] / 8)
        ideal = math.ceil(len(codes) * h / 8) + 2 * p["k"]
        saved = stored - ideal
        total_saved += max(0, saved)
        print(f"{name:<28} {p['k']:>5} {p['bits']:>4} {h:>8.3f} {len(codes):>8} {stored:>9} {ideal:>9} {saved:>8}")
    print(f"file {packed.size:,} bytes; entropy coding would save at most {total_saved:,} bytes "
          f"({100 * total_saved / packed.size:.2f} %)")


if __name__ == "__main__":
    main()
