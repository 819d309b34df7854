"""Mutation check: put in one-line wiring bugs, one at a time, and show the test suite fails on each.

    python scripts/mutants.py [--only NAME ...] [--list]

Each mutant replaces one exact line fragment of tcm_core or the rules (it must occur exactly once) in a scratch copy
of the repository and runs the tests that guard that wiring. A mutant is KILLED when the tests fail, and SURVIVES when
they pass (the suite would not notice the bug). Exit status 1 if any mutant survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST = ["tests/test_wiring.py", "tests/test_losses.py", "tests/test_schedules.py", "tests/test_training.py",
        "tests/test_control.py", "-m", "not slow"]
CONTROL = ["tests/test_control.py", "tests/test_wiring.py"]  # includes the slow N + M equivalence test
# released_tables (issue 30): the release tests, the side-by-side table and the dry-run plans (ci end to end: slow)
RELEASES = ["tests/test_releases.py", "tests/test_reporting.py", "tests/test_workflow_dryrun.py", "-k", "release"]
INTERMEDIATE = ["tests/test_intermediate.py", "tests/test_workflow_dryrun.py", "-k", "intermediate"]
DISTILL = ["tests/test_distillation.py", "tests/test_wiring_distillation.py", "tests/test_reporting.py", "-m",
           "not slow"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...] = tuple(FAST)


MUTANTS = [
    Mutant("sigma-nu-swapped", "tcm_core/training/config.py", "sigma=cfg.student_sigma, nu=cfg.student_nu",
           "sigma=cfg.student_nu, nu=cfg.student_sigma"),
    Mutant("mu-dropped", "tcm_core/training/config.py", "mu=cfg.student_mu,", "mu=0.0,"),
    Mutant("t-max-hard-coded", "tcm_core/training/config.py", "    return cfg.t_min, cfg.t_max\n",
           "    return cfg.t_min, 80.0\n"),
    Mutant("stage2-t-max-hard-coded", "tcm_core/training/config.py",
           "    upper = cfg.t_max if upper is None else upper", "    upper = 80.0 if upper is None else upper"),
    Mutant("psi-lower-bound-off-t-prime", "tcm_core/training/setup.py",
           "time_dist=build_time_distribution(cfg, cfg.t_prime)",
           "time_dist=build_time_distribution(cfg, cfg.t_prime + 0.1)"),
    Mutant("stage1-t-min-hard-coded", "tcm_core/training/config.py", "    return cfg.t_min, cfg.t_max\n",
           "    return 0.002, cfg.t_max\n"),
    Mutant("p-mean-shifted", "tcm_core/training/config.py", "mean=cfg.p_mean, std=cfg.p_std",
           "mean=cfg.p_mean + 0.5, std=cfg.p_std"),
    Mutant("c-ignored", "tcm_core/training/setup.py", "common = dict(c=cfg.c,", "common = dict(c=0.0,"),
    Mutant("weighting-ignored", "tcm_core/training/setup.py", "weighting=cfg.weighting, sigma_data",
           "weighting='inv_delta_t', sigma_data"),
    Mutant("w-b-not-applied", "tcm_core/losses.py", "loss = regular + self.w_b * boundary_loss",
           "loss = regular + boundary_loss"),
    Mutant("rho-per-loss-call", "tcm_core/losses.py", "plan = boundary if boundary is not None else",
           "plan = None if boundary is not None else"),
    Mutant("boundary-not-at-t-prime", "tcm_core/losses.py", "torch.full_like(t, self.t_prime)",
           "torch.full_like(t, self.t_prime * 1.01)"),
    Mutant("frozen-never-asked", "tcm_core/losses.py", "from_frozen = s < self.t_prime", "from_frozen = s < 0"),
    Mutant("q-hard-coded", "tcm_core/training/setup.py", "curriculum_ratio(iteration, cfg.q, cfg.double_iters",
           "curriculum_ratio(iteration, 2.0, cfg.double_iters"),
    Mutant("double-iters-doubled", "tcm_core/training/setup.py", "cfg.q, cfg.double_iters, cfg.ratio_limit)",
           "cfg.q, 2 * cfg.double_iters, cfg.ratio_limit)"),
    Mutant("ratio-cap-hard-coded", "tcm_core/training/setup.py", "            return cfg.ratio_limit\n",
           "            return 0.999\n"),
    Mutant("foreign-init-not-at-cap", "tcm_core/training/setup.py",
           "return mode in CURRICULUM_AT_CAP_MODES and init_iteration is None and not continued", "return False"),
    Mutant("stage2-counter-restarts", "tcm_core/training/setup.py",
           'return 0 if mode == "stage1" else int(init_iteration or 0)', "return 0"),
    Mutant("lr-not-applied", "tcm_core/training/step.py", "set_learning_rate(run.optimizer, lr)",
           "set_learning_rate(run.optimizer, run.cfg.lr)"),
    Mutant("lr-from-job-start", "tcm_core/training/step.py", "learning_rate(run.cfg, run.iteration)",
           "learning_rate(run.cfg, run.iteration - run.start_iteration)"),
    Mutant("power-ema-count-shifted", "tcm_core/training/step.py", "beta = ema_beta(run.cfg, run.iteration + 1)",
           "beta = ema_beta(run.cfg, run.iteration + 2)"),
    Mutant("ema-gamma-off-by-one", "tcm_core/training/optim.py", "** (cfg.ema_gamma + 1.0)", "** cfg.ema_gamma"),
    Mutant("times-in-float32", "tcm_core/schedules.py", "        return self.icdf_table(u)\n",
           "        return self.icdf_table(u).float()\n"),
    Mutant("control-online-weights-from-ema", "tcm_core/training/state.py", 'run.net.load_state_dict(state["net"])',
           'run.net.load_state_dict(state["ema"])', tuple(CONTROL)),
    # consistency distillation (tcm_core.distillation, its wiring in train_setup/losses, the Table-5 arm)
    Mutant("cd-euler-instead-of-heun", "tcm_core/distillation.py", 'if solver == "euler":', "if True:",
           tuple(DISTILL)),
    Mutant("cd-heun-full-weight", "tcm_core/distillation.py", "(s_col - t_col) * 0.5 * (d_t + d_s)",
           "(s_col - t_col) * (d_t + d_s)", tuple(DISTILL)),
    Mutant("cd-solver-ignored", "tcm_core/training/setup.py", "Teacher(teacher, cfg.guidance), cfg.ode_solver)",
           'Teacher(teacher, cfg.guidance), "heun")', tuple(DISTILL)),
    Mutant("cd-guidance-ignored", "tcm_core/training/setup.py", "Teacher(teacher, cfg.guidance)",
           "Teacher(teacher, None)", tuple(DISTILL)),
    Mutant("cd-teacher-is-the-student", "tcm_core/training/setup.py", "frozen, teacher),", "frozen, net),",
           tuple(DISTILL)),
    Mutant("cd-x-s-from-noise", "tcm_core/losses.py", "        if self.teacher_step is None:\n",
           "        if True:\n", tuple(DISTILL)),
    Mutant("cfg-null-label-is-the-label", "tcm_core/distillation.py", "torch.cat([cond, torch.zeros_like(cond)])",
           "torch.cat([cond, cond])", tuple(DISTILL)),
    Mutant("cfg-weights-swapped", "tcm_core/distillation.py", "d_uncond + guidance * (d_cond - d_uncond)",
           "d_cond + guidance * (d_uncond - d_cond)", tuple(DISTILL)),
    Mutant("teacher-in-train-mode", "tcm_core/distillation.py", "        net.eval().requires_grad_(False)\n",
           "        net.requires_grad_(False)\n", tuple(DISTILL)),
    Mutant("label-dropout-not-applied", "tcm_core/training/setup.py", 'return apply_label_dropout(cfg, net, "arch")',
           "return net", tuple(DISTILL)),
    Mutant("distill-arm-in-ct-tables", "tcm_core/report/results.py", "if r.grid not in ARM_GRIDS]", "]",
           tuple(DISTILL)),
    Mutant("release-sha256-not-checked", "tcm_core/io/hashing.py",
           "    if expected is not None and actual != expected:\n        source", "    if False:\n        source",
           tuple(RELEASES)),
    Mutant("release-mid-t-default-ect", "tcm_core/releases.py", 'entry.get("mid_t", mid_t)',
           'entry.get("mid_t", 0.821)', tuple(RELEASES)),
    Mutant("release-own-mid-t-ignored", "workflow/rules/jobs.smk",
           'mid_t = release.mid_t if release is not None else EVAL["mid_t"]', 'mid_t = EVAL["mid_t"]', tuple(RELEASES)),
    Mutant("fid-mean-over-seeds", "tcm_core/evaluation/commands.py", '"min": min(per_seed), "steps"',
           '"min": sum(per_seed) / len(per_seed), "steps"', tuple(RELEASES)),
    Mutant("release-table-mean-over-seeds", "tcm_core/report/released.py", 'ours = float(measured["min"])',
           'ours = sum(measured["per_seed"]) / len(measured["per_seed"])', tuple(RELEASES)),
    Mutant("release-tolerance-one-sided", "tcm_core/report/released.py", "return abs(ours - paper) <= tolerance",
           "return ours - paper <= tolerance", tuple(RELEASES)),
    Mutant("release-classes-not-checked", "tcm_core/releases.py",
           "if (label_dim > 0) != release.class_conditional:", "if False:", tuple(RELEASES)),
    Mutant("control-data-order-restarts", "tcm_core/training/state.py", 'return int(state["sampler_position"])',
           "return 0", tuple(CONTROL)),
    # the intermediate-stage arm (App. B): its sampler, its start, the variants' boundary and init, claim S6
    Mutant("intermediate-times-up-to-t-max", "tcm_core/training/config.py",
           "        return cfg.t_min, largest_time_below(cfg.t_prime)", "        return cfg.t_min, cfg.t_max",
           tuple(INTERMEDIATE)),
    Mutant("intermediate-times-reach-t-prime", "tcm_core/schedules.py", "    return math.nextafter(float(t), 0.0)",
           "    return float(t)", tuple(INTERMEDIATE)),
    Mutant("intermediate-boundary-is-stage1", "workflow/rules/training.smk",
           "            boundary=f\"results/{{preset}}/{INTERMEDIATE['finetune']}{{seed}}/network.safetensors\",",
           "            boundary=stage1_network(),", tuple(INTERMEDIATE)),
    Mutant("intermediate-variant-inits-swapped", "workflow/rules/common.smk",
           '    if wildcards.variant == "init_stage1":', '    if wildcards.variant == "init_finetune":',
           tuple(INTERMEDIATE)),
    Mutant("intermediate-from-the-ema", "workflow/rules/training.smk",
           '            state=stage1_state(),\n            teacher=teacher_input("intermediate"',
           '            teacher=teacher_input("intermediate"', tuple(INTERMEDIATE)),
    Mutant("intermediate-variants-run-all-m", "tcm_core/presets.py", '    keys["iterations"] = total - finetune',
           '    keys["iterations"] = total', tuple(INTERMEDIATE)),
    Mutant("stage2-freezes-its-init", "tcm_core/training/setup.py", "load_init(cfg, paths.boundary_model, device)",
           "load_init(cfg, paths.init, device)", tuple(INTERMEDIATE)),
    Mutant("claim-s6-side-flipped", "tcm_core/report/claims.py", 'S6_FID_SIDE = "above"', 'S6_FID_SIDE = "below"',
           ("tests/test_reporting.py", "-k", "claims_hold or claims_that_do_not_hold or table6")),
]


def scratch_copy(target: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_mutant(mutant: Mutant, copy: Path) -> tuple[bool, float, str]:
    """(killed, seconds, the first failing test or the reason)."""
    path = copy / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"mutant {mutant.name}: the fragment occurs {original.count(mutant.old)} times in "
                         f"{mutant.path} (expected exactly once); update scripts/mutants.py")
    path.write_text(original.replace(mutant.old, mutant.new))
    env = {**os.environ, "PYTHONPATH": str(copy), "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                              cwd=copy, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original)
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode != 0, time.perf_counter() - start, (failed[0] if failed else proc.stdout[-200:].strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of mutants to run (default: all)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        print("\n".join(f"{m.name}: {m.path}: {m.old!r} -> {m.new!r}" for m in chosen))
        return 0
    with tempfile.TemporaryDirectory(prefix="tcm-mutants-") as tmp:
        copy = Path(tmp)
        scratch_copy(copy)
        survivors = 0
        for mutant in chosen:
            killed, seconds, detail = run_mutant(mutant, copy)
            survivors += not killed
            print(f"{'KILLED  ' if killed else 'SURVIVED'} {mutant.name:34s} {seconds:6.1f} s  {detail[:110]}",
                  flush=True)
    print(f"{len(chosen) - survivors} of {len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
