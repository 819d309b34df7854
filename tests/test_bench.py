"""Stage-2 / Stage-1 step benchmark: the memory method and a smoke run of the command (no timing assertions)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tcm_core.bench import cpu_peak_bytes

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


@pytest.mark.slow
def test_bench_command_smoke():
    cmd = [sys.executable, "-m", "tcm_core.bench", "--net", "tiny", "--batch", "8", "--repeats", "1", "--warmup", "0"]
    cmd += ["--device", "cpu", "--threads", "1", "--json"]
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
    from tcm_core.bench import bench_variants, benchmark_train_iterations

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
