"""Power analysis of claims S1 and S5 on a finished study (a measurement, not a test; tcm_core.report.power).

    .venv/bin/python scripts/power_analysis.py results/tiny [--preset tiny] [--sampling-seeds 5] [--num 1000]

Measures the evaluation noise first: seed 0's network of each arm of S1 (Stage 2, its control) and S5 (the
distillation arm's) is evaluated again over S sampling seeds with `python -m tcm_core evaluate fid` (no MLflow; the
JSONs go to <results>/_power/, a folder the tables never read). Then it prints the power table: the spread of the
per-seed differences of the study's own FIDs, its evaluation and training parts, the MDE at the study's K, and the K
that brings the MDE to 15 % of the control's FID with the study's evaluation size and with 4x the images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tcm_core.report.merge import collect
from tcm_core.report.power import evaluation_sd, power_rows, power_table
from tcm_core.schedules import T_MAX

ARMS = {"S1": (("stage2", "main"), ("stage1_continued", "main")),
        "S5": (("stage2", "distill"), ("stage1_continued", "distill"))}


def _network(results, stage: str, grid: str) -> Path | None:
    run = results.main_run(stage) if grid == "main" else results.distill_run(stage)
    path = run.run_dir / "network.safetensors" if run is not None and run.run_dir is not None else None
    return path if path is not None and path.is_file() else None


def _fid_over_seeds(net: Path, out: Path, data: Path, num: int, seeds: int) -> list[float]:
    if not out.is_file():
        cmd = [sys.executable, "-m", "tcm_core", "evaluate", "fid", "--ckpt", str(net), "--steps", str(T_MAX),
               "--num", str(num), "--seeds", str(seeds), "--extractor", "lenet", "--feature-net",
               str(data / "lenet.pt"), "--ref-stats", str(data / "ref_stats_lenet.npz"), "--out", str(out),
               "--device", "cpu"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["per_seed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the study's results folder, e.g. results/tiny")
    parser.add_argument("--preset", default=None, help="its preset (default: the folder's name)")
    parser.add_argument("--sampling-seeds", type=int, default=5)
    parser.add_argument("--num", type=int, default=None, help="images per FID (default: the study's own)")
    args = parser.parse_args()
    results, _ = collect(args.results, args.preset or args.results.name, None)
    study_rows = power_rows(results)
    num = args.num or next(e.setup[1] for e in results.evaluations if e.metric == "fid_1step" and e.setup)
    folder = args.results / "_power"
    folder.mkdir(exist_ok=True)
    eval_sd, spreads = {}, []
    for claim, arms in ARMS.items():
        nets = [_network(results, *arm) for arm in arms]
        if None in nets:
            continue
        per_seed = [_fid_over_seeds(net, folder / f"{claim}_{stage}_{grid}_{num}x{args.sampling_seeds}.json",
                                    args.results / "data", num, args.sampling_seeds)
                    for net, (stage, grid) in zip(nets, arms)]
        eval_sd[claim] = tuple(evaluation_sd(values) for values in per_seed)
        spreads += [f"{claim} {stage} ({grid}) seed 0 over {len(v)} sampling seeds: "
                    + ", ".join(f"{x:.3f}" for x in v) for v, (stage, grid) in zip(per_seed, arms)]
    rows = power_rows(results, eval_sd)
    print("\n".join(spreads))
    print(power_table(rows or study_rows, num).markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
