"""Where a Stage-2 step spends more than a Stage-1 step: torch.profiler op time per step, by op (a benchmark).

    python scripts/profile_stage2_step.py [--net tiny] [--batch 32] [--rounds 6] [--steps 3] [--threads 1]

Builds the two runs as `python -m tcm_core bench` does (`bench.build_run` on synthetic files: same net, same
batch, both at the curriculum cap), warms each up, then profiles `steps` calls of the real `train_step` of each
stage in turn for `rounds` interleaved rounds (S1, S2, S1, S2, ... so drifting load affects both alike). Prints
the op time per step of each stage (median over rounds), their ratio, and the ops whose time per step differs
most (means over rounds, with call counts). An op both stages call equally often (`convolution_backward`)
shows the noise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tcm_core.gpu import bench
from tcm_core.training.step import train_step


def op_times(run, steps: int) -> dict[str, tuple[float, float]]:
    """{op: (self CPU ms per step, calls per step)} over `steps` profiled steps of `run`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(run)
    return {e.key: (e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in prof.key_averages()}


def mean_ops(rounds: list[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Per-op means over rounds (an op missing from a round counts as 0 there)."""
    keys = set().union(*rounds)
    return {k: tuple(sum(r.get(k, (0.0, 0.0))[i] for r in rounds) / len(rounds) for i in (0, 1)) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds: dict[str, list[dict[str, tuple[float, float]]]] = {"stage1": [], "stage2": []}
    with tempfile.TemporaryDirectory(prefix="tcm-profile-") as folder:
        inputs = bench.write_synthetic_inputs(Path(folder), args.net)
        runs = {mode: bench.build_run(inputs, mode, bench.bench_config(mode, args.batch), "cpu", Path(folder) / mode)
                for mode in rounds}
        for run in runs.values():
            for _ in range(3):
                train_step(run)  # warm-up: optimiser state, allocator
        for _ in range(args.rounds):
            for mode, run in runs.items():
                rounds[mode].append(op_times(run, args.steps))
    total = {mode: statistics.median(sum(ms for ms, _ in ops.values()) for ops in per) for mode, per in rounds.items()}
    print(f"op time per step: Stage 1 {total['stage1']:.1f} ms, Stage 2 {total['stage2']:.1f} ms, "
          f"ratio {total['stage2'] / total['stage1']:.3f} ({args.net}, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps)")
    times = {mode: mean_ops(per) for mode, per in rounds.items()}
    one, two = times["stage1"], times["stage2"]
    diffs = sorted(((two.get(k, (0, 0))[0] - one.get(k, (0, 0))[0], k) for k in set(one) | set(two)), reverse=True)
    for diff, key in diffs[: args.top]:
        (ms1, n1), (ms2, n2) = one.get(key, (0.0, 0.0)), two.get(key, (0.0, 0.0))
        print(f"{diff:+8.2f} ms  {key:34s} Stage 1 {ms1:7.2f} ms ({n1:.0f} calls)"
              f"  Stage 2 {ms2:7.2f} ms ({n2:.0f} calls)")


if __name__ == "__main__":
    main()
