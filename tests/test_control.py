"""The Stage-1 control is the paper's control (Fig. 1b): Stage 1 itself, going on for as long as Stage 2 runs.

Stage 1 for N iterations followed by the control for M gives the same weights, bit for bit on CPU, as one
Stage-1 run of N + M iterations: online weights, optimiser, EMA, LR schedule, data order and global iteration
all continue.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from training_helpers import MICRO_ARCH, load_weights, make_small_mnist, run_cli, save_foreign_state_dict

from tcm_core.errors import ConfigError, RefusedFileError
from tcm_core.presets import resolve_config
from tcm_core.training.setup import RunPaths, setup
from tcm_core.training.state import load_state_file

N, M = 5, 4
STAGE1 = {"iterations": N, "batch": 8, "batch_gpu": 4, "optimizer": "radam", "lr": 1e-3, "ema": "power",
          "ema_gamma": 6.94, "lr_decay_iters": 3, "q": 2.0, "ratio_limit": 0.999, "double_iters": 3, "c": 1e-8,
          "log_every": 1, "state_every": 2, "seed": 11, "deterministic": True}
PRESETS = {"preset": "micro", "presets": {"micro": {
    "arch": MICRO_ARCH, "pretrain": {"iterations": 2, "batch": 8, "optimizer": "adam", "lr": 1e-3, "seed": 1},
    "stage1": STAGE1, "stage2": {"iterations": M, "batch": 8}, "eval": {"every": 0}}}}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("control")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(PRESETS))
    data = make_small_mnist(folder / "mnist16.zip", count=36)  # not a multiple of the batch: epochs wrap
    run_cli(["train", "--mode", "pretrain", "--config", str(config), "--data", str(data), "--out",
             str(folder / "pretrain"), "--device", "cpu", "--quiet"])
    return {"config": config, "data": data, "pretrain": folder / "pretrain" / "network.safetensors"}


def _train(files, mode: str, out: Path, *extra: str) -> Path:
    run_cli(["train", "--mode", mode, "--config", str(files["config"]), "--data", str(files["data"]),
             "--out", str(out), "--device", "cpu", "--quiet", *extra])
    return out / "network.safetensors"


@pytest.mark.slow
def test_stage1_then_the_control_equals_one_longer_stage1_run(files, tmp_path):
    pre = str(files["pretrain"])
    longer = _train(files, "stage1", tmp_path / "long", "--init", pre, "--final-state",
                    str(tmp_path / "long" / "train_state.pt"), f"iterations={N + M}")
    stage1_state = tmp_path / "stage1" / "train_state.pt"
    stage1 = _train(files, "stage1", tmp_path / "stage1", "--init", pre, "--final-state", str(stage1_state))
    control = _train(files, "stage1_continued", tmp_path / "control", "--init", str(stage1), "--init-state",
                     str(stage1_state), "--state-dir", str(tmp_path / "control_state"))

    expected, actual = load_weights(longer), load_weights(control)
    assert expected.keys() == actual.keys()
    for name in expected:  # the EMA
        assert torch.equal(expected[name], actual[name]), name
    long_state = load_state_file(tmp_path / "long" / "train_state.pt")
    control_state = load_state_file(sorted((tmp_path / "control_state").glob("state-*.pt"))[-1])
    for name, value in long_state["net"].items():  # the online weights
        assert torch.equal(value, control_state["net"][name]), name
    assert control_state["sampler_position"] == long_state["sampler_position"] == 8 * (N + M)
    # the control's metrics are the longer run's, from iteration N + 1 on (no jump at the start)
    assert _metrics(tmp_path / "control") == _metrics(tmp_path / "long")[N:]
    config = json.loads((tmp_path / "control" / "config.json").read_text())
    assert (config["start_iteration"], config["end_iteration"], config["control_resolved"]) == (N, N + M,
                                                                                                "continued")


def test_the_control_needs_stage1s_state_or_the_named_variant(files, tmp_path):
    cfg = resolve_config(files["config"], "stage1_continued", "micro", [])
    with pytest.raises(ConfigError, match="--init-state"):
        setup(cfg, "stage1_continued", RunPaths(data=files["data"], out=tmp_path / "c", init=files["pretrain"]),
              device="cpu")


def test_ema_restart_from_a_foreign_checkpoint_is_visible_and_at_the_ratio_cap(files, tmp_path):
    cfg = resolve_config(files["config"], "stage1_continued", "micro", ["control=ema_restart"])
    foreign = save_foreign_state_dict(tmp_path / "ecm.pt", seed=3)
    run = setup(cfg, "stage1_continued", RunPaths(data=files["data"], out=tmp_path / "c", init=foreign),
                device="cpu")
    assert run.info["control_resolved"] == "ema_restart" and run.curriculum_at_cap
    assert run.ratio(run.iteration) == 0.999 and run.start_iteration == 0


def test_a_state_of_another_stage1_run_is_refused(files, tmp_path):
    from tcm_core.training.loop import train

    stage1_cfg = resolve_config(files["config"], "stage1", "micro", ["iterations=1", "lr=5e-4"])
    state = tmp_path / "other" / "train_state.pt"
    other = train(stage1_cfg, mode="stage1", data=files["data"], out=tmp_path / "other", init=files["pretrain"],
                  final_state=state, device="cpu", progress=False)
    cfg = resolve_config(files["config"], "stage1_continued", "micro", [])
    with pytest.raises(RefusedFileError, match="differs in lr"):
        setup(cfg, "stage1_continued", RunPaths(data=files["data"], out=tmp_path / "c", init=other.network,
                                                init_state=state), device="cpu")
