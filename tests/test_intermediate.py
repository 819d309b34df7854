"""The intermediate-stage arm (paper App. B): Stage 1's training state continued with its times on [t_min, t'), then
Stage 2 with that fine-tuned network as its frozen boundary.

Every run is built from a presets YAML as a job builds it (``resolve_config`` + ``setup``), from the files of a
real Stage-1 run and a real intermediate run; the numbers are checked against scipy's truncated normal (on ln t),
the paper's Δt formula written out here, and networks loaded independently from the files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats
from training_helpers import MICRO_ARCH, CallRecorder, load_weights, make_small_mnist, save_micro_checkpoint

from tcm_core.errors import ConfigError, RefusedFileError
from tcm_core.presets import resolve_config
from tcm_core.training.setup import RunPaths, setup
from tcm_core.training.state import load_state_file

T_PRIME, T_MIN, P_MEAN, P_STD = 1.3, 0.005, 0.1, 1.3  # unlike the defaults: much of the mass lies near t'
STAGE1 = {"iterations": 4, "batch": 8, "optimizer": "radam", "lr": 3e-4, "p_mean": P_MEAN, "p_std": P_STD,
          "t_min": T_MIN, "t_max": 60.0, "q": 5.0, "ratio_limit": 0.995, "double_iters": 7, "c": 0.02,
          "weighting": "inv_cout_sq", "log_every": 1, "state_every": 1000, "seed": 3}
STAGE2 = {**STAGE1, "batch": 10, "t_prime": T_PRIME, "rho": 0.3, "w_b": 0.7, "student_sigma": 0.35,
          "student_nu": 1.5, "weighting": "inv_delta_t"}
PRESETS = {"preset": "micro", "presets": {"micro": {
    "arch": MICRO_ARCH, "stage1": STAGE1, "stage2": STAGE2, "intermediate": {"iterations": 3}, "eval": {"every": 0}}}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A real Stage-1 run (network + final training state) and a real intermediate run from it."""
    from tcm_core.training.loop import train

    folder = tmp_path_factory.mktemp("intermediate")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(PRESETS))
    data = make_small_mnist(folder / "mnist16.zip", count=40)
    init = save_micro_checkpoint(folder / "init.safetensors", iteration=0, seed=1)
    state = folder / "stage1" / "train_state.pt"
    stage1 = train(resolve_config(config, "stage1", "micro", []), mode="stage1", data=data, out=folder / "stage1",
                   init=init, final_state=state, device="cpu", progress=False)
    finetuned = train(resolve_config(config, "intermediate", "micro", []), mode="intermediate", data=data,
                      out=folder / "finetune", init=stage1.network, init_state=state, device="cpu", progress=False)
    return {"config": config, "data": data, "stage1": stage1.network, "state": state, "finetuned": finetuned.network}


def build(files, mode: str, tmp_path: Path, overrides: list[str] | None = None, **paths):
    cfg = resolve_config(files["config"], mode, "micro", overrides or [])
    return cfg, setup(cfg, mode, RunPaths(data=files["data"], out=tmp_path / mode, **paths), device="cpu")


def intermediate_paths(files) -> dict[str, Path]:
    return {"init": files["stage1"], "init_state": files["state"]}  # what the workflow's rule passes


def scipy_cdf(t: np.ndarray) -> np.ndarray:
    """Stage 1's log-normal truncated to [t_min, t'): scipy's truncated normal of ln t."""
    a, b = (math.log(T_MIN) - P_MEAN) / P_STD, (math.log(T_PRIME) - P_MEAN) / P_STD
    return stats.truncnorm.cdf(np.log(t), a, b, loc=P_MEAN, scale=P_STD)


# ------------------------------------------------------------------------------------------ the sampler


def test_intermediate_times_are_stage1s_lognormal_truncated_exactly_below_t_prime(files, tmp_path):
    _, run = build(files, "intermediate", tmp_path, **intermediate_paths(files))
    dist = run.loss_fn.time_dist
    t = np.geomspace(T_MIN, T_PRIME, 60)[:-1]
    np.testing.assert_allclose(dist.cdf(t), scipy_cdf(t), atol=1e-12)
    assert dist.cdf(np.array([T_PRIME]))[0] == 1.0  # no mass at or above t'
    torch.manual_seed(0)
    draws = dist.sample(50_000).numpy()
    assert draws.min() >= T_MIN and draws.max() < T_PRIME
    assert draws.max() > 0.99 * T_PRIME  # truncated at t', not below it
    assert stats.kstest(draws, lambda x: scipy_cdf(np.asarray(x))).statistic < 0.01
    top = dist.icdf_table(torch.ones(4, dtype=torch.float64))  # the sampler's largest possible draw
    assert torch.all(top < T_PRIME)


def test_intermediate_consistency_pairs_stay_below_t_prime(files, tmp_path):
    """Both times of every pair, t and the earlier s = t − Δt(t), lie in [t_min, t') (paper: [0, t'))."""
    _, run = build(files, "intermediate", tmp_path, **intermediate_paths(files))
    student = CallRecorder(run.net)
    torch.manual_seed(2)
    ratio = run.ratio(run.iteration)
    run.loss_fn(run.net, torch.rand(200, 1, 16, 16) * 2 - 1, None, ratio=ratio)
    graded, target = student.calls
    t, s = graded["sigma"].numpy(), target["sigma"].numpy()
    delta = t * (1.0 - ratio) * (1.0 + 8.0 / (1.0 + np.exp(t)))  # the paper's Δt, written out
    np.testing.assert_allclose(s, np.maximum(t - delta, 1e-6), rtol=1e-12)
    assert t.max() < T_PRIME and np.all(s < t) and t.min() >= T_MIN


# ------------------------------------------------------------------------------------------ where it starts


def test_intermediate_resumes_stage1s_final_training_state(files, tmp_path):
    cfg, run = build(files, "intermediate", tmp_path, **intermediate_paths(files))
    state = load_state_file(files["state"])
    assert (run.start_iteration, run.end_iteration) == (4, 4 + 3)  # Stage 1's counter, K = intermediate.iterations
    assert run.info["control_resolved"] == "continued" and not run.curriculum_at_cap
    assert cfg.t_prime == T_PRIME and cfg.batch == STAGE1["batch"] and cfg.lr == STAGE1["lr"]
    for name, value in run.net.state_dict().items():  # the online weights, not the EMA
        assert torch.equal(value, state["net"][name]), name
    ema = load_weights(files["stage1"])
    assert all(torch.equal(ema[name], value) for name, value in run.ema.state_dict().items() if name in ema)
    assert run.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()
    assert run.sampler.position == state["sampler_position"] == 8 * 4


def test_intermediate_needs_stage1s_state_and_refuses_another_runs(files, tmp_path):
    with pytest.raises(ConfigError, match="--init-state"):
        build(files, "intermediate", tmp_path, init=files["stage1"])
    with pytest.raises(RefusedFileError, match="differs in lr"):
        build(files, "intermediate", tmp_path, ["lr=5e-4"], **intermediate_paths(files))
    _, seeded = build(files, "intermediate", tmp_path, ["seed=4"], **intermediate_paths(files))  # training seed j
    assert seeded.start_iteration == 4
    with pytest.raises(ConfigError, match="t_prime"):
        resolve_config(files["config"], "intermediate", "micro", ["t_prime=60.0"])


# ------------------------------------------------------------------------------------------ the Stage-2 variants


@pytest.mark.parametrize("init", ["stage1", "finetuned"])
def test_stage2_variant_answers_below_t_prime_with_the_finetuned_network(files, tmp_path, init):
    """The frozen boundary of both variants IS the fine-tuned network: its weights, and every target with
    s < t' (boundary samples included) is what that file's network, loaded independently, computes."""
    from tcm_core.io.network_files import load_network
    from tcm_core.training.global_batch import boundary_positions, chunk_plan

    cfg, run = build(files, "stage2", tmp_path, ["dropout=0.0"], init=files[init], boundary_model=files["finetuned"])
    finetuned, stage1 = load_weights(files["finetuned"]), load_weights(files["stage1"])
    assert all(torch.equal(finetuned[n], v) for n, v in run.frozen.state_dict().items() if n in finetuned)
    assert any(not torch.equal(finetuned[n], stage1[n]) for n in finetuned)  # the two networks differ
    started = load_weights(files[init])
    assert all(torch.equal(started[n], v) for n, v in run.net.state_dict().items() if n in started)
    assert run.info["boundary_iteration"] == 4 + 3  # Stage 1's N plus the intermediate stage's K
    frozen = CallRecorder(run.frozen)
    mask = boundary_positions(cfg.seed, run.iteration, 10, cfg.rho)
    torch.manual_seed(3)
    run.loss_fn(run.net, torch.rand(10, 1, 16, 16) * 2 - 1, None, ratio=run.ratio(run.iteration),
                boundary=chunk_plan(mask, 0, 10))
    assert frozen.calls and all(torch.all(c["sigma"] < T_PRIME) for c in frozen.calls)
    reference = {name: load_network(files[name], "cpu", {"dropout": 0.0})[0].eval() for name in ("finetuned", "stage1")}
    for call in frozen.calls:
        with torch.no_grad():
            expected = reference["finetuned"](call["x"], call["sigma"].float())
            other = reference["stage1"](call["x"], call["sigma"].float())
        torch.testing.assert_close(call["out"], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(call["out"], other, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ the presets


@pytest.mark.parametrize("preset", ["tiny", "ci", "cifar10", "imagenet64_s"])
def test_presets_resolve_the_arm_as_stage1_going_on_and_the_grid_centres_stage2(preset):
    """intermediate = Stage 1's keys with K iterations and Stage 2's t'; both variants = the grid centre's keys (the
    default Stage 2 they are compared with: same batch) with M - K of its M iterations, periodic evaluation aside."""
    from tcm_core.presets import ablation_keys, ablation_points, intermediate_stage2_keys, section_keys

    block = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())["presets"][preset]
    stage1, intermediate = section_keys(block, "stage1"), section_keys(block, "intermediate")
    observability, own = {"eval_every", "eval_points"}, {"iterations", "t_prime"}
    assert intermediate["iterations"] == block["intermediate"]["iterations"] != stage1["iterations"]
    assert intermediate["t_prime"] == block["stage2"]["t_prime"]
    assert {k: v for k, v in intermediate.items() if k not in own | observability} == {
        k: v for k, v in stage1.items() if k not in own | observability}
    centre = ablation_keys(block, ablation_points(block)[0])
    variant = intermediate_stage2_keys(block)
    assert {k: v for k, v in variant.items() if k not in observability | {"iterations"}} == {
        k: v for k, v in centre.items() if k not in observability | {"iterations"}}
    # equal total iterations: the fine-tuning's K plus the variant's M - K is the default Stage 2's M
    assert variant["iterations"] + block["intermediate"]["iterations"] == block["ablation"]["iterations"]
    assert variant["batch"] == block["ablation"]["batch"]
