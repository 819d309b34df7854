"""Stage-2 / Stage-1 step benchmark: the memory method and a smoke run of the command (no timing assertions)."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from tcm_core.gpu.bench import cpu_peak_bytes, paired_ratio

MiB = 2**20


def test_cpu_peak_counts_live_allocator_bytes():
    result: dict[str, int] = {}
    with cpu_peak_bytes(result):
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(3 * MiB, dtype=torch.uint8)
        del a
        c = torch.empty(2 * MiB, dtype=torch.uint8)  # live: b + c = 5 MiB > a + b = 4 MiB
        del b, c
        d = torch.empty(MiB // 2, dtype=torch.uint8)
        del d
    assert result["peak"] == pytest.approx(5 * MiB, rel=0.01)


def _median_rank_interval(n: int, confidence: float) -> tuple[int, int]:
    """1-based ranks of the distribution-free interval of a median: the largest k with P(Bin(n, 1/2) < k) <= a/2."""
    below = lambda k: sum(math.comb(n, i) for i in range(k)) / 2**n  # noqa: E731  P(Bin(n, 1/2) <= k - 1)
    k = max(k for k in range(1, n // 2 + 1) if below(k) <= (1 - confidence) / 2)
    return k, n + 1 - k


@pytest.mark.parametrize("n", [6, 20, 25, 41])
def test_paired_ratio_interval_is_the_median_order_statistics(n):
    gen = torch.Generator().manual_seed(n)
    first = (0.2 + 0.1 * torch.rand(n, generator=gen)).tolist()
    second = (0.2 + 0.1 * torch.rand(n, generator=gen)).tolist()
    result = paired_ratio(first, second)
    ratios = sorted(b / a for a, b in zip(first, second))
    assert result["ratios"] == pytest.approx([b / a for a, b in zip(first, second)])
    assert result["median"] == pytest.approx(statistics.median(ratios))
    low, high = _median_rank_interval(n, 0.95)
    assert (low, high) == {6: (1, 6), 20: (6, 15)}.get(n, (low, high))  # textbook ranks
    assert result["interval"] == pytest.approx([ratios[low - 1], ratios[high - 1]])


def test_paired_ratio_verdict_against_the_goal():
    base = [0.2 + 0.001 * i for i in range(10)]
    meets = paired_ratio(base, [b * (1.0 + 0.002 * (i % 3)) for i, b in enumerate(base)], goal=1.05)
    misses = paired_ratio(base, [b * (1.08 + 0.002 * (i % 3)) for i, b in enumerate(base)], goal=1.05)
    straddles = paired_ratio(base, [b * (1.0 + 0.02 * i) for i, b in enumerate(base)], goal=1.05)
    assert (meets["verdict"], misses["verdict"], straddles["verdict"]) == ("meets", "misses", "inconclusive")
    assert straddles["interval"][0] < 1.05 < straddles["interval"][1]
    few = paired_ratio(base[:5], base[:5], goal=1.05)
    assert few["interval"] == [None, None] and few["verdict"].startswith("inconclusive (an interval needs >= 6")


def test_step_benchmark_pairs_are_the_measured_steps():
    """The report's paired ratios are the measured Stage-2 / Stage-1 times, repeat by repeat."""
    from tcm_core.gpu.bench import GOALS, run_step_benchmark

    micro = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
    report = run_step_benchmark("tiny", batch=4, repeats=6, warmup=0, arch_overrides=micro)
    pairs = report["time_pairs"]
    assert pairs["ratios"] == pytest.approx([b / a for a, b in zip(report["stage1_times_s"], report["stage2_times_s"])])
    assert len(pairs["ratios"]) == 6 and pairs["goal"] == GOALS["time"]
    assert pairs["interval"] == pytest.approx([min(pairs["ratios"]), max(pairs["ratios"])])  # n = 6: ranks 1 and 6
    assert report["stage2_over_stage1_time"] == pytest.approx(min(report["stage2_times_s"])
                                                              / min(report["stage1_times_s"]))
    assert report["mem_verdict"] == ("meets" if report["stage2_over_stage1_mem"] <= GOALS["mem"] else "misses")


@pytest.mark.slow
def test_bench_command_smoke():
    cmd = [sys.executable, "-m", "tcm_core", "bench", "--net", "tiny", "--batch", "8", "--repeats", "1"]
    cmd += ["--warmup", "0", "--device", "cpu", "--threads", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    for key in ("net", "batch", "device", "torch", "stage1_time_s", "stage2_time_s", "stage1_peak_bytes"):
        assert key in result
    assert result["net"] == "tiny" and result["batch"] == 8 and result["device"] == "cpu"
    for key in ("stage2_over_stage1_time", "stage2_over_stage1_mem"):
        assert math.isfinite(result[key]) and result[key] > 0
    # The peak includes the static state, and Stage 2 holds exactly one more copy of the weights.
    weight_bytes = result["parameters"] * 4
    assert result["stage1_peak_bytes"] >= result["stage1_static_bytes"] >= 4 * weight_bytes
    assert result["stage2_static_bytes"] - result["stage1_static_bytes"] == pytest.approx(weight_bytes, rel=0.01)


def test_train_bench_times_ct_and_cd_of_each_mode():
    from tcm_core.gpu.bench import bench_variants, benchmark_train_iterations

    assert bench_variants(("pretrain", "stage2"), ("ct", "cd")) == [
        ("pretrain", "pretrain", "ct"), ("stage2", "stage2", "ct"), ("stage2_cd", "stage2", "cd")]
    micro = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
    result = benchmark_train_iterations("tiny", batch=4, repeats=1, warmup=0, rounds=1, modes=("stage1",),
                                        methods=("ct", "cd"), arch_overrides=micro)
    assert result["stage1_train_s_per_it"] > 0 and result["stage1_cd_train_s_per_it"] > 0
    assert result["stage1_cd_over_ct_train_time"] == pytest.approx(
        result["stage1_cd_train_s_per_it"] / result["stage1_train_s_per_it"])
    assert result["cd"] == {"method": "cd", "ode_solver": "heun", "guidance": None}
    # a guided Euler teacher (the tiny preset's distillation arm): the synthetic net is made class-conditional
    guided = benchmark_train_iterations("tiny", batch=4, repeats=1, warmup=0, rounds=1, modes=("stage2",),
                                        methods=("cd",), arch_overrides=micro, ode_solver="euler", guidance=1.5)
    assert guided["cd"] == {"method": "cd", "ode_solver": "euler", "guidance": 1.5}
    assert guided["stage2_cd_train_s_per_it"] > 0
    with pytest.raises(ValueError, match="methods"):
        bench_variants(("stage1",), ("ddim",))


def test_profile_script_compares_the_two_stages_op_by_op():
    """scripts/profile_stage2_step.py: both stages' op time per step, their ratio, and the frozen net's extra call
    (Stage 2 makes more convolution calls than Stage 1 on the same batch; only it copies sub-batches)."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "profile_stage2_step.py")
    cmd = [sys.executable, script, "--batch", "8", "--rounds", "1", "--steps", "1", "--top", "1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    head, *rows = proc.stdout.splitlines()
    assert head.startswith("op time per step: Stage 1 ") and "ratio" in head
    calls = {row.split()[2]: row for row in rows}
    assert "aten::index_select" in calls and "Stage 1    0.00 ms (0 calls)" in calls["aten::index_select"]
    conv = calls["aten::mkldnn_convolution"]
    s1, s2 = (int(part.split("(")[1].split()[0]) for part in conv.split("Stage ")[1:])
    assert s2 > s1
