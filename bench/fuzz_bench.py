"""Fuzz the packed-file reader longer than the test does.

    .venv/bin/python bench/fuzz_bench.py                    # 50,000 mutated files, 2 workers
    .venv/bin/python bench/fuzz_bench.py --files 200000 --workers 2 --seed 7
    .venv/bin/python bench/fuzz_bench.py --codes 20000      # constriction's range decoder alone

The file campaign is tests/test_pack_fuzz.py's (same corpus, same mutations, each worker a
child process under RLIMIT_AS = its mapped size after importing torch + ``--extra-as`` MiB).
Prints files tried, outcomes, the slowest file, peak RSS per worker and seconds; exits 1 if a
worker died (an abort or a memory blow-up) or raised anything but PackedFormatError.

``--codes N`` fuzzes ``constriction``'s range decoder directly (random histograms, words and
counts, and mutated real streams) in a child process that is restarted after each abort, and
prints every input that aborted the process: how the reader's checks before the decoder were
found (an abort comes from a symbol count whose output the decoder cannot allocate).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_pack_fuzz import run_campaign  # noqa: E402

CODES_CHILD = r'''
import json, sys
import numpy as np
import constriction
start, n, seed, log_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log = open(log_path, "w")
C, Q = constriction.stream.model.Categorical, constriction.stream.queue
for i in range(start, n):
    r = np.random.default_rng([seed, i])
    k = int(r.choice([1, 2, 3, 8, 256, 65536]))
    if r.random() < 0.5:  # a real stream, then mutated
        codes = r.choice(k, size=int(r.choice([1, 10, 3000])), p=(q := 1.0 / np.arange(1, k + 1) ** r.uniform(0, 3)) / q.sum())
        counts = np.bincount(codes, minlength=k).astype(np.int64)
        try:
            enc = Q.RangeEncoder()
            enc.encode(codes.astype(np.int32), C(counts.astype(np.float64), perfect=False))
        except BaseException:
            continue
        words = enc.get_compressed().astype(np.uint32)
        if len(words) and r.random() < 0.5:
            words[r.integers(0, len(words))] ^= np.uint32(1 << int(r.integers(0, 32)))
    else:
        counts = r.integers(0, int(r.choice([2, 1000, 2 ** 40])), k)
        words = r.integers(0, 2 ** 32, int(r.choice([0, 1, 5, 1000])), dtype=np.uint64).astype(np.uint32)
    count = int(counts.sum()) if r.random() < 0.8 else int(r.choice([0, 1, 2 ** 20, 2 ** 33, 2 ** 40]))
    log.seek(0)
    log.write(json.dumps({"i": i, "k": k, "count": count, "counts_head": counts[:6].tolist(), "words": len(words)}) + "\n" * 4)
    log.truncate()
    log.flush()
    try:
        Q.RangeDecoder(words).decode(C(counts.astype(np.float64), perfect=False), count)
    except BaseException:
        pass
'''


def fuzz_codes(n: int, seed: int) -> int:
    log = Path(tempfile.mkdtemp()) / "current.json"
    start, aborts, t0 = 0, [], time.perf_counter()
    while start < n:
        proc = subprocess.run([sys.executable, "-c", CODES_CHILD, str(start), str(n), str(seed), str(log)],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            break
        text = log.read_text().strip() if log.exists() else ""
        if not text:
            print(f"the decoder fuzz child failed on its own (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
            return 1
        case = json.loads(text)
        aborts.append({"rc": proc.returncode, **case, "stderr": proc.stderr.strip().splitlines()[:1]})
        start = case["i"] + 1
    print(f"decode_codes fuzz: {n} inputs in {time.perf_counter() - t0:.1f} s, {len(aborts)} aborts")
    for a in aborts[:50]:
        print("  abort:", json.dumps(a))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--extra-as", type=int, default=1024, help="MiB of address space beyond torch's import (default 1024)")
    ap.add_argument("--codes", type=int, default=0, help="fuzz constriction's range decoder alone with this many inputs")
    a = ap.parse_args()
    if a.codes:
        return fuzz_codes(a.codes, a.seed)
    t0 = time.perf_counter()
    result = run_campaign(a.seed, a.files, a.workers, extra_as=a.extra_as << 20, timeout=24 * 3600)
    seconds = time.perf_counter() - t0
    bad = 0
    print(f"files tried: {result['files']} in {seconds:.1f} s ({result['files'] / seconds:.0f} files/s, {a.workers} workers)")
    print(f"outcomes: {json.dumps(result['outcomes'])}")
    for r in result["workers"]:
        if r["rc"] != 0:
            bad += 1
            print(f"worker {r['worker']}: DIED rc={r['rc']} on {r['last_case']}\n{r['stderr']}")
            continue
        print(f"worker {r['worker']}: {r['files']} files in {r['seconds']} s, peak RSS {r['peak_rss_mib']} MiB ({r['rss_before_mib']} MiB before the loop), "
              f"RLIMIT_AS {r['limit_as_mib']} MiB (+{r['extra_as_mib']} MiB over torch's import), "
              f"slowest file {r['slowest_s']} s ({r['slowest']})")
        for o in r["others"]:
            bad += 1
            print(f"  NOT PackedFormatError: {o['case']}: {o['error']} at {o['where']} (kept in {o['file']})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
