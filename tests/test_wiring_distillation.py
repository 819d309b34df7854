"""CD wiring: the teacher file, the ODE solver and the guidance scale of a presets YAML reach the formula.

Each run is built exactly as a job builds it (``resolve_config`` + ``train_setup.setup`` with ``--teacher``); the
expected x_s is recomputed here in numpy from the inputs and outputs recorded on the teacher network itself
(Euler: x_t + (s − t)·(x_t − D_w)/t; Heun: the trapezoid with D_w at the Euler point; D_w = D_∅ + w·(D_c − D_∅)),
and compared with what the student's and the frozen model's target passes were given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from training_helpers import MICRO_ARCH, load_weights, make_small_mnist

from tcm_core.errors import ConfigError
from tcm_core.io.hashing import sha256_file
from tcm_core.presets import resolve_config
from tcm_core.training.global_batch import boundary_positions, chunk_plan
from tcm_core.training.setup import RunPaths, setup

COND_ARCH = {**MICRO_ARCH, "label_dim": 10}
STAGE1 = {"iterations": 3, "batch": 8, "lr": 3e-4, "p_mean": -0.4, "p_std": 1.5, "q": 4.0, "ratio_limit": 0.99,
          "double_iters": 5, "c": 0.01, "log_every": 1, "state_every": 1000, "seed": 5,
          "method": "cd", "ode_solver": "euler", "guidance": 1.7}
STAGE2 = {**STAGE1, "batch": 10, "t_prime": 1.2, "rho": 0.3, "w_b": 0.4, "student_sigma": 0.3, "student_nu": 2.0,
          "ode_solver": "heun", "guidance": 0.6}
PRESETS = {"preset": "micro", "presets": {"micro": {
    "arch": COND_ARCH, "pretrain": {"iterations": 2, "batch": 8, "label_dropout": 0.25},
    "stage1": STAGE1, "stage2": STAGE2, "eval": {"every": 0}}}}


def conditional_checkpoint(path: Path, seed: int, label_dropout: float) -> Path:
    """A class-conditional micro network (weights moved off their zero init so the labels matter)."""
    from tcm_core.io.network_files import save_network
    from tcm_core.networks import arch_preset, build_precond

    spec = dict(COND_ARCH)
    torch.manual_seed(seed)
    net = build_precond(arch_preset(spec.pop("preset"), **spec, label_dropout=label_dropout))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_network(net, path, iteration=40, provenance={"note": "test"})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cd-wiring")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(PRESETS))
    return {"config": config, "data": make_small_mnist(folder / "mnist16.zip", count=40),
            "teacher": conditional_checkpoint(folder / "teacher.safetensors", seed=7, label_dropout=0.2),
            "student": conditional_checkpoint(folder / "student.safetensors", seed=1, label_dropout=0.1),
            "plain": conditional_checkpoint(folder / "no-null.safetensors", seed=2, label_dropout=0.0)}


def build(files, mode: str, tmp_path: Path, overrides=(), **paths):
    cfg = resolve_config(files["config"], mode, "micro", list(overrides))
    return cfg, setup(cfg, mode, RunPaths(data=files["data"], out=tmp_path / mode, **paths), device="cpu")


class Recorder:
    """Every call of a network: x, sigma, labels (float rows) and the output, in float64."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        net.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        labels = args[2] if len(args) > 2 else None
        self.calls.append({"x": args[0].detach().double().numpy().copy(),
                           "sigma": torch.as_tensor(args[1]).detach().double().reshape(-1).numpy().copy(),
                           "labels": None if labels is None else labels.detach().double().numpy().copy(),
                           "out": output.detach().double().numpy().copy(), "grad": torch.is_grad_enabled()})


def guided(call: dict[str, np.ndarray], labels: np.ndarray, w: float) -> np.ndarray:
    """D_w from one teacher call over the doubled batch: the first half conditional on c, the second on ∅."""
    half = len(labels)
    np.testing.assert_array_equal(call["labels"][:half], labels)
    np.testing.assert_array_equal(call["labels"][half:], np.zeros_like(labels))
    np.testing.assert_array_equal(call["x"][:half], call["x"][half:])
    d_c, d_u = call["out"][:half], call["out"][half:]
    return d_u + w * (d_c - d_u)


def col(t: np.ndarray) -> np.ndarray:
    return t.reshape(-1, 1, 1, 1)


def batch_of(files, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tcm_core.data import open_dataset

    dataset = open_dataset(files["data"])
    images, labels = dataset.get_batch(np.arange(n))
    return torch.from_numpy(images).float() / 127.5 - 1, dataset.one_hot(labels)


def test_cd_stage1_x_s_is_one_guided_euler_step_of_the_teacher_file(files, tmp_path):
    cfg, run = build(files, "stage1", tmp_path, init=files["student"], teacher=files["teacher"])
    assert (cfg.method, cfg.ode_solver, cfg.guidance) == ("cd", "euler", 1.7)
    weights = load_weights(files["teacher"])
    assert all(torch.equal(weights[name], p) for name, p in run.teacher.state_dict().items())
    assert not torch.equal(load_weights(files["student"])["model.map_label.weight"],
                           run.teacher.state_dict()["model.map_label.weight"])
    assert not run.teacher.training and run.net.training
    assert run.info["teacher_sha256"] == sha256_file(files["teacher"])
    assert run.net.model.label_dropout == 0.0  # the student's file says 0.1: CT/CD never drop labels
    student, teacher = Recorder(run.net), Recorder(run.teacher)
    images, labels = batch_of(files, 8)
    torch.manual_seed(3)
    run.loss_fn(run.net, images, labels, ratio=run.ratio(7))
    (graded, target), (step,) = student.calls, teacher.calls  # Euler: one teacher pass (over 2B rows)
    assert graded["grad"] and not target["grad"] and not step["grad"]
    t, s, x_t = graded["sigma"], target["sigma"], graded["x"]
    np.testing.assert_allclose(step["x"][:8], x_t, rtol=0, atol=0)
    np.testing.assert_allclose(step["sigma"][:8], t, rtol=1e-7)
    d_w = guided(step, labels.numpy(), 1.7)
    expected = x_t + col(s - t) * (x_t - d_w) / col(t)
    np.testing.assert_allclose(target["x"], expected, rtol=1e-5, atol=1e-5)


def match_targets(s: np.ndarray, calls: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """x given to the target passes, per sample (matched by s), and which call (index) answered it."""
    x = np.full((len(s), 1, 16, 16), np.nan)
    owner = np.full(len(s), -1)
    for number, call in enumerate(calls):
        for row, s_row in enumerate(call["sigma"]):
            candidates = np.flatnonzero((np.abs(s - s_row) <= 1e-6 * s_row) & (owner < 0))
            assert candidates.size, "a target pass saw an s no sample has"
            x[candidates[0]], owner[candidates[0]] = call["x"][row], number
    assert np.all(owner >= 0)
    return x, owner


def test_cd_stage2_x_s_is_one_guided_heun_step_and_the_boundary_targets_get_it(files, tmp_path):
    cfg, run = build(files, "stage2", tmp_path, init=files["student"], boundary_model=files["student"],
                     teacher=files["teacher"])
    assert (cfg.ode_solver, cfg.guidance) == ("heun", 0.6)
    assert run.frozen.model.label_dropout == 0.0  # the frozen model runs in train mode: no label drops either
    student, frozen, teacher = Recorder(run.net), Recorder(run.frozen), Recorder(run.teacher)
    images, labels = batch_of(files, 10)
    mask = boundary_positions(cfg.seed, run.iteration, 10, 0.3)
    torch.manual_seed(4)
    run.loss_fn(run.net, images, labels, ratio=run.ratio(run.iteration), boundary=chunk_plan(mask, 0, 10))
    graded = [c for c in student.calls if c["grad"]]
    assert len(graded) == 1 and len(teacher.calls) == 2  # Heun: D at (x_t, t), then at (x̂_s, s)
    t, x_t = graded[0]["sigma"], graded[0]["x"]
    first, second = teacher.calls
    np.testing.assert_array_equal(first["x"][:10], x_t)
    d_t = (x_t - guided(first, labels.numpy(), 0.6)) / col(t)
    s = second["sigma"][:10]
    np.testing.assert_allclose(second["x"][:10], x_t + col(s - t) * d_t, rtol=1e-5, atol=1e-5)  # the Euler point
    d_s = (second["x"][:10] - guided(second, labels.numpy(), 0.6)) / col(s)
    expected = x_t + col(s - t) * 0.5 * (d_t + d_s)
    student_targets = [c for c in student.calls if not c["grad"]]
    x_target, owner = match_targets(s, student_targets + frozen.calls)
    from_frozen = owner >= len(student_targets)
    assert np.array_equal(from_frozen, s < 1.2) and from_frozen[mask.numpy()].all()
    np.testing.assert_allclose(x_target, expected, rtol=1e-5, atol=1e-5)


def test_cd_training_steps_leave_the_teacher_untouched_and_record_it(files, tmp_path):
    from tcm_core.training.loop import train

    cfg = resolve_config(files["config"], "stage1", "micro", [])
    out = tmp_path / "run"
    result = train(cfg, mode="stage1", data=files["data"], out=out, init=files["student"],
                   teacher=files["teacher"], device="cpu", progress=False)
    import json

    provenance = json.loads(result.network.with_suffix(".json").read_text())["provenance"]
    assert provenance["teacher_sha256"] == sha256_file(files["teacher"])
    assert provenance["config"]["method"] == "cd" and provenance["config"]["guidance"] == 1.7
    params = json.loads((out / "params.json").read_text())
    assert (params["method"], params["ode_solver"], params["guidance"]) == ("cd", "euler", 1.7)
    assert params["teacher"] == str(files["teacher"])
    from tcm_core.evaluation.commands import checkpoint_method
    from tcm_core.io.network_files import load_network

    # what an evaluation run of this network logs as its params
    assert checkpoint_method(load_network(result.network)[1]) == {"method": "cd", "ode_solver": "euler",
                                                                  "guidance": 1.7}
    assert checkpoint_method(load_network(files["teacher"])[1]) == {"method": None, "ode_solver": None,
                                                                    "guidance": None}
    _, run = build(files, "stage1", tmp_path, init=files["student"], teacher=files["teacher"])
    from tcm_core.training.step import train_step

    before = {k: v.clone() for k, v in run.teacher.state_dict().items()}
    for _ in range(2):
        train_step(run)
    assert not run.teacher.training and all(p.grad is None for p in run.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in run.teacher.state_dict().items())


def test_pretrain_label_dropout_reaches_the_network_and_its_file(files, tmp_path):
    from tcm_core.training.loop import train

    cfg = resolve_config(files["config"], "pretrain", "micro", [])
    _, run = build(files, "pretrain", tmp_path)
    assert run.net.model.label_dropout == 0.25 == cfg.label_dropout and run.net.label_dim == 10
    result = train(cfg, mode="pretrain", data=files["data"], out=tmp_path / "pre", device="cpu", progress=False)
    import json

    assert json.loads(result.network.with_suffix(".json").read_text())["arch"]["label_dropout"] == 0.25


@pytest.mark.parametrize(("mode", "overrides", "paths", "where"), [
    ("stage1", [], {}, "--teacher"),  # cd without a teacher
    ("stage1", ["method=ct", "ode_solver=null", "guidance=null"], {"teacher": "teacher"}, "--teacher"),
    ("stage1", [], {"teacher": "plain"}, "--teacher"),  # guidance, but the teacher never learned ∅
    ("stage1", ["method=ct"], {}, "ode_solver"),  # a solver with ct would be silently unused
    ("stage1", ["method=ct", "ode_solver=null"], {}, "guidance"),
    ("stage1", ["label_dropout=0.1"], {"teacher": "teacher"}, "label_dropout"),
    ("pretrain", ["method=cd"], {}, "method"),
])
def test_cd_settings_are_refused_where_they_cannot_mean_what_they_say(files, tmp_path, mode, overrides, paths,
                                                                      where):
    kwargs = {k: files[v] for k, v in paths.items()}
    if mode != "pretrain":
        kwargs["init"] = files["student"]
    with pytest.raises(ConfigError) as error:
        build(files, mode, tmp_path, overrides, **kwargs)
    assert where in error.value.where


# ------------------------------------------------------------------------------------------ presets


def repo_config() -> dict:
    return yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())


def test_the_ci_presets_distillation_arm_resolves_to_cd_jobs():
    from tcm_core.presets import check_preset

    configs = check_preset(repo_config(), "ci")
    for mode in ("stage1", "stage1_continued", "stage2"):
        cd, ct = configs[f"distill/{mode}"], configs[mode]
        assert (cd.method, cd.ode_solver, cd.guidance) == ("cd", "heun", 1.5)
        assert (ct.method, ct.ode_solver, ct.guidance) == ("ct", None, None)
        assert {k: v for k, v in cd.to_dict().items() if k not in ("method", "ode_solver", "guidance")} == {
            k: v for k, v in ct.to_dict().items() if k not in ("method", "ode_solver", "guidance")}
    assert configs["pretrain"].label_dropout == 0.1 and configs["pretrain"].method is None


@pytest.mark.parametrize(("preset", "change", "where"), [
    ("imagenet64_s", {"stage1": {"method": "cd"}}, "presets.imagenet64_s.teacher"),  # no teacher block
    ("imagenet64_xl", {"distill": {"method": "cd"}, "teacher": {"kind": "path", "path": "edm2.pkl"}},
     "presets.imagenet64_xl.distill"),  # its init is a Stage-1 model: no CD Stage 1 from it
    ("imagenet64_xl", {"stage2": {"method": "cd"}, "teacher": {"kind": "init"}}, "presets.imagenet64_xl.teacher"),
    ("cifar10", {"teacher": {"kind": "pretrain"}, "distill": {"method": "cd"}}, "presets.cifar10.teacher.kind"),
])
def test_a_preset_refuses_a_distillation_it_cannot_run(preset, change, where):
    from tcm_core.presets import check_preset

    config = repo_config()
    block = config["presets"][preset]
    block["dataset"] = {"path": "data.zip"}
    if preset == "imagenet64_xl":
        block["init"]["path"] = "ecm-xl.pkl"
    for key, value in change.items():
        block[key] = {**(block.get(key) or {}), **value} if key != "teacher" else value
    with pytest.raises(ConfigError) as error:
        check_preset(config, preset)
    assert where in error.value.where


def test_an_overlay_switches_the_distillation_arm_off_with_null(tmp_path):
    """`distill: null` in an overlay removes a preset's arm (a mapping would merge into it), so a Stage-1 init,
    which the arm cannot train from, passes; the teacher of no CD job is not checked."""
    from tcm_core.presets import check_config_files

    repo = Path(__file__).resolve().parents[1]
    stage1_init = "presets:\n  ci:\n    init: {kind: path, path: /x/stage1.safetensors, provides: stage1}\n"
    (tmp_path / "on.yaml").write_text(stage1_init)
    (tmp_path / "off.yaml").write_text(stage1_init + "    distill: null\n")
    refused = check_config_files([repo / "config.yaml", tmp_path / "on.yaml"], preset="ci")
    assert refused and "presets.ci.distill" in refused[0].line()
    assert check_config_files([repo / "config.yaml", tmp_path / "off.yaml"], preset="ci") == []
