"""The presets of config.yaml: each job's resolved TrainConfig keys, the ablation grid, and every check the JSON
schema cannot express. One source of truth: the workflow imports it (before any job runs) and so does ``train``.

Resolution of a mode's keys from ``presets[P]`` (see docs/ARCHITECTURE.md "config.yaml layout"):

* ``stage1_continued`` (the control) takes the ``stage1`` keys with the ``iterations`` of ``stage2``: it is Stage 1
  going on for as long as Stage 2 runs;
* ``stage3`` merges ``stage3`` over ``stage2``; ``pretrain`` also takes the preset's ``arch``;
* every mode takes the preset's ``eval`` block (``every, num, mid_t, dfid_ts`` -> ``eval_every, eval_num,
  eval_mid_t, eval_dfid_ts``) unless its section sets those keys itself;
* an ablation point overrides ``stage2`` with its factor values and the ablation's ``batch`` and ``iterations``.

A flat YAML (no ``presets``) is taken as the TrainConfig keys directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tcm_core.errors import ConfigError, MissingFileError
from tcm_core.train_config import MODES, TrainConfig, build_config, parse_overrides, validate_config

EVAL_BLOCK_KEYS = {"every": "eval_every", "num": "eval_num", "mid_t": "eval_mid_t", "dfid_ts": "eval_dfid_ts"}
ABLATION_FACTORS = ("t_prime", "rho", "w_b", "student_sigma", "student_nu")  # the Stage-2 keys the grids vary
MAX_PARAMETERS = 4_000_000_000  # refuse architectures beyond this (EDM2-XL has 1.12e9): a typo, not a model


# ---------------------------------------------------------------------------------------------------------- files


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a missing file or a syntax error is one clear error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("config file not found", str(path), "check the path")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path} line {mark.line + 1} column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error ({problem})", where, "fix the file") from None


def preset_block(raw: dict[str, Any], name: str | None, where: str) -> dict[str, Any]:
    presets = raw.get("presets") or {}
    name = name or raw.get("preset")
    if name is None or name not in presets:
        raise ConfigError(f"unknown preset {name!r}", f"{where} presets", f"use one of {', '.join(map(str, presets))}")
    return presets[name] or {}


# ---------------------------------------------------------------------------------------------------------- keys


def _section(preset: dict[str, Any], key: str) -> dict[str, Any]:
    value = preset.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError("a section is not a mapping", f"presets.<preset>.{key}", "make it a mapping")
    return dict(value)


def section_keys(preset: dict[str, Any], mode: str) -> dict[str, Any]:
    """The TrainConfig keys of ``mode`` in a preset block (before command-line overrides)."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}", "--mode", f"use one of {', '.join(MODES)}")
    if mode == "stage1_continued":
        keys = _section(preset, "stage1")
        if "iterations" in _section(preset, "stage2"):
            keys["iterations"] = _section(preset, "stage2")["iterations"]
    elif mode == "stage3":
        keys = {**_section(preset, "stage2"), **_section(preset, "stage3")}
    else:
        keys = _section(preset, mode)
    if mode == "pretrain" and "arch" not in keys and preset.get("arch") is not None:
        keys["arch"] = dict(preset["arch"])
    evaluation = _section(preset, "eval")
    for eval_key, cfg_key in EVAL_BLOCK_KEYS.items():
        if cfg_key not in keys and eval_key in evaluation:
            keys[cfg_key] = evaluation[eval_key]
    return keys


def ablation_points(preset: dict[str, Any]) -> list[dict[str, float]]:
    """The DISTINCT Stage-2 configurations of every grid (the baseline, shared by all grids, first and once)."""
    stage2, grid = _section(preset, "stage2"), _section(preset, "ablation")
    if not any(grid.get(k) for k in ("t_prime", "rho", "w_b", "sigma_nu")):
        return []
    defaults = TrainConfig()
    base = {k: float(stage2.get(k, getattr(defaults, k))) for k in ABLATION_FACTORS}
    rows = [dict(base)]
    rows += [{**base, "t_prime": float(t)} for t in grid.get("t_prime", [])]
    rows += [{**base, "rho": float(r), "w_b": float(w)} for r in grid.get("rho", []) for w in grid.get("w_b", [])]
    rows += [{**base, "student_sigma": float(s), "student_nu": float(n)} for s, n in grid.get("sigma_nu", [])]
    distinct: list[dict[str, float]] = []
    for row in rows:
        if row not in distinct:
            distinct.append(row)
    return distinct


def ablation_keys(preset: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """Stage-2 keys of one ablation point: its factor values, the ablation's batch and iterations."""
    grid = _section(preset, "ablation")
    keys = section_keys(preset, "stage2")
    keys.update({k: float(v) for k, v in point.items()})
    keys.update({k: grid[k] for k in ("batch", "iterations") if k in grid})
    return keys


def resolve_config(config_path: str | Path | None, mode: str, preset: str | None = None,
                   overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of ``mode``: a presets YAML (or flat YAML), then ``key=value`` overrides, validated."""
    keys: dict[str, Any] = {}
    if config_path:
        raw = read_yaml(config_path) or {}
        if not isinstance(raw, dict):
            raise ConfigError("the config is not a mapping at the top level", str(config_path), "fix the YAML")
        keys = section_keys(preset_block(raw, preset, str(config_path)), mode) if "presets" in raw else dict(raw)
    if isinstance(overrides, dict):
        keys.update(overrides)
    elif overrides:
        keys.update(parse_overrides(overrides))
    return build_config(keys, mode)


# ---------------------------------------------------------------------------------------------------------- checks


def normalise_cli_values(value: Any) -> Any:
    """Strings that YAML reads as numbers, booleans or null become those (nested ``--config`` values arrive as
    strings: ``--config 'presets={ci: {stage2: {rho: 0.5}}}'`` gives ``'0.5'``)."""
    if isinstance(value, dict):
        return {k: normalise_cli_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_cli_values(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, (bool, int, float)) or parsed is None and value.strip().lower() in ("null", "~"):
            return parsed
    return value


def planned_modes(preset: dict[str, Any]) -> list[str]:
    """The training modes the preset's DAG runs (stage3 only with a third stage in the ablation)."""
    modes = ["pretrain"] if preset.get("init", {}).get("kind") == "pretrain" else []
    if preset.get("init", {}).get("provides") != "stage1":
        modes.append("stage1")
    modes += ["stage1_continued", "stage2"]
    if 3 in _section(preset, "ablation").get("stages", []):
        modes.append("stage3")
    return modes


def _train_resources(preset: dict[str, Any]) -> dict[str, Any]:
    return (preset.get("resources") or {}).get("train") or {}


def train_nodes(preset: dict[str, Any], override: str | None = None) -> int:
    """Nodes of each training job: ``override`` (the workflow passes TCM_SLURM_TRAIN_NODES) or the preset's."""
    if override:
        if not override.strip().isdigit() or int(override) < 1:
            raise ConfigError(f"the node count must be a whole number >= 1, got {override!r}",
                              "TCM_SLURM_TRAIN_NODES", "set it to the nodes of each training job, or unset it")
        return int(override)
    return int(_train_resources(preset).get("nodes", 1) or 1)


def processes_per_node(gpus: int, nodes: int) -> int:
    """Training processes per node of a job holding ``gpus`` GPUs on ``nodes`` nodes: one per GPU, one on CPUs."""
    if gpus % nodes:
        raise ConfigError(f"{gpus} GPUs do not split evenly over {nodes} nodes",
                          "resources.train.gpu x nodes (or TCM_SLURM_TRAIN_GPUS / TCM_SLURM_TRAIN_NODES)",
                          "give every node the same number of GPUs")
    return max(gpus // nodes, 1)


def world_size_of(preset: dict[str, Any]) -> int:
    """Training processes of the preset's jobs: ``resources.train.gpu`` (per node, at least 1) x ``nodes``."""
    return max(int(_train_resources(preset).get("gpu", 0) or 0), 1) * train_nodes(preset)


def checked_config(preset: dict[str, Any], mode: str, keys: dict[str, Any], where: str) -> TrainConfig:
    """build_config + validate_config at the preset's world size, errors naming ``where``."""
    try:
        cfg = build_config(keys, mode)
        validate_config(cfg, mode, world_size_of(preset))
    except ConfigError as error:
        raise ConfigError(error.what, f"{where}: {error.where}", error.todo) from None
    if preset.get("device") == "cpu" and cfg.precision != "fp32":
        raise ConfigError(f"precision {cfg.precision} needs CUDA but the preset's device is cpu",
                          f"{where}.precision", "use fp32, or device auto/cuda on a GPU machine")
    return cfg


def check_architecture(arch: dict[str, Any], where: str) -> None:
    """Build the architecture on the meta device (no memory) and refuse absurd sizes before any job runs."""
    import torch

    from tcm_core.networks import arch_preset, build_precond, count_parameters

    spec = dict(arch)
    spec.setdefault("img_resolution", 16)
    spec.setdefault("img_channels", 1)
    try:
        full = arch_preset(spec.pop("preset"), **spec) if "preset" in spec else spec
        with torch.device("meta"):
            count = count_parameters(build_precond(full))
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"cannot build the architecture ({error})", where, "fix the arch keys") from None
    if count > MAX_PARAMETERS:
        raise ConfigError(f"the architecture has {count:,} parameters (more than {MAX_PARAMETERS:,})", where,
                          "check model_channels / num_blocks / channel_mult")


def check_times(preset: dict[str, Any], stage2: TrainConfig, where: str) -> None:
    evaluation = _section(preset, "eval")
    mid_t = evaluation.get("mid_t")
    if mid_t is not None and not stage2.t_min < mid_t < stage2.t_max:
        raise ConfigError(f"mid_t {mid_t} is outside (t_min, t_max) = ({stage2.t_min}, {stage2.t_max})",
                          f"{where}.eval.mid_t", "choose a time inside the range")
    for key in ("dfid_ts", "dfid_ts_wide"):
        outside = [t for t in evaluation.get(key, []) if not stage2.t_min <= t <= stage2.t_max]
        if outside:
            raise ConfigError(f"dFID times {outside} are outside [t_min, t_max] = [{stage2.t_min}, {stage2.t_max}]",
                              f"{where}.eval.{key}", "choose times inside the range")


def check_sources(preset: dict[str, Any], where: str) -> None:
    init, data = preset.get("init") or {}, preset.get("dataset") or {}
    if init.get("kind") == "pretrain" and not ("pretrain" in preset and "arch" in preset):
        raise ConfigError("init kind pretrain needs `arch` and `pretrain` sections", f"{where}.init", "add them")
    if init.get("kind") == "checkpoint" and bool(init.get("name")) == bool(init.get("url")):
        raise ConfigError("init kind checkpoint needs exactly one of name, url", f"{where}.init", "set one")
    if init.get("kind") == "path" and not init.get("path"):
        raise ConfigError("init kind path needs the checkpoint file (e.g. ECM-XL for imagenet64_xl)",
                          f"{where}.init.path", "set it in config.yaml or a --configfile")
    if not data.get("path") and data.get("name") is None:
        raise ConfigError("no data set", f"{where}.dataset.path",
                          "set an EDM-layout dataset (.zip or folder) or dataset.name (mnist5k | cifar10)")
    if data.get("name") == "cifar10" and not data.get("path") and not data.get("source"):
        raise ConfigError("cifar10 needs its source archive", f"{where}.dataset.source", "give a URL or path")


def check_nodes(preset: dict[str, Any], where: str) -> None:
    """Only training jobs span several nodes (torchrun per node); evaluation and preparation run on one."""
    for kind, res in (preset.get("resources") or {}).items():
        if kind != "train" and int((res or {}).get("nodes", 1)) != 1:
            raise ConfigError(f"{kind} jobs run on one node", f"{where}.resources.{kind}.nodes",
                              "remove the key (only resources.train.nodes may exceed 1)")


def check_preset(config: dict[str, Any], name: str) -> dict[str, TrainConfig]:
    """Everything a job would refuse, refused now; returns the TrainConfig of each planned mode."""
    if name not in (config.get("presets") or {}):
        raise ConfigError(f"unknown preset {name!r}", "preset", f"use one of {', '.join(config.get('presets', {}))}")
    preset, where = config["presets"][name], f"presets.{name}"
    check_sources(preset, where)
    check_nodes(preset, where)
    configs = {mode: checked_config(preset, mode, section_keys(preset, mode), f"{where}.{mode}")
               for mode in planned_modes(preset)}
    for index, point in enumerate(ablation_points(preset)):
        checked_config(preset, "stage2", ablation_keys(preset, point), f"{where}.ablation (point {index}: {point})")
    if "stage3" in configs and not configs["stage3"].t_prime > configs["stage2"].t_prime:
        raise ConfigError("the third stage must start above Stage 2's t'", f"{where}.stage3.t_prime",
                          f"use a t_prime > {configs['stage2'].t_prime}")
    check_times(preset, configs["stage2"], where)
    if preset.get("arch"):
        check_architecture(preset["arch"], f"{where}.arch")
    return configs

