"""What a GPU-check JSON (``tcm_core.gpu.check``) says, in Markdown: the summary and the README's cost-table rows.

Cost table: a job's GPU-hours = iterations × global batch / (images per second of ONE GPU at the paper's per-GPU
batch, measured by the check's ``train_speed`` case) / 3600; its wall-clock time on the paper's GPUs = GPU-hours
/ GPUs, i.e. scaling assumed linear (no communication or input-pipeline overhead, no evaluation, no queueing).
A target sums the jobs its ``all`` trains (``cost_jobs`` in the JSON, from config.yaml when the check ran).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tcm_core.errors import ConfigError
from tcm_core.gpu.bench import GOALS

GIB = 2**30
JOB_LABELS = {"stage1": "Stage 1", "stage1_continued": "control", "stage2": "Stage 2"}


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _interval(value: Any) -> str:
    return "—" if not value or value[0] is None else f"[{value[0]:.3f}, {value[1]:.3f}]"


def _gib(value: Any) -> str:
    return "—" if value is None else f"{value / GIB:.2f} GiB"


def _percent(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


COLUMNS: dict[str, list[tuple[str, str, Callable[[Any], str]]]] = {
    "precision": [("step-1 loss vs fp32", "first_loss_rel_diff", _num), ("tolerance", "tolerance", _num),
                  ("cap loss / fp32", "cap_loss_over_fp32", _num), ("scaler skips", "updates_skipped_by_scaler", _num),
                  ("loss scale", "loss_scale", _num), ("s/step", "seconds_per_step", _num)],
    "bench": [("S2/S1 time", "stage2_over_stage1_time", _num), ("paired median", "time_paired_median", _num),
              ("95% interval", "time_interval", _interval), ("time verdict", "time_verdict", _num),
              ("S2/S1 memory", "stage2_over_stage1_mem", _num), ("memory verdict", "mem_verdict", _num),
              ("S1 s/step", "stage1_time_s", _num), ("S1 peak", "stage1_peak_bytes", _gib),
              ("S2 peak", "stage2_peak_bytes", _gib)],
    "ddp": [("max weight diff", "max_diff_to_one_process", _num), ("tolerance", "tolerance", _num),
            ("backend", "backend", _num)],
    "sampling": [("images/s", "images_per_s", _num), ("seconds", "seconds", _num)],
    "release_fid": [("images/s (1 step)", "images_per_s", _num), ("images/s (2 steps)", "images_per_s_2step", _num),
                    ("released_tables (h)", "projected_table_hours", _num)],
    "train_speed": [("s/iteration", "s_per_it", _num), ("images/s", "images_per_s", _num),
                    ("peak memory", "peak_bytes", _gib), ("of the GPU", "peak_fraction_of_gpu", _percent)],
    "memory": [("largest fitting", "largest_fitting_batch", _num), ("smallest failing", "smallest_failing_batch", _num),
               ("predicted", "predicted_largest", _num), ("per sample", "per_sample_bytes", _gib),
               ("capacity", "capacity_bytes", _gib)],
}

NOTES = {
    "precision": (
        "Each case is 20 real `train_step`s (3 in the dry run) of a run built by `train_setup.setup`, dropout 0 so "
        "that every precision sees the same inputs, the Δt curriculum walking from ratio 0.5 (step 1) to the "
        "0.999 cap (step 10 on). Pass: finite losses, finite weights and EMA, not every update skipped by the "
        "GradScaler, and the step-1 loss within 4 × the unit roundoff of fp32's (bf16 2^-8, fp16 and TF32 "
        "2^-11): at ratio 0.5 the two network outputs the loss compares differ by O(1), so the loss is well "
        "conditioned. At the cap they differ by ~0.1 %, below bf16's resolution: 'cap loss / fp32' shows how much "
        "rounding noise inflates the loss there (a finding, not a criterion; CPU autocast gave 2-10x for bf16 and "
        "1.07-1.7x for fp16 at 0.999 on the tiny net). fp16 is the config's `precision: fp16` (autocast + "
        "GradScaler); edm_fp16 is EDM's own fp16 (`--fp16=1`: the UNet input cast to float16, weights cast "
        "inside the layers, GradScaler(init_scale=16)), which the config cannot select: a check-only hook adds it."),
    "bench": "`python -m tcm_core bench` on the real `train_step`: 'S2/S1 time' is the ratio of the best of "
             "interleaved repeats; the paired median, its distribution-free 95 % interval and the verdict come from "
             "the per-repeat S2/S1 ratios; peak of what the measured work allocates (CUDA allocator), never RSS. "
             f"Goal at ddpmpp batch 128: time <= {GOALS['time']}, memory <= {GOALS['mem']} (the paper reports 1.18 "
             "and 1.15 on EDM2-S).",
    "ddp": "Stage 2 for 3 iterations (batch_gpu chunks, global boundary draw, frozen model, dropout replay) vs one "
           "process: the weights must agree within 1 % of the largest weight change (tests/test_ddp.py's bound).",
    "release_fid": "`evaluate fid` (what the fid rule runs for a release) of a synthetic ddpmpp: sampling, "
                   "clean-fid Inception features and the FID, timed end to end per NFE; 'released_tables (h)' "
                   "is the CIFAR-10 preset's table (every release's FIDs at eval.num x eval.seeds, dFIDs) at "
                   "those speeds, reference statistics excluded.",
    "train_speed": "`bench --train`: the best of the timed iterations of `training.train` for that mode at the "
                   "paper's per-GPU batch (global batch / the paper's GPUs) in the preset's precision; peak "
                   "memory of the whole run (setup, iterations, outputs).",
    "memory": "Bounded search in the preset's precision: 2 Stage-2 steps per try, OOM caught and memory freed "
              "between tries; 'largest fitting' is the largest batch verified to fit.",
}


def _table(check: str, records: list[dict[str, Any]]) -> list[str]:
    columns = COLUMNS[check]
    lines = ["| case | status | " + " | ".join(c[0] for c in columns) + " | note |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for r in records:
        cells = [fmt(r["figures"].get(key)) for _, key, fmt in columns]
        note = (r["reason"] or "").replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r['name']} | {r['status']} | " + " | ".join(cells) + f" | {note} |")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """The human summary of a GPU-check JSON."""
    env, counts = doc["environment"], doc.get("counts", {})
    title = "dry run on CPU (micro sizes; not a GPU measurement)" if doc["dry_run"] else env["name"]
    lines = [f"# GPU check: {title}, {doc['date']}", ""]
    facts = [f"torch {env['torch']}", f"CUDA {env.get('cuda')}", f"Python {env['python']}"]
    if env.get("total_memory_bytes"):
        facts = [f"{_gib(env['total_memory_bytes'])}", f"compute capability {env['capability']}",
                 f"cuDNN {env.get('cudnn')}", f"NCCL {env.get('nccl')}", *facts]
    lines += [f"- Device: {env['name']} ({', '.join(facts)})",
              f"- Result: {counts.get('pass', 0)} passed, {counts.get('fail', 0)} failed, {counts.get('skipped', 0)} "
              f"skipped in {doc.get('seconds', 0):.0f} s (budget {doc['budget_s']:.0f} s)"
              + ("" if doc.get("complete") else " — INCOMPLETE (the run was cut short)"),
              "- Command: `scripts/gpu-check.sh`" + (" --dry-run" if doc["dry_run"] else "")]
    if doc["dry_run"]:
        lines.append("- Dry run: TF32 is skipped (a CUDA setting); the bf16/fp16 cases ran under CPU autocast with "
                     "a CPU GradScaler: the code paths, not CUDA's kernels, rounding, speed or memory")
    lines.append("")
    for check in COLUMNS:
        records = [r for r in doc["cases"] if r["check"] == check]
        if not records:
            continue
        lines += [f"## {check}", "", *_table(check, records), ""]
        if check in NOTES:
            lines += [NOTES[check], ""]
    skipped = [r for r in doc["cases"] if r["status"] != "pass"]
    if skipped:
        lines += ["## Not passed", ""] + [f"- {r['check']}: {r['name']}: **{r['status']}** ({r['reason']})"
                                           for r in skipped] + [""]
    if not doc["dry_run"]:
        lines += ["## Cost table (README)", "", cost_table(doc)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- cost


def _kilo(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _about(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{round(value, -int(math.floor(math.log10(value))) + 1):,.0f}"


def wall_clock(hours: float) -> str:
    """``about 1.8 days`` (``about 3.4 hours`` under two days)."""
    return f"about {_about(hours / 24)} days" if hours >= 48 else f"about {_about(hours)} hours"


def job_hours(job: dict[str, Any], speeds: dict[tuple[str, str], dict[str, Any]]) -> float | None:
    """GPU-hours of one job from the measured images per second of one GPU (None: not measured)."""
    speed = speeds.get((job.get("preset", job["target"]), job["speed_of"]))
    if speed is None:
        return None
    return job["iterations"] * job["batch"] / speed["images_per_s"] / 3600.0


def _ablation_row(job: dict[str, Any], hours: float | None, speeds: dict[tuple[str, str], dict[str, Any]]) -> str:
    """One ablation cell trained on one GPU (its whole batch on it), per 1,000 Stage-2 iterations."""
    label = f"one CIFAR-10 ablation cell (batch {job['batch']}, on one GPU)"
    if hours is None:
        return f"| {label} | not measured | |"
    measured_at = speeds[(job["preset"], job["speed_of"])].get("per_gpu_batch", job["batch"])
    note = "" if measured_at == job["batch"] else f" (speed measured at batch {measured_at})"
    return f"| {label} | about {_about(hours)} per 1,000 Stage-2 iterations{note} | |"


def cost_table(doc: dict[str, Any]) -> str:
    """Markdown rows of the README's cost table, measured on the JSON's GPU and scaled to the paper's GPU counts."""
    if doc.get("dry_run"):
        raise ConfigError("this JSON is a --dry-run (CPU, micro sizes): it holds no GPU figures", "--cost-table",
                          "pass the JSON of a run on a GPU (docs/gpu/<date>-<gpu>.json)")
    speeds = {(r["figures"]["preset"], r["figures"]["mode"]): r["figures"] for r in doc["cases"]
              if r["check"] == "train_speed" and r["status"] == "pass"}
    gpu, date = doc["environment"]["name"], doc["date"]
    lines = [f"| target | GPU-hours on {gpu} (gpucheck {date}) | wall-clock on the paper's GPUs |", "|---|---|---|"]
    targets = dict.fromkeys(job["target"] for job in doc["cost_jobs"])
    for target in targets:
        jobs = [j for j in doc["cost_jobs"] if j["target"] == target]
        hours = [job_hours(j, speeds) for j in jobs]
        parts = ", ".join(f"{JOB_LABELS[j['job']]} {_kilo(j['iterations'])} x {j['batch']}" for j in jobs)
        if target == "cifar10_ablation_cell":
            lines.append(_ablation_row(jobs[0], hours[0], speeds))
            continue
        if any(h is None for h in hours):
            missing = [JOB_LABELS[j["job"]] for j, h in zip(jobs, hours) if h is None]
            lines.append(f"| `{target}` `all` ({parts}) | not measured ({', '.join(missing)}) | |")
            continue
        total, gpus = sum(hours), jobs[0]["gpus"]
        lines.append(f"| `{target}` `all` ({parts}) | about {_about(total)} | {wall_clock(total / gpus)} on {gpus} "
                     f"GPUs |")
    return "\n".join(lines) + "\n"
