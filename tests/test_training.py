"""Training loop: schedules, EMA, config resolution/validation, state files, frozen model, non-finite policy, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from training_helpers import MICRO_ARCH, load_weights, make_small_mnist, run_cli, save_micro_checkpoint, train_args

from tcm_core.errors import NonFiniteTrainingError
from tcm_core.presets import resolve_config
from tcm_core.training.config import TrainConfig, build_config, validate_config
from tcm_core.training.global_batch import chunk_seed
from tcm_core.training.loop import train
from tcm_core.training.optim import ema_beta, learning_rate, update_ema
from tcm_core.training.outputs import PeriodicEval
from tcm_core.training.state import list_states, load_latest_state, save_state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_small_mnist(tmp_path_factory.mktemp("data") / "mnist16.zip", count=48)


def micro_overrides(**extra) -> dict:
    keys = {"iterations": 3, "batch": 8, "log_every": 1, "state_every": 2, "lr": 1e-3}
    keys.update(extra)
    return keys


# ---------------------------------------------------------------------------------------------- schedules


def test_learning_rate_constant_inverse_sqrt_and_rampup():
    constant = TrainConfig(lr=2e-4)
    assert [learning_rate(constant, it) for it in (0, 10, 10_000)] == [2e-4] * 3
    decay = TrainConfig(lr=1e-3, lr_decay_iters=2000)
    assert learning_rate(decay, 0) == 1e-3 and learning_rate(decay, 2000) == 1e-3
    assert learning_rate(decay, 8000) == pytest.approx(1e-3 / 2.0)  # sqrt(8000 / 2000) = 2
    assert learning_rate(decay, 18000) == pytest.approx(1e-3 / 3.0)
    ramp = TrainConfig(lr=1e-3, lr_decay_iters=2000, lr_rampup_iters=100)
    assert learning_rate(ramp, 0) == 0.0
    assert learning_rate(ramp, 25) == pytest.approx(0.25e-3)
    assert learning_rate(ramp, 8000) == pytest.approx(0.5e-3)


def _weighted_average(snapshots: list[np.ndarray], initial: np.ndarray, betas: list[float]) -> np.ndarray:
    """EMA written out as a weighted sum: w_k = (1 - b_k) prod_{j>k} b_j, the initial weight prod_j b_j."""
    total = initial * np.prod(betas)
    for k, snap in enumerate(snapshots):
        total = total + snap * (1 - betas[k]) * np.prod(betas[k + 1:])
    return total


@pytest.mark.parametrize("kind", ["constant", "power"])
def test_ema_matches_direct_weighted_sum(kind):
    cfg = TrainConfig(ema=kind, ema_beta=0.7, ema_gamma=6.94)
    net, ema = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    ema.load_state_dict(net.state_dict())
    initial = net.weight.detach().numpy().copy()
    snapshots, betas = [], []
    generator = torch.Generator().manual_seed(1)
    for k in range(1, 8):
        with torch.no_grad():
            net.weight.copy_(torch.randn(2, 3, generator=generator, dtype=torch.float64))
        snapshots.append(net.weight.detach().numpy().copy())
        betas.append(ema_beta(cfg, k))
        update_ema(ema, net, betas[-1])
    if kind == "power":
        assert betas[0] == 0.0  # the first update copies the network
        assert betas[3] == pytest.approx((1 - 1 / 4) ** 7.94)
    else:
        assert betas == [0.7] * 7
    np.testing.assert_allclose(ema.weight.detach().numpy(), _weighted_average(snapshots, initial, betas), rtol=1e-12)


def test_power_ema_is_the_average_for_gamma_zero():
    # gamma = 0: beta_k = 1 - 1/k, i.e. the running mean of all snapshots (EDM2's power EMA at its extreme)
    cfg = TrainConfig(ema="power", ema_gamma=1e-12)
    net, ema = torch.nn.Linear(2, 1).double(), torch.nn.Linear(2, 1).double()
    values = [1.0, 2.0, 6.0, -3.0]
    for k, value in enumerate(values, start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        update_ema(ema, net, ema_beta(cfg, k))
    assert ema.weight[0, 0].item() == pytest.approx(np.mean(values), rel=1e-9)


def test_chunk_seed_depends_on_seed_iteration_and_chunk_only():
    seeds = {chunk_seed(s, i, c) for s in (1, 2) for i in (0, 1, 1000) for c in (0, 1, 3)}
    assert len(seeds) == 18
    assert chunk_seed(5, 7, 2) == chunk_seed(5, 7, 2) < 2**63


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("mode, keys, named", [
    ("stage1", {"learning_rate": 1e-4}, "learning_rate"),
    ("stage2", {"rho": 1.0}, "rho"),
    ("stage2", {"rho": 0.0}, "rho"),
    ("stage2", {"t_prime": 80.0}, "t_prime"),
    ("stage3", {"t_prime": 100.0}, "t_prime"),
    ("stage2", {"student_nu": 0.0}, "student_nu"),
    ("stage2", {"student_sigma": -1.0}, "student_sigma"),
    ("stage1", {"ratio_limit": 1.0}, "ratio_limit"),
    ("stage1", {"c": -0.1}, "c"),
    ("stage1", {"optimizer": "sgd"}, "optimizer"),
    ("stage1", {"weighting": "snr"}, "weighting"),
    ("stage1", {"ema": "karras"}, "ema"),
    ("stage1", {"precision": "fp8"}, "precision"),
    ("stage1", {"nonfinite": "ignore"}, "nonfinite"),
    ("stage1", {"batch": 12, "batch_gpu": 5}, "batch_gpu"),
    ("stage2", {"batch": 3, "rho": 0.25}, "rho"),  # floor(3 * 0.25) = 0 boundary samples in the global batch
    ("stage1", {"lr": float("inf")}, "lr"),
    ("stage1", {"iterations": 2.5}, "iterations"),
    ("stage1", {"eval_mid_t": 90.0}, "eval_mid_t"),
])
def test_invalid_config_names_the_key(mode, keys, named):
    with pytest.raises(ValueError, match=repr(named)):
        build_config(keys, mode)


def test_batch_must_divide_by_world_size():
    cfg = build_config({"batch": 6}, "stage1")
    validate_config(cfg, "stage1", world_size=2)
    with pytest.raises(ValueError, match="'batch'.*world size 4"):
        validate_config(cfg, "stage1", world_size=4)


def test_mode_defaults_are_filled_in():
    assert (build_config({}, "pretrain").p_mean, build_config({}, "pretrain").time_dist) == (-1.2, "lognormal")
    stage2, stage3 = build_config({}, "stage2"), build_config({}, "stage3")
    assert (stage2.time_dist, stage2.t_prime, stage3.t_prime) == ("student_t", 1.0, 4.0)
    assert build_config({}, "stage1").p_std == 2.0


def test_preset_yaml_resolution(tmp_path):
    config = {
        "preset": "tiny",
        "presets": {
            "tiny": {
                "arch": {"preset": "tiny", "dropout": 0.1},
                "pretrain": {"iterations": 11, "lr": 1e-3},
                "stage1": {"iterations": 22, "p_mean": -1.0, "q": 4},
                "stage2": {"iterations": 33, "t_prime": 1.0, "student_nu": 2, "lr": 5e-5},
                "stage3": {"t_prime": 4},
                "eval": {"every": 7, "mid_t": 1.0, "dfid_ts": [1, 2]},
            },
            "other": {"stage1": {"iterations": 99}},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    pre = resolve_config(path, "pretrain")
    assert (pre.iterations, pre.lr, pre.arch) == (11, 1e-3, {"preset": "tiny", "dropout": 0.1})
    cont = resolve_config(path, "stage1_continued")
    assert (cont.iterations, cont.p_mean, cont.q) == (33, -1.0, 4.0)  # stage1 keys, stage2's length
    s3 = resolve_config(path, "stage3", overrides=["lr=2e-5", "eval_dfid_ts=[0.5, 4]"])
    assert (s3.iterations, s3.t_prime, s3.student_nu, s3.lr, s3.eval_dfid_ts) == (33, 4.0, 2.0, 2e-5, [0.5, 4.0])
    assert (s3.eval_every, s3.eval_mid_t) == (7, 1.0)
    assert resolve_config(path, "stage1", preset="other").iterations == 99
    with pytest.raises(ValueError, match="preset"):
        resolve_config(path, "stage1", preset="missing")
    flat = tmp_path / "flat.yaml"
    flat.write_text("iterations: 5\nbatch: 16\n")
    assert resolve_config(flat, "stage1", overrides=["batch=32"]).batch == 32


def test_precision_on_cpu_is_an_error(data, tmp_path):
    cfg = build_config(micro_overrides(arch=MICRO_ARCH, precision="bf16"), "pretrain")
    with pytest.raises(ValueError, match="'precision'"):
        train(cfg, mode="pretrain", data=data, out=tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run").exists()  # failed before any output


# ---------------------------------------------------------------------------------------------- state files


def _state(iteration: int, value: float = 1.0) -> dict:
    weights = {"w": torch.full((3,), value)}
    return {"net": weights, "ema": weights, "optimizer": {}, "iteration": iteration, "sampler_position": 8 * iteration}


def test_state_keeps_last_two_and_skips_a_torn_file(tmp_path):
    for it in (2, 4, 6):
        save_state(tmp_path, _state(it))
    assert [it for it, _ in list_states(tmp_path)] == [6, 4]
    newest = list_states(tmp_path)[0][1]
    newest.write_bytes(newest.read_bytes()[:100])  # torn
    state = load_latest_state(tmp_path)
    assert state["iteration"] == 4 and state["sampler_position"] == 32
    assert not list(tmp_path.glob("*.tmp"))


def test_state_refuses_non_finite_weights(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match="non-finite"):
        save_state(tmp_path, _state(2, value=float("nan")))
    assert list_states(tmp_path) == []


# ---------------------------------------------------------------------------------------------- in-process runs


def test_frozen_boundary_model_never_changes_and_gets_no_grads(data, tmp_path):
    stage1 = save_micro_checkpoint(tmp_path / "stage1.safetensors", iteration=40, seed=1)
    student = save_micro_checkpoint(tmp_path / "student.safetensors", iteration=40, seed=2)
    original = load_weights(stage1)
    seen = []

    def check(ctx):
        assert ctx.frozen.training  # dropout active, as the official deep copy
        assert all(not p.requires_grad and p.grad is None for p in ctx.frozen.parameters())
        for name, value in ctx.frozen.state_dict().items():
            assert torch.equal(value, original[name]), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.net.parameters())
        seen.append(ctx.iteration)

    cfg = build_config(micro_overrides(double_iters=4), "stage2")  # Stage 1 ran 40 > 9·4 iterations: at the cap
    result = train(cfg, mode="stage2", data=data, out=tmp_path / "run", init=student, boundary_model=stage1,
                   device="cpu", after_backward=check, progress=False)
    assert seen == [40, 41, 42] and result.end_iteration == 43
    assert load_weights(stage1).keys() == original.keys()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [41, 42, 43]
    assert all(r["loss_boundary"] > 0 and r["ratio"] == 0.999 for r in records if "loss" in r)


def _poison_gradients_at(iterations: set[int]):
    def hook(ctx):
        if ctx.iteration in iterations:
            next(ctx.net.parameters()).grad.fill_(float("nan"))
    return hook


def test_nonfinite_skip_drops_the_update_and_counts_it(data, tmp_path):
    cfg = build_config(micro_overrides(arch=MICRO_ARCH, iterations=5, nonfinite="skip", nonfinite_max_share=0.5),
                       "pretrain")  # 2 of 5 dropped: within the share
    result = train(cfg, mode="pretrain", data=data, out=tmp_path / "run", device="cpu",
                   after_backward=_poison_gradients_at({1, 3}), progress=False)
    assert result.nonfinite_skipped == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = {r["step"]: r["nonfinite_skipped"] for r in records if "nonfinite_skipped" in r}
    assert counts == {1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path / "run" / "network.safetensors").values())


def test_nonfinite_abort_after_patience_writes_no_weights(data, tmp_path):
    cfg = build_config(micro_overrides(arch=MICRO_ARCH, iterations=6, nonfinite_patience=2, state_every=1),
                       "pretrain")
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive iterations.*nonfinite=skip"):
        train(cfg, mode="pretrain", data=data, out=tmp_path / "run", device="cpu",
              after_backward=_poison_gradients_at({2, 3, 4}), progress=False)
    assert not (tmp_path / "run" / "network.safetensors").exists()
    state = load_latest_state(tmp_path / "run" / "_state")
    assert state["iteration"] == 3  # the last state before the second bad step; the bad ones were not applied


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_runs_every_mode_and_continues_the_global_iteration(data, tmp_path):
    common = ["batch=8", "log_every=1", "state_every=2", "lr=1e-3"]
    runs = {}

    def run(mode, iterations, **paths):
        out = tmp_path / mode
        run_cli(train_args(mode, data, out, f"iterations={iterations}", *common, **paths))
        config = json.loads((out / "config.json").read_text())
        meta = json.loads((out / "network.json").read_text())
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = (config, meta, steps)
        return out / "network.safetensors"

    arch = "arch=" + json.dumps(MICRO_ARCH)
    pre = run("pretrain", 2, extra=[arch])
    s1_state = tmp_path / "stage1" / "train_state.pt"
    s1 = run("stage1", 3, init=pre, extra=["--final-state", str(s1_state)])
    s2 = run("stage2", 2, init=s1, boundary=s1)
    run("stage3", 2, init=s2, boundary=s2)
    run("stage1_continued", 2, init=s1, extra=["--init-state", str(s1_state)])
    # Stage 1 restarts the counter (its init is a diffusion model); every later stage continues it.
    expected = {"pretrain": (0, 2), "stage1": (0, 3), "stage2": (3, 5), "stage3": (5, 7), "stage1_continued": (3, 5)}
    for mode, (start, end) in expected.items():
        config, meta, steps = runs[mode]
        assert (config["start_iteration"], config["end_iteration"], meta["iteration"]) == (start, end, end), mode
        assert steps == list(range(start + 1, end + 1)), mode
        assert meta["provenance"]["mode"] == mode
    assert runs["stage3"][0]["t_prime"] == 4.0 and runs["stage2"][0]["t_prime"] == 1.0
    assert runs["stage2"][1]["provenance"]["boundary_sha256"] == hashlib.sha256(s1.read_bytes()).hexdigest()
    assert runs["stage1"][0]["init_sha256"] == hashlib.sha256(pre.read_bytes()).hexdigest()
    assert runs["pretrain"][1]["arch"]["model_channels"] == 16


@pytest.mark.slow
def test_cli_rejects_invalid_config_before_compute(data, tmp_path):
    proc = run_cli(train_args("stage2", data, tmp_path / "run", "rho=1.5", init=data, boundary=data), check=False)
    assert proc.returncode != 0 and "'rho'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = run_cli(train_args("stage1", data, tmp_path / "run"), check=False)
    assert proc.returncode != 0 and "--init" in proc.stderr


# ---------------------------------------------------------------------------------------------- periodic evaluation


def test_periodic_fid_dfid_and_grids_start_at_the_stage_start(data, tmp_path):
    from tcm_core.evaluation.commands import compute_reference_stats, save_ref_stats
    from tcm_core.evaluation.features import load_extractor, train_feature_net

    train_feature_net(data, tmp_path / "lenet.pt", epochs=1, batch=16, log=None)
    extractor = load_extractor("lenet", feature_net=tmp_path / "lenet.pt")
    save_ref_stats(tmp_path / "ref.npz", compute_reference_stats(data, extractor, progress=False))
    stage1 = save_micro_checkpoint(tmp_path / "stage1.safetensors", iteration=10, seed=1)
    cfg = build_config(micro_overrides(iterations=2, eval_every=2, grid_every=2, eval_num=8, grid_num=4,
                                       eval_mid_t=1.0, eval_dfid_ts=[2.0]), "stage2")
    run = tmp_path / "run"
    periodic = PeriodicEval(str(tmp_path / "ref.npz"), "lenet", str(tmp_path / "lenet.pt"))
    train(cfg, mode="stage2", data=data, out=run, init=stage1, boundary_model=stage1, device="cpu",
          periodic=periodic, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "periodic/fid_1step" in r}
    assert sorted(evals) == [10, 12]  # the stage's first iteration gives the curve its starting point
    assert all(r["periodic/fid_1step"] > 0 and r["periodic/fid_2step"] > 0 and r["periodic/dfid_t2"] > 0
               for r in evals.values())
    grids = sorted(p.name for p in (run / "grids").iterdir())
    assert grids == [f"grid-0000000{i}-{k}step.png" for i in (10, 12) for k in (1, 2)]


def test_benchmark_times_real_training_iterations():
    from tcm_core.gpu.bench import benchmark_train_iterations

    overrides = {k: v for k, v in MICRO_ARCH.items() if k != "preset"}
    report = benchmark_train_iterations("tiny", batch=4, repeats=2, warmup=0, rounds=1, modes=("stage1", "stage2"),
                                        arch_overrides=overrides)
    assert len(report["stage1_train_times_s"]) == len(report["stage2_train_times_s"]) == 2
    assert report["stage1_train_s_per_it"] == min(report["stage1_train_times_s"]) > 0
    assert report["stage2_over_stage1_train_time"] == pytest.approx(
        report["stage2_train_s_per_it"] / report["stage1_train_s_per_it"])
    assert report["parameters"] < 1e6


# ---------------------------------------------------------------------------------------------- global batch


@pytest.mark.parametrize("batch, rho", [(8, 0.25), (128, 0.1), (10, 0.3), (16, 0.5)])
def test_boundary_samples_are_counted_in_the_global_batch(batch, rho):
    from tcm_core.training.global_batch import boundary_positions, chunk_plan

    mask = boundary_positions(7, 3, batch, rho)
    assert int(mask.sum()) == int(np.floor(batch * rho))  # N_B = ⌊B·ρ⌋ (128, 0.1: 12, where per-GPU floors give 8)
    assert torch.equal(mask, boundary_positions(7, 3, batch, rho))  # from the iteration's seed alone
    assert not torch.equal(mask, boundary_positions(7, 4, batch, rho)) or batch * rho >= batch - 1
    for size in (d for d in (1, 2, batch // 4, batch // 2, batch) if d and batch % d == 0):
        plans = [chunk_plan(mask, g, size) for g in range(batch // size)]
        assert torch.equal(torch.cat([p.is_boundary for p in plans]), mask)  # any chunking: the same samples
        assert all(p.fraction == int(mask.sum()) / batch for p in plans)


def test_a_rho_that_gives_no_boundary_sample_is_refused_before_compute():
    with pytest.raises(ValueError, match="'rho'.*floor\\(batch \\* rho\\)"):
        build_config({"batch": 16, "rho": 0.05}, "stage2")
    assert build_config({"batch": 16, "rho": 0.0625, "batch_gpu": 2}, "stage2").rho == 0.0625


def test_a_state_trained_from_other_input_files_is_discarded_not_resumed(data, tmp_path):
    """An upstream job reran (another Stage-1 file): Stage 2 starts afresh instead of resuming on top of it."""
    first = save_micro_checkpoint(tmp_path / "a.safetensors", iteration=30, seed=1)
    second = save_micro_checkpoint(tmp_path / "b.safetensors", iteration=30, seed=2)
    state = tmp_path / "state"

    def run(init, iterations):
        cfg = build_config(micro_overrides(iterations=iterations, state_every=1), "stage2")
        return train(cfg, mode="stage2", data=data, out=tmp_path / "run", init=init, boundary_model=init,
                     state_dir=state, device="cpu", progress=False)

    run(first, 2)
    assert run(first, 3).resumed_from == 32  # the same inputs: resumed
    fresh = run(second, 3)
    assert fresh.resumed_from is None and fresh.end_iteration == 33
    assert [it for it, _ in list_states(state)] == [33, 32]  # the old states (up to 33 from `first`) are gone
