"""Iterative magnitude pruning on the default Fashion-MNIST teacher: a table of
sparsity x retraining (LR rewinding vs fine-tuning), top-1 from each packed file, bytes on
disk and the ratio to the fp32 teacher; then pruning followed by quantization of survivors.

    python bench/prune_bench.py                        # all rows (about 40 min on 2 CPU cores)
    python bench/prune_bench.py --retrain lr_rewind --targets 0.5 0.9

Each row is a real pipeline run (``modelpress.sweep.run_point``: compress -> finetune -> pack,
then the packed file is loaded and evaluated on the full test set). One chain of pruning cycles per
retraining mode serves every sparsity: a run to 90 % with milestones at 50 and 80 % reuses the
cycles of the run to 95 % (same schedule prefix), so nothing is trained twice. The teacher is
trained once with params.yaml's settings (3 epochs) and shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def recipe_for(work: Path, method: dict, finetune_epochs: float):
    from modelpress.recipe import Recipe

    raw = Recipe.from_yaml(REPO / "params.yaml").model_dump(mode="json")
    raw["run"]["workdir"] = str(work)
    raw["method"] = method
    raw["finetune"]["epochs"] = finetune_epochs
    raw["registry"]["enabled"] = False
    return Recipe.parse(raw)


def base_pq() -> dict:
    from modelpress.recipe import Recipe

    return Recipe.from_yaml(REPO / "params.yaml").method.model_dump(mode="json")


def run_row(recipe) -> dict:
    """One row: the sweep's point runner, in this process (compress -> finetune -> pack ->
    evaluate the packed file); its summary with the row's seconds."""
    from modelpress.sweep import run_point

    rec = run_point(recipe)
    return {**rec["summary"], "seconds": rec["seconds"]["total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(REPO / "bench" / "out" / "prune"))
    ap.add_argument("--retrain", nargs="*", default=["lr_rewind", "finetune"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--rewind-fraction", type=float, default=1 / 3,
                    help="share of the teacher's 3-epoch schedule each cycle replays (1/3 = 1 epoch per cycle)")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--pq-targets", nargs="*", type=float, default=[0.9, 0.95], help="prune_pq rows (lr_rewind cycles)")
    ap.add_argument("--pq-k", nargs="*", type=int, default=[16, 4])
    ap.add_argument("--pq-blocks", nargs="*", type=int, default=[8, 16, 32],
                    help="plain PQ rows (params.yaml's PQ with this linear block size) for the equal-bytes comparison")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from modelpress import stages

    root = Path(args.workdir)
    from modelpress.recipe import Recipe

    default_finetune = Recipe.from_yaml(REPO / "params.yaml").finetune.epochs
    base = recipe_for(root / "teacher-only", {"name": "pq"}, 0)
    stages.fetch(base)
    stages.teacher(base)  # trained once (3 epochs), reused below
    teacher = stages.read_json(stages.paths(base)["teacher_info"])
    print(f"teacher: top-1 {teacher['top1']:.2f}%, {teacher['fp32_bytes']:,} fp32 bytes, trained in {teacher['seconds']:.0f} s",
          flush=True)

    def workdir_for(name: str) -> Path:
        w = root / name
        if not (w / "teacher").is_dir():
            w.mkdir(parents=True, exist_ok=True)
            for sub in ("datasets", "teacher"):
                shutil.copytree(root / "teacher-only" / sub, w / sub, dirs_exist_ok=True)
        return w

    rows = []
    targets = sorted(args.targets)
    for mode in args.retrain:
        work = workdir_for(mode)
        for t in sorted(targets, reverse=True):  # the deepest first: its cycles serve the rest
            method = {"name": "prune", "target_sparsity": t, "milestones": [m for m in targets if m < t], "retrain": mode,
                      "rewind_fraction": args.rewind_fraction, "finetune_lr": args.finetune_lr}
            s = run_row(recipe_for(work, method, 0))
            rows.append({**s, "method": f"prune ({mode})", "sparsity": t})
            print(json.dumps(rows[-1]), flush=True)
    work = workdir_for("lr_rewind")
    for t in args.pq_targets:
        for k in args.pq_k:
            method = {"name": "prune_pq", "prune": {"target_sparsity": t, "milestones": [m for m in targets if m < t],
                                                   "retrain": "lr_rewind", "rewind_fraction": args.rewind_fraction,
                                                   "finetune_lr": args.finetune_lr},
                      "quantize": {"block_size": 1, "k": k}}
            # The same final distillation as plain PQ gets (params.yaml's finetune: 1 epoch).
            s = run_row(recipe_for(work, method, default_finetune))
            rows.append({**s, "method": f"prune_pq (lr_rewind, {k} values)", "sparsity": t})
            print(json.dumps(rows[-1]), flush=True)
    for block in args.pq_blocks:
        method = {**base_pq(), "linear": {"block_size": block, "k": 256}}
        s = run_row(recipe_for(workdir_for(f"pq-linear{block}"), method, default_finetune))
        rows.append({**s, "method": f"pq (linear block {block})", "sparsity": 0.0})
        print(json.dumps(rows[-1]), flush=True)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} cores, {cpu}; teacher top-1 {teacher['top1']:.2f}%")
    print("| method | sparsity | top-1 (packed file) | drop | packed bytes | ratio vs fp32 | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {100 * r['sparsity']:.0f} % | {r['compressed_top1']:.2f} % | {-r['top1_drop']:+.2f} | "
              f"{r['packed_bytes']:,} | {r['compression_ratio']:.1f}x | {r['seconds']:.0f} |")
    (root / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
