"""The GPU check: its CPU dry run (every check through the same functions), failure isolation, time budgets and
the README cost table computed from a check's JSON."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcm_core import cli
from tcm_core.errors import ConfigError
from tcm_core.gpu import cases as gpu_checks
from tcm_core.gpu import check as gpucheck
from tcm_core.gpu import report as gpu_report
from tcm_core.training.setup import check_precision

HOURS = 3600.0
# images per second of one GPU per (preset, mode) for the synthetic JSON
SPEEDS = {("cifar10", "stage1"): 400.0, ("cifar10", "stage2"): 320.0, ("imagenet64_s", "stage1"): 900.0,
          ("imagenet64_s", "stage2"): 700.0, ("imagenet64_xl", "stage1"): 150.0, ("imagenet64_xl", "stage2"): 110.0}


def _speed_record(preset: str, mode: str, images_per_s: float) -> dict:
    return {"check": "train_speed", "name": f"{preset} {mode}", "status": "pass", "reason": None, "seconds": 1.0,
            "figures": {"preset": preset, "mode": mode, "images_per_s": images_per_s,
                        "per_gpu_batch": {"stage1": 64, "stage2": 128}[mode] if preset == "cifar10" else 16}}


def _synthetic_doc(base: dict | None = None) -> dict:
    doc = copy.deepcopy(base) if base else {"cases": [], "cost_jobs": gpucheck.cost_jobs(gpucheck.DEFAULT_CONFIG)}
    doc.update(dry_run=False, date="2031-01-02", environment={**doc.get("environment", {}), "name": "Test GPU"})
    doc["cases"] = [r for r in doc["cases"] if r["check"] != "train_speed"]
    doc["cases"] += [_speed_record(preset, mode, ips) for (preset, mode), ips in SPEEDS.items()]
    return doc


def _check_cost_rows(text: str) -> None:
    """The rows against the paper's iterations x batch (Sec. 4.1, App. E) divided by the synthetic speeds."""
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    header = "| target | GPU-hours on Test GPU (gpucheck 2031-01-02) | wall-clock on the paper's GPUs |"
    assert text.splitlines()[0] == header
    cifar = (250_000 * 512 / 400 + 200_000 * 512 / 400 + 200_000 * 1024 / 320) / HOURS  # Stage 1, control, Stage 2
    imagenet_s = (150_000 * 2048 / 900 + 120_000 * 2048 / 900 + 120_000 * 1024 / 700) / HOURS
    imagenet_xl = (40_000 * 1024 / 150 + 40_000 * 1024 / 110) / HOURS  # no Stage 1: it starts from ECM-XL
    cell = 1000 * 128 / 320 / HOURS
    expected = {"cifar10": (cifar, 8), "imagenet64_s": (imagenet_s, 64), "imagenet64_xl": (imagenet_xl, 64)}
    for target, (hours, gpus) in expected.items():
        row = next(line for key, line in rows.items() if key.startswith(f"`{target}`"))
        assert f"about {gpu_report._about(hours)} |" in row
        assert f"| {gpu_report.wall_clock(hours / gpus)} on {gpus} GPUs |" in row
    assert "`cifar10` `all` (Stage 1 250k x 512, control 200k x 512, Stage 2 200k x 1024)" in text
    assert "`imagenet64_xl` `all` (control 40k x 1024, Stage 2 40k x 1024)" in text
    cell_row = rows["one CIFAR-10 ablation cell (batch 128, on one GPU)"]
    assert f"about {gpu_report._about(cell)} per 1,000 Stage-2 iterations" in cell_row


def test_cost_table_sums_the_jobs_of_all_at_the_measured_speeds():
    _check_cost_rows(gpu_report.cost_table(_synthetic_doc()))
    assert gpu_report._about(534.2) == "530" and gpu_report._about(2.78) == "2.8" and gpu_report._about(0.311) == "0.31"
    assert gpu_report.wall_clock(43.0) == "about 43 hours" and gpu_report.wall_clock(60.0) == "about 2.5 days"


def test_cost_table_marks_unmeasured_jobs_and_refuses_a_dry_run():
    doc = _synthetic_doc()
    doc["cases"] = [r for r in doc["cases"] if r["figures"].get("preset") != "imagenet64_xl"]
    text = gpu_report.cost_table(doc)
    row = "| `imagenet64_xl` `all` (control 40k x 1024, Stage 2 40k x 1024) | not measured (control, Stage 2) | |"
    assert row in text
    with pytest.raises(ConfigError, match="dry-run"):
        gpu_report.cost_table({**doc, "dry_run": True})


def test_paper_jobs_run_at_the_papers_per_gpu_batches():
    jobs = {(s.preset, s.mode): s for s in gpucheck.paper_jobs(gpucheck.DEFAULT_CONFIG)}
    # CIFAR-10 on 8 GPUs (512, 1024), ImageNet-64 on 64 GPUs (2048 / 1024; XL Stage 2 1024)
    assert {k: s.net.batch for k, s in jobs.items()} == {
        ("cifar10", "stage1"): 64, ("cifar10", "stage2"): 128, ("imagenet64_s", "stage1"): 32,
        ("imagenet64_s", "stage2"): 16, ("imagenet64_xl", "stage1"): 16, ("imagenet64_xl", "stage2"): 16}
    assert {s.precision for k, s in jobs.items() if k[0] == "cifar10"} == {"tf32"}
    assert {s.precision for k, s in jobs.items() if k[0] != "cifar10"} == {"fp16"}


def test_dry_run_plan_cases_per_check():
    """30 cases, 3 of them TF32 (CUDA only): the release_fid case times one release-sized FID evaluation."""
    plan = gpucheck.dry_run_plan(gpucheck.DEFAULT_CONFIG, 3600)
    cases = gpucheck.build_cases(plan)
    counts = {check: sum(c.check == check for c in cases) for check in gpucheck.CHECKS}
    assert counts == {"precision": 10, "bench": 4, "ddp": 2, "sampling": 4, "release_fid": 1, "train_speed": 6,
                      "memory": 3}
    assert sum(c.needs_cuda for c in cases) == 3
    gpu = gpucheck.gpu_plan(gpucheck.DEFAULT_CONFIG, 300)
    assert gpu.release[0].net == "ddpmpp" and gpu.release[1] == 1.0 and gpu.release_num == 1000
    # what the CIFAR-10 released_tables generates: 2 releases x 50k x 3 seed sets per NFE, 3 dFID sweeps of 4 x 10k
    assert gpu.release_workload["fid_images"] == {1: 300_000, 2: 300_000}
    assert gpu.release_workload["dfid_images"] == 120_000


def _raise_runtime(ctx):
    raise RuntimeError("boom")


def _fail_criterion(ctx):
    raise gpu_checks.CheckFailed("loss off", {"first_loss": 1.0})


def test_a_failing_case_is_recorded_and_the_others_still_run():
    plan = gpucheck.dry_run_plan(gpucheck.DEFAULT_CONFIG, 300)
    cases = [gpucheck.Case("precision", "raises", _raise_runtime),
             gpucheck.Case("precision", "criterion", _fail_criterion),
             gpucheck.Case("precision", "fine", lambda ctx: {"value": 3}),
             gpucheck.Case("precision", "cuda only", lambda ctx: {}, needs_cuda=True)]
    seen: list[int] = []
    records = gpucheck.run_all(plan, cases, lambda rs: seen.append(len(rs)))
    assert [r["status"] for r in records] == ["fail", "fail", "pass", "skipped"]
    assert records[0]["reason"] == "RuntimeError: boom" and "Traceback" in records[0]["traceback"]
    assert records[1]["figures"] == {"first_loss": 1.0}
    assert records[2]["figures"] == {"value": 3}
    assert records[3]["reason"] == "skipped: needs CUDA"
    assert seen == [1, 2, 3, 4]  # the outputs are rewritten after every case


def test_a_spent_budget_skips_the_rest_of_its_check_and_the_run():
    # budget 4 s: the precision check's share about 1 s, the run's limit 5.6 s. The sleeps leave seconds of margin
    # on the side a loaded machine could cross, so the verdicts do not hang on how fast it runs the cases.
    plan = gpucheck.dry_run_plan(gpucheck.DEFAULT_CONFIG, 4.0)
    share, limit = plan.budget("precision"), gpucheck.HARD_LIMIT * plan.budget_s
    assert 0.5 < share < 2.0 and limit == pytest.approx(5.6)

    def sleeps(seconds):
        return lambda ctx: time.sleep(seconds) or {}

    cases = [gpucheck.Case("precision", "a", sleeps(share + 0.2)), gpucheck.Case("precision", "b", sleeps(0.1)),
             gpucheck.Case("bench", "c", sleeps(limit - share)), gpucheck.Case("memory", "d", sleeps(0.1))]
    records = gpucheck.run_all(plan, cases, lambda rs: None)
    assert [r["status"] for r in records] == ["pass", "skipped", "pass", "skipped"]
    assert "precision check's time budget" in records[1]["reason"]
    assert "run's time limit" in records[3]["reason"]


def test_dry_run_precision_check_runs_autocast_and_the_grad_scaler_on_cpu():
    """The bf16/fp16/EDM-fp16 code paths run before a GPU arrives: CPU autocast really rounds (the step-1 loss
    moves off fp32's, within the tolerance) and fp16 steps through an enabled GradScaler that backs off on overflow."""
    plan = gpucheck.dry_run_plan(gpucheck.DEFAULT_CONFIG, 3600)
    plan.checks = ("precision",)
    cases = gpucheck.build_cases(plan)
    assert {c.name.split()[-1] for c in cases if c.needs_cuda} == {"tf32"}
    records = gpucheck.run_all(plan, cases, lambda rs: None)
    with pytest.raises(ConfigError, match="CUDA only"):  # the permission ends with the dry run
        check_precision(gpu_checks.bench.bench_config("stage1", 4, "fp16"), "cpu")
    passed = {(r["figures"]["precision"], r["figures"]["mode"]): r["figures"] for r in records if r["status"] == "pass"}
    assert set(passed) == {(p, m) for p in ("fp32", "bf16", "fp16", "edm_fp16") for m in ("stage1", "stage2")}, [
        (r["name"], r["status"], r["reason"]) for r in records]
    for (precision, _), figures in passed.items():
        if precision == "fp32":
            assert figures["loss_scale"] is None
            continue
        assert 0 < figures["first_loss_rel_diff"] <= gpu_checks.LOSS_TOLERANCE[precision], figures
        if precision == "bf16":
            assert figures["loss_scale"] is None and figures["updates_skipped_by_scaler"] == 0, figures
            continue
        # GradScaler: the initial scale, halved at each overflowed (skipped) step, no growth within 3 steps
        initial = (gpu_checks.EDM_FP16_SCALER["init_scale"] if precision == "edm_fp16"
                   else gpu_checks.bench.bench_config("stage1", 4, "fp16").loss_scale)
        skipped = figures["updates_skipped_by_scaler"]
        assert figures["loss_scale"] == initial * 0.5**skipped and skipped < figures["steps"], figures


@pytest.mark.slow
def test_dry_run_checks_every_path_on_cpu_and_its_json_feeds_the_cost_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tcm_core", "gpu-check", "--dry-run", "--out-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_path] = list(tmp_path.glob("*-cpu-dry-run/*-cpu-dry-run.json"))
    doc = json.loads(json_path.read_text())
    assert doc["dry_run"] and doc["complete"] and doc["counts"]["fail"] == 0
    for check in gpucheck.CHECKS:  # every check ran at least one case on CPU
        assert any(r["check"] == check and r["status"] == "pass" for r in doc["cases"]), check
    skipped = [r for r in doc["cases"] if r["status"] == "skipped"]  # only TF32, a CUDA setting, is skipped
    assert skipped and all(r["reason"] == "skipped: needs CUDA" and r["name"].endswith(" tf32") for r in skipped)
    for check in ("precision", "bench", "train_speed", "memory"):  # bf16/fp16 ran under CPU autocast
        assert any(r["check"] == check and r["status"] == "pass" and "fp16" in r["name"] for r in doc["cases"])
    by_check = {r["check"]: r["figures"] for r in doc["cases"] if r["status"] == "pass"}
    assert by_check["ddp"]["max_diff_to_one_process"] <= by_check["ddp"]["tolerance"]
    assert by_check["memory"]["largest_fitting_batch"] >= 8 and by_check["memory"]["tries"][0]["fits"]
    assert by_check["train_speed"]["images_per_s"] > 0 and by_check["train_speed"]["peak_bytes"] > 0
    release = by_check["release_fid"]
    assert release["images"] == 8 and release["images_per_s"] > 0 and release["projected_table_hours"] > 0
    assert {r["figures"].get("backend") for r in doc["cases"] if r["check"] == "ddp"} == {"gloo"}
    features = [r["figures"] for r in doc["cases"] if "Inception" in r["name"]]
    assert [f["feature_shape"] for f in features] == [[16, 2048], [16, 2048]]
    summary = json_path.with_suffix(".md").read_text()
    assert summary.startswith("# GPU check: dry run on CPU")
    assert all(f"## {check}" in summary for check in gpucheck.CHECKS)
    assert all(r["name"] in summary for r in doc["cases"])
    # the same JSON, with GPU figures put in, recomputes the README cost table through the command line
    synthetic = tmp_path / "synthetic.json"
    synthetic.write_text(json.dumps(_synthetic_doc(doc)))
    table = subprocess.run([sys.executable, "-m", "tcm_core", "gpu-check", "--cost-table", str(synthetic)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert table.returncode == 0, table.stderr
    _check_cost_rows(table.stdout)
    refused = subprocess.run([sys.executable, "-m", "tcm_core", "gpu-check", "--cost-table", str(json_path)],
                             capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and refused.stderr.startswith("tcm: error: this JSON is a --dry-run")


def test_dry_run_without_cuda_is_the_only_way_on_cpu(capsys):
    if gpu_checks.torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert cli.main(["gpu-check", "--out-root", str(Path("/nonexistent"))]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
