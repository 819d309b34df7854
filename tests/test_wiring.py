"""Every config key that reaches the science reaches its formula.

Each test builds the run from a presets YAML exactly as a job does (``resolve_config`` + ``train_setup.setup``),
then checks what the built objects and the real loss/loop compute against independent numbers: scipy's
distributions, the paper's formulas re-derived here in numpy, and values read off the networks' inputs and
weights (never the values the code reports about itself). The settings are deliberately unlike the defaults and
unlike each other (σ ≠ ν, μ ≠ 0, t_min ≠ 0.002, t_max ≠ 80), so a key wired to a default or to another key fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats
from training_helpers import MICRO_ARCH, CallRecorder, make_small_mnist, save_micro_checkpoint

from tcm_core.presets import resolve_config
from tcm_core.training.global_batch import boundary_positions, chunk_plan
from tcm_core.training.setup import RunPaths, setup

STAGE1 = {"iterations": 4, "batch": 8, "optimizer": "radam", "lr": 3e-4, "p_mean": -0.2, "p_std": 1.3,
          "t_min": 0.005, "t_max": 60.0, "q": 5.0, "ratio_limit": 0.995, "double_iters": 7, "c": 0.02,
          "weighting": "inv_cout_sq", "ema": "power", "ema_gamma": 5.0, "lr_decay_iters": 11, "log_every": 1,
          "state_every": 1000, "seed": 3}
STAGE2 = {**STAGE1, "batch": 10, "q": 3.0, "lr": 2e-4, "t_prime": 1.3, "rho": 0.3, "w_b": 0.7, "student_mu": 0.2,
          "student_sigma": 0.35, "student_nu": 1.5, "c": 0.05, "weighting": "inv_delta_t", "ema": "constant",
          "ema_beta": 0.93,
          "lr_decay_iters": 5, "lr_rampup_iters": 0}
PRESETS = {"preset": "micro", "presets": {"micro": {
    "arch": MICRO_ARCH, "stage1": STAGE1, "stage2": STAGE2, "stage3": {"t_prime": 2.5}, "eval": {"every": 0}}}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wiring")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(PRESETS))
    return {"config": config, "data": make_small_mnist(folder / "mnist16.zip", count=40),
            "ours": save_micro_checkpoint(folder / "stage1.safetensors", iteration=23, seed=1), "folder": folder}


def build(files, mode: str, tmp_path: Path, **paths):
    cfg = resolve_config(files["config"], mode, "micro", [])
    run_paths = RunPaths(data=files["data"], out=tmp_path / mode, **paths)
    return cfg, setup(cfg, mode, run_paths, device="cpu")


def stage2_paths(files) -> dict[str, Path]:
    return {"init": files["ours"], "boundary_model": files["ours"]}


# ------------------------------------------------------------------------------------------ time distributions


def truncated_cdf(base, loc: float, scale: float, lower: float, upper: float, t: np.ndarray) -> np.ndarray:
    """CDF of t when ln t = loc + scale·Z (Z ~ base) is truncated to [ln lower, ln upper] (written out here)."""
    z = lambda value: (np.log(value) - loc) / scale  # noqa: E731
    return (base.cdf(z(t)) - base.cdf(z(lower))) / (base.cdf(z(upper)) - base.cdf(z(lower)))


@pytest.mark.parametrize("mode, t_prime", [("stage2", 1.3), ("stage3", 2.5)])
def test_stage2_time_distribution_is_the_configured_log_student_t_on_t_prime_to_t_max(files, tmp_path, mode,
                                                                                       t_prime):
    _, run = build(files, mode, tmp_path, **stage2_paths(files))
    dist = run.loss_fn.time_dist
    t = np.geomspace(t_prime, 60.0, 50)
    expected = truncated_cdf(stats.t(1.5), 0.2, 0.35, t_prime, 60.0, t)  # ν = 1.5, μ = 0.2, σ = 0.35
    np.testing.assert_allclose(dist.cdf(t), expected, atol=1e-12)
    torch.manual_seed(0)
    draws = dist.sample(20_000).numpy()
    assert draws.min() >= t_prime and draws.max() <= 60.0
    ks = stats.kstest(draws, lambda x: truncated_cdf(stats.t(1.5), 0.2, 0.35, t_prime, 60.0, np.asarray(x)))
    assert ks.statistic < 0.015


def test_stage1_time_distribution_is_the_configured_truncated_lognormal(files, tmp_path):
    _, run = build(files, "stage1", tmp_path, init=files["ours"])
    t = np.geomspace(0.005, 60.0, 50)
    expected = truncated_cdf(stats.norm, -0.2, 1.3, 0.005, 60.0, t)
    np.testing.assert_allclose(run.loss_fn.time_dist.cdf(t), expected, atol=1e-12)
    torch.manual_seed(1)
    draws = run.loss_fn.time_dist.sample(20_000).numpy()
    assert stats.kstest(draws, lambda x: truncated_cdf(stats.norm, -0.2, 1.3, 0.005, 60.0, np.asarray(x))
                        ).statistic < 0.015


# ------------------------------------------------------------------------------------------ the losses' numbers


def paper_ratio(iteration: int, q: float, double_iters: int, limit: float) -> float:
    return min(1.0 - q ** -(iteration // double_iters + 1), limit)


def paper_r(t: np.ndarray, ratio: float) -> np.ndarray:
    delta = t * (1.0 - ratio) * (1.0 + 8.0 / (1.0 + np.exp(t)))  # 1 + 8·sigmoid(−t)
    return np.maximum(t - delta, 1e-6)


def paper_weight(kind: str, t: np.ndarray, s: np.ndarray) -> np.ndarray:
    if kind == "inv_delta_t":
        return 1.0 / (t - s)
    c_out = t * 0.5 / np.sqrt(t**2 + 0.25)
    return 1.0 / c_out**2


def pseudo_huber_np(a: np.ndarray, b: np.ndarray, c: float) -> np.ndarray:
    d2 = ((a - b) ** 2).reshape(len(a), -1).sum(axis=1)
    return np.sqrt(d2 + c**2) - c


def targets_by_sample(s: np.ndarray, calls: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """D(x_s, s) of every sample from the no-grad calls, matched by their s; and which samples each call had."""
    d_s = np.full((len(s), 1, 16, 16), np.nan)
    owner = np.full(len(s), -1)
    for number, call in enumerate(calls):
        for row, r_row in enumerate(call["sigma"].numpy()):
            # rows are sub-batches in ascending sample order: take the first unassigned sample with this s
            candidates = np.flatnonzero((np.abs(s - r_row) <= 1e-12 * r_row) & (owner < 0))
            assert candidates.size, "a target pass saw an s the paper's formula did not give"
            d_s[candidates[0]], owner[candidates[0]] = call["out"][row].numpy(), number
    assert np.all(owner >= 0), "a sample got no target"
    return d_s, owner


def test_stage2_loss_is_eq_11_with_the_configured_t_prime_rho_w_b_c_weighting_and_curriculum(files, tmp_path):
    cfg, run = build(files, "stage2", tmp_path, **stage2_paths(files))
    student, frozen = CallRecorder(run.net), CallRecorder(run.frozen)
    images = torch.rand(10, 1, 16, 16) * 2 - 1
    mask = boundary_positions(cfg.seed, run.iteration, 10, 0.3)
    torch.manual_seed(4)
    out = run.loss_fn(run.net, images, None, ratio=run.ratio(run.iteration), boundary=chunk_plan(mask, 0, 10))
    graded = [c for c in student.calls if c["grad"]]
    assert len(graded) == 1
    t = graded[0]["sigma"].numpy()
    assert mask.sum() == math.floor(10 * 0.3) == 3
    assert np.all(t[mask.numpy()] == 1.3) and np.all(t[~mask.numpy()] >= 1.3)  # boundary at t', ψ̄ above it
    ratio = paper_ratio(23, 3.0, 7, 0.995)  # the init carries iteration 23: the curriculum continues from it
    s = paper_r(t, ratio)
    student_targets = [c for c in student.calls if not c["grad"]]
    d_s, owner = targets_by_sample(s, student_targets + frozen.calls)
    from_frozen = owner >= len(student_targets)
    assert np.array_equal(from_frozen, s < 1.3)  # s < t': the frozen Stage-1 net answers
    ell = paper_weight("inv_delta_t", t, s) * pseudo_huber_np(graded[0]["out"].numpy(), d_s, 0.05)
    b = mask.numpy()
    expected = ell[~b].sum() / 7 + 0.7 * ell[b].sum() / 3  # eq. 11: 1/(B − N_B) Σ_C + w_b/N_B Σ_B
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_stage1_loss_is_eq_4_with_the_configured_c_weighting_and_curriculum(files, tmp_path):
    _, run = build(files, "stage1", tmp_path, init=files["ours"])
    assert run.iteration == 0  # Stage 1 restarts the counter, whatever its init carries
    student = CallRecorder(run.net)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    torch.manual_seed(5)
    out = run.loss_fn(run.net, images, None, ratio=run.ratio(15))
    graded, target = student.calls
    t = graded["sigma"].numpy()
    s = paper_r(t, paper_ratio(15, 5.0, 7, 0.995))
    np.testing.assert_allclose(target["sigma"].numpy(), s, rtol=1e-12)
    ell = paper_weight("inv_cout_sq", t, s) * pseudo_huber_np(graded["out"].numpy(), target["out"].numpy(), 0.02)
    assert out.loss.item() == pytest.approx(ell.mean(), rel=1e-6)


# ------------------------------------------------------------------------------------------ the loop's schedules


def paper_lr(lr: float, decay: int, iteration: int) -> float:
    return lr / math.sqrt(max(iteration / decay, 1.0)) if decay else lr


def measured_beta(ema_before: list[torch.Tensor], ema: torch.nn.Module, net: torch.nn.Module) -> float:
    """β of ema <- β·ema + (1 − β)·θ, read off the weights: (ema_new − θ)/(ema_old − θ)."""
    gaps = torch.cat([(old - theta.detach()).double().flatten() for old, theta in zip(ema_before, net.parameters())])
    moved = torch.cat([(new.detach() - theta.detach()).double().flatten()
                       for new, theta in zip(ema.parameters(), net.parameters())])
    keep = gaps.abs() >= 0.25 * gaps.abs().max()  # the largest gaps: float32 rounding is negligible there
    return float((moved[keep] / gaps[keep]).median())


def implied_ratio(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The curriculum ratio that maps t to s = t − t·(1 − ratio)·(1 + 8·sigmoid(−t))."""
    return 1.0 - (t - s) / (t * (1.0 + 8.0 / (1.0 + np.exp(t))))


def measured_ratio(run, student: CallRecorder, frozen: CallRecorder | None) -> float:
    """The ratio the loss used, from the networks' inputs (Stage 1: t and s pairs; Stage 2: the boundary rows)."""
    if frozen is None:
        graded, target = student.calls
        t, s = graded["sigma"].numpy(), target["sigma"].numpy()
        unclamped = s > 1e-6  # s = max(t − Δt, 1e-6): a clamped s says nothing about the ratio
        assert unclamped.any()
        return float(np.median(implied_ratio(t[unclamped], s[unclamped])))
    t_prime = run.cfg.t_prime
    values, counts = np.unique(np.concatenate([c["sigma"].numpy() for c in frozen.calls]), return_counts=True)
    r_boundary = values[np.argmax(counts)]  # all N_B boundary samples share s = t' − Δt(t')
    assert counts.max() >= math.floor(run.cfg.batch * run.cfg.rho)
    return float(implied_ratio(np.array([t_prime]), np.array([r_boundary]))[0])


def drive(run, steps: int) -> list[dict[str, float]]:
    """``steps`` real iterations; per step the lr the optimiser held, the ratio the loss used, the EMA β applied."""
    from tcm_core.training.step import train_step

    student = CallRecorder(run.net)
    frozen = CallRecorder(run.frozen) if run.frozen is not None else None
    seen = []
    for _ in range(steps):
        student.clear()
        if frozen is not None:
            frozen.clear()
        held: list[float] = []
        before = [p.detach().clone() for p in run.ema.parameters()]
        iteration = run.iteration
        train_step(run, after_backward=lambda s, held=held: held.append(s.optimizer.param_groups[0]["lr"]))
        seen.append({"it": iteration, "lr": held[0], "ratio": measured_ratio(run, student, frozen),
                     "beta": measured_beta(before, run.ema, run.net)})
    return seen


def power_beta(k: int, gamma: float) -> float:
    return (1.0 - 1.0 / k) ** (gamma + 1.0)


def check_schedules(seen, lr: float, decay: int, ratio_of, beta_of) -> None:
    for step in seen:
        it = step["it"]
        assert step["lr"] == pytest.approx(paper_lr(lr, decay, it), rel=1e-12), it
        assert step["ratio"] == pytest.approx(ratio_of(it), abs=1e-9), it
        assert step["beta"] == pytest.approx(beta_of(it + 1), abs=2e-4), it


def test_stage1_schedules_run_from_iteration_0(files, tmp_path):
    _, run = build(files, "stage1", tmp_path, init=files["ours"])
    seen = drive(run, 14)
    assert [s["it"] for s in seen] == list(range(14))
    check_schedules(seen, 3e-4, 11, lambda it: paper_ratio(it, 5.0, 7, 0.995), lambda k: power_beta(k, 5.0))
    assert seen[0]["beta"] == pytest.approx(0.0, abs=1e-9)  # power EMA: the first update copies the network


def test_control_continues_stage1_schedules(files, tmp_path):
    from tcm_core.training.loop import train

    state = tmp_path / "stage1" / "train_state.pt"
    cfg = resolve_config(files["config"], "stage1", "micro", [])
    stage1 = train(cfg, mode="stage1", data=files["data"], out=tmp_path / "stage1", init=files["ours"],
                   final_state=state, device="cpu", progress=False)
    _, run = build(files, "stage1_continued", tmp_path, init=stage1.network, init_state=state)
    assert (run.start_iteration, run.end_iteration, run.curriculum_at_cap) == (4, 8, False)
    seen = drive(run, 4)
    check_schedules(seen, 3e-4, 11, lambda it: paper_ratio(it, 5.0, 7, 0.995), lambda k: power_beta(k, 5.0))


def test_stage2_from_a_checkpoint_with_an_iteration_continues_its_schedules(files, tmp_path):
    _, run = build(files, "stage2", tmp_path, **stage2_paths(files))
    assert (run.start_iteration, run.curriculum_at_cap) == (23, False)
    seen = drive(run, 3)
    check_schedules(seen, 2e-4, 5, lambda it: paper_ratio(it, 3.0, 7, 0.995), lambda k: 0.93)


def test_stage2_from_a_foreign_checkpoint_starts_at_the_ratio_cap(files, tmp_path):
    from training_helpers import save_foreign_state_dict

    foreign = save_foreign_state_dict(tmp_path / "ecm.pt", seed=2)
    _, run = build(files, "stage2", tmp_path, init=foreign, boundary_model=foreign)
    assert (run.start_iteration, run.curriculum_at_cap, run.info["init_iteration"]) == (0, True, None)
    seen = drive(run, 7)
    check_schedules(seen, 2e-4, 5, lambda it: 0.995, lambda k: 0.93)


def test_imagenet64_xl_stage2_runs_at_0_9961_from_its_first_iteration(files, tmp_path):
    """The XL preset's Stage 2 as configured (q 4, cap 0.9961, lr 1e-4 decaying from 8000, power EMA 6.94),
    from a checkpoint with no iteration (like ECM-XL), at micro size."""
    from training_helpers import save_foreign_state_dict

    repo_config = Path(__file__).resolve().parents[1] / "config.yaml"
    overrides = ["batch=8", "iterations=3", "precision=fp32", "dropout=0.1", "log_every=1"]
    cfg = resolve_config(repo_config, "stage2", "imagenet64_xl", overrides)
    foreign = save_foreign_state_dict(tmp_path / "ecm-xl.pt", seed=2)
    run = setup(cfg, "stage2", RunPaths(data=files["data"], out=tmp_path / "xl", init=foreign,
                                        boundary_model=foreign), device="cpu")
    seen = drive(run, 3)
    check_schedules(seen, 1e-4, 8000, lambda it: 0.9961, lambda k: power_beta(k, 6.94))
    assert (cfg.q, cfg.ratio_limit, cfg.double_iters) == (4.0, 0.9961, 10000)  # ...which alone would give 0.75 at 0


def test_imagenet64_s_stage2_lr_starts_decayed_at_stage1s_iteration(files, tmp_path):
    """The official ImageNet Stage-2 command passes no lr_schedule_start_iter: lr = 5e-4 / sqrt(150000/8000)."""
    repo_config = Path(__file__).resolve().parents[1] / "config.yaml"
    cfg = resolve_config(repo_config, "stage2", "imagenet64_s", ["batch=8", "iterations=1", "precision=fp32"])
    stage1 = save_micro_checkpoint(tmp_path / "s1-150k.safetensors", iteration=150_000, seed=1)
    run = setup(cfg, "stage2", RunPaths(data=files["data"], out=tmp_path / "s", init=stage1, boundary_model=stage1),
                device="cpu")
    seen = drive(run, 1)
    assert seen[0]["lr"] == pytest.approx(5e-4 / math.sqrt(150_000 / 8000), rel=1e-12)
    assert seen[0]["ratio"] == pytest.approx(0.9961, abs=1e-9) and not run.curriculum_at_cap


@pytest.mark.parametrize("preset", ["tiny", "cifar10", "imagenet64_s"])
def test_each_presets_stage2_starts_at_the_ratio_cap(preset):
    """App. E: Stage 2 starts with the maximum ratio. The presets' Stage 1 must walk the curriculum to its cap."""
    from tcm_core.schedules import curriculum_ratio

    repo_config = Path(__file__).resolve().parents[1] / "config.yaml"
    stage1, stage2 = (resolve_config(repo_config, mode, preset, []) for mode in ("stage1", "stage2"))
    start = stage1.iterations  # Stage 2 continues Stage 1's counter
    assert curriculum_ratio(start, stage2.q, stage2.double_iters, stage2.ratio_limit) == stage2.ratio_limit
    assert paper_ratio(start, stage2.q, stage2.double_iters, stage2.ratio_limit) == stage2.ratio_limit


def test_tiny_stage2_trains_at_the_controls_learning_rate_with_adam():
    """tiny: Stage 1 and its control on Adam (beta2 0.99) with EDM2's inverse-sqrt decay from 1e-3 (t_ref 50);
    Stage 2 with half the reference lr and four times the decay length (the official ImageNet relation), which
    is the control's lr at every iteration after the split: closed form 1e-3 * sqrt(50 / it) for it >= 50."""
    from tcm_core.training.optim import build_optimizer, learning_rate

    repo_config = Path(__file__).resolve().parents[1] / "config.yaml"
    stage1, control, stage2 = (resolve_config(repo_config, m, "tiny", []) for m in
                               ("stage1", "stage1_continued", "stage2"))
    for cfg in (stage1, control, stage2):
        optimizer = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
        assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    split = stage1.iterations
    assert learning_rate(stage1, split) == pytest.approx(1e-3 / math.sqrt(split / 50), rel=1e-12)
    for it in range(split, split + stage2.iterations):
        assert learning_rate(control, it) == pytest.approx(1e-3 * math.sqrt(50 / it), rel=1e-12)
        assert learning_rate(stage2, it) == pytest.approx(learning_rate(control, it), rel=1e-12)


def test_distillation_arm_walks_its_curriculum_to_the_cap_and_compares_like_for_like():
    """The tiny CD arm (its own length: 200 iterations per run): CD Stage 1 reaches the ratio cap before it ends,
    so the CD control and CD Stage 2 run at the cap (App. E), and both continue CD Stage 1 with its batch (the CT
    arms') for the same number of iterations (the control is CD Stage 1 going on: same state, schedule, batch)."""
    from tcm_core.presets import check_preset
    from tcm_core.schedules import curriculum_ratio

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    configs = check_preset(config, "tiny")
    stage1, control, stage2 = (configs[f"distill/{mode}"] for mode in ("stage1", "stage1_continued", "stage2"))
    assert {cfg.method for cfg in (stage1, control, stage2)} == {"cd"}
    assert stage1.batch == control.batch == stage2.batch == configs["stage1"].batch
    assert control.iterations == stage2.iterations
    last = stage1.iterations - 1  # CD Stage 1's last iteration already trains at the cap
    for cfg in (stage1, control, stage2):
        assert curriculum_ratio(last, cfg.q, cfg.double_iters, cfg.ratio_limit) == cfg.ratio_limit
        assert paper_ratio(last, cfg.q, cfg.double_iters, cfg.ratio_limit) == cfg.ratio_limit
    assert curriculum_ratio(stage1.iterations // 2, stage1.q, stage1.double_iters, stage1.ratio_limit) < 0.99


def test_imagenet_fp16_loss_scaling_is_the_official_one():
    """App. E: mixed precision with dynamic loss scaling; the official ImageNet runs start at 16 (--ls=16) and
    grow the scale every 20000 overflow-free iterations."""
    from tcm_core.training.setup import loss_scaling

    repo_config = Path(__file__).resolve().parents[1] / "config.yaml"
    for preset in ("imagenet64_s", "imagenet64_xl"):
        for mode in ("stage1", "stage2"):
            cfg = resolve_config(repo_config, mode, preset, [])
            assert loss_scaling(cfg) == {"init_scale": 16.0, "growth_interval": 20000, "enabled": True}
    assert not loss_scaling(resolve_config(repo_config, "stage2", "cifar10", []))["enabled"]  # CIFAR-10: fp32


def test_ablation_curves_only_where_a_figure_draws_them():
    """Periodic evaluation of an ablation cell: the 1-step FID at the preset's points on the (sigma, nu) grid
    (Fig. 4b's curves, the baseline among them); none on the other cells (compared by final FIDs)."""
    from tcm_core.presets import ablation_keys, ablation_points, curve_points

    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())["presets"]["tiny"]
    points = ablation_points(preset)
    sigma_nu = {(2.0, 10000.0), (0.2, 0.01), (0.2, 2.0)}
    assert {(p["student_sigma"], p["student_nu"]) for p in curve_points(preset)} == sigma_nu
    for point in points:
        keys = ablation_keys(preset, point)
        on_curve = point["t_prime"] == 1.0 and point["rho"] == 0.25 and point["w_b"] == 0.1
        assert keys["eval_points"] == (preset["eval"]["points"] if on_curve else 0), point
        assert keys["eval_mid_t"] is None and keys["eval_dfid_ts"] == []
        if not on_curve:
            assert keys["eval_every"] == 0
