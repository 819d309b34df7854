"""The presets of config.yaml: each job's resolved TrainConfig keys, the ablation grid, and every check the JSON
schema cannot express. One source of truth: the workflow imports it (before any job runs) and so does ``train``.

Resolution of a mode's keys from ``presets[P]`` (see docs/ARCHITECTURE.md "config.yaml layout"):

* ``stage1_continued`` (the control) takes the ``stage1`` keys with the ``iterations`` of ``stage2``: it is Stage 1
  going on for as long as Stage 2 runs;
* ``stage3`` merges ``stage3`` over ``stage2``; ``pretrain`` also takes the preset's ``arch``;
* ``intermediate`` (paper App. B) takes the ``stage1`` keys, the ``intermediate`` block's and ``stage2``'s ``t_prime``
  (Stage 1 going on with its times on [t_min, t')); its Stage-2 variants: :func:`intermediate_stage2_keys`;
* every mode but pretrain takes the preset's ``eval`` block for its periodic evaluation (``every, points`` ->
  ``eval_every, eval_points``; ``periodic_num`` (else ``num``) -> ``eval_num``; ``periodic_mid_t`` (else ``mid_t``;
  null: no 2-step FID) -> ``eval_mid_t``; ``periodic_dfid_ts`` (else ``dfid_ts``) -> ``eval_dfid_ts``) unless its
  section sets those keys itself;
* an ablation point overrides ``stage2`` with its factor values and the ablation's ``batch`` and ``iterations``;
  its periodic evaluation measures the 1-step FID only, and only on the (sigma, nu) grid that Fig. 4b draws as
  curves (:func:`curve_points`); every other cell is compared by its final evaluations;
* training seed j of a run (``training_seeds``) is the run's keys with ``seed`` + j (:func:`seeded_keys`).

* the distillation arm (``distill`` block, paper App. A / Table 5) runs Stage 1, the control and Stage 2 with the
  keys above and the ``distill`` block's keys on top (``method: cd``, ``ode_solver``, ``guidance``), distilling
  the preset's ``teacher`` (``{kind: pretrain}`` the preset's own pretrained model, ``{kind: init}`` the Stage-1
  init file, ``{kind: checkpoint, name | url, sha256}`` fetched like the init, ``{kind: path, path}``).

Training seeds: ``training_seeds: {all: K0, paper_tables: K, study: KS}`` gives the claim-bearing arms (the
control and the main Stage 2, both from the one Stage-1 run, :func:`seeded_ablation_points`, and the distillation
arm's control and Stage 2 (:data:`DISTILL_SEEDED_MODES`), both from the one CD Stage-1 run) K independent training
seeds for the target ``paper_tables`` (K0 for ``all`` and ``all_distillation``, KS for ``study``). Seed j > 0 of run
folder R is ``R/seed~j``; seed 0 is R itself (the run of ``all``).

A flat YAML (no ``presets``) is taken as the TrainConfig keys directly.

CLI: ``python -m tcm_core check-config FILE [FILE ...] [--preset P]`` merges the files as Snakemake merges
``configfile:`` and ``--configfile`` (later files override earlier ones, key by key), then reports every YAML
syntax error (file and line), every schema violation and the preset check's refusal, one line each.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from tcm_core.errors import ConfigError, MissingFileError
from tcm_core.releases import check_releases
from tcm_core.training.config import MODES, TrainConfig, build_config, parse_overrides, validate_config

# eval-block key(s) -> TrainConfig key of the periodic evaluation (the first key present wins)
EVAL_BLOCK_KEYS = {"eval_every": ("every",), "eval_points": ("points",), "eval_num": ("periodic_num", "num"),
                   "eval_mid_t": ("periodic_mid_t", "mid_t"), "eval_dfid_ts": ("periodic_dfid_ts", "dfid_ts")}
SEED_FOLDER = "seed~"  # training seed j > 0 of run folder R lives in R/seed~j
EXPLODING_W_B = 0.01  # claim S3 (paper Sec. 4.4): the boundary-loss weight at which the FID explodes
ABLATION_FACTORS = ("t_prime", "rho", "w_b", "student_sigma", "student_nu")  # the Stage-2 keys the grids vary
DISTILL_MODES = ("stage1", "stage1_continued", "stage2")  # the distillation arm's training jobs
DISTILL_SEEDED_MODES = ("stage1_continued", "stage2")  # claim S5's arms: seeded, both from the one CD Stage 1
ARMS = ("main", "distill")
NO_CURVES = {"eval_every": 0, "eval_points": 0}  # keys of a run compared by its final evaluations only
# The intermediate arm (App. B, claim S6; seeded): the fine-tuned boundary f_θ0' and 2 Stage-2 runs with it as boundary
INTERMEDIATE_VARIANTS = ("init_stage1", "init_finetune")  # the arm's Stage-2 runs, by the network they start from
INTERMEDIATE_RUNS = {"finetune": "intermediate/finetune",
                     **{variant: f"intermediate/stage2_{variant}" for variant in INTERMEDIATE_VARIANTS}}
MAX_PARAMETERS = 4_000_000_000  # refuse architectures beyond this (EDM2-XL has 1.12e9): a typo, not a model
MAX_TENSORS = 4_000  # ... or with more tensors than this (DDPM++ has 424, EDM2-XL 200)
MAX_YAML_NODES = 1_000_000  # a config file that expands to more (nested aliases) is refused before it is read
SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"  # in the repository


# ---------------------------------------------------------------------------------------------------------- files


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a missing file, a syntax error or a key given twice in one mapping is one clear
    error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("config file not found", str(path), "check the path")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"not UTF-8 text (byte {error.start})", str(path), "save it as UTF-8 YAML") from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"the YAML expands to more than {MAX_YAML_NODES:,} nodes (aliases of aliases)",
                              str(path), "write the values out; a config needs no nested aliases")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path} line {mark.line + 1} column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error ({problem})", where, "fix the file") from None
    finally:
        loader.dispose()


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes the document has once every alias is expanded (a "billion laughs" file is tiny but
    expands to 10^9: anything that walks it, such as the schema validator, would never finish)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a recursive alias counts once
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        memo[id(node)] = 1 + sum(_expanded_nodes(child, memo) for child in children)
    return memo[id(node)]


def preset_block(raw: dict[str, Any], name: str | None, where: str) -> dict[str, Any]:
    presets = raw.get("presets") or {}
    name = name or raw.get("preset")
    if name is None or name not in presets:
        raise ConfigError(f"unknown preset {name!r}", f"{where} presets", f"use one of {', '.join(map(str, presets))}")
    return presets[name] or {}


# ---------------------------------------------------------------------------------------------------------- keys


def _section(preset: dict[str, Any], key: str) -> dict[str, Any]:
    value = preset.get(key)
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ConfigError("a section is not a mapping", f"presets.<preset>.{key}", "make it a mapping")
    return dict(value)


def section_keys(preset: dict[str, Any], mode: str, arm: str = "main") -> dict[str, Any]:
    """The TrainConfig keys of ``mode`` in a preset block (before command-line overrides); ``arm`` "distill"
    adds the ``distill`` block's keys on top."""
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}", "arm", f"use one of {', '.join(ARMS)}")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}", "--mode", f"use one of {', '.join(MODES)}")
    if mode == "stage1_continued":
        keys = _section(preset, "stage1")
        if "iterations" in _section(preset, "stage2"):
            keys["iterations"] = _section(preset, "stage2")["iterations"]
    elif mode == "stage3":
        keys = {**_section(preset, "stage2"), **_section(preset, "stage3")}
    elif mode == "intermediate":  # below the t' of the Stage 2 it is the boundary of; compared by its final dFID_t'
        t_prime = {k: v for k, v in _section(preset, "stage2").items() if k == "t_prime"}
        keys = {**_section(preset, "stage1"), **_section(preset, "intermediate"), **t_prime, **NO_CURVES}
    else:
        keys = _section(preset, mode)
    if mode == "pretrain" and "arch" not in keys and preset.get("arch") is not None:
        keys["arch"] = _section(preset, "arch")
    evaluation = _section(preset, "eval") if mode != "pretrain" else {}  # pretraining evaluates nothing
    for cfg_key, eval_keys in EVAL_BLOCK_KEYS.items():
        present = [k for k in eval_keys if k in evaluation]
        if cfg_key not in keys and present:
            keys[cfg_key] = evaluation[present[0]]
    if arm == "distill":
        keys.update(_section(preset, "distill"))
    return keys


def has_distillation(preset: dict[str, Any]) -> bool:
    """Whether the preset plans the distillation arm (it has a ``distill`` block)."""
    return bool(preset.get("distill"))


def has_intermediate(preset: dict[str, Any]) -> bool:
    """Whether the preset plans the intermediate-stage arm (it has an ``intermediate`` block)."""
    return bool(preset.get("intermediate"))


def intermediate_stage2_keys(preset: dict[str, Any], where: str = "presets.<preset>") -> dict[str, Any]:
    """Both intermediate-arm Stage-2 variants: the keys of the default Stage 2 they are compared with, the ablation
    grid's centre (M iterations), at equal total iterations: the fine-tuning's K plus the variant's M - K, less its
    periodic evaluation (they are compared by final FIDs). Boundary and init are the rule's input files."""
    points = ablation_points(preset)
    if not points:
        raise ConfigError("the intermediate arm is compared with the ablation grid's centre, but there is no grid",
                          f"{where}.ablation", "add t_prime, rho, w_b or sigma_nu values, or drop intermediate")
    keys = {**ablation_keys(preset, points[0]), **NO_CURVES}
    total = int(keys.get("iterations", TrainConfig().iterations))
    finetune = int(_section(preset, "intermediate").get("iterations", 0))
    if finetune >= total:
        raise ConfigError(f"the intermediate stage's {finetune} iterations leave none of the compared Stage 2's "
                          f"{total} (equal total iterations)", f"{where}.intermediate.iterations",
                          f"use fewer than {total}")
    keys["iterations"] = total - finetune
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


def curve_points(preset: dict[str, Any]) -> list[dict[str, float]]:
    """The ablation points drawn as FID-vs-iteration curves (Fig. 4b: the (sigma, nu) grid, the baseline
    among them); the other cells are compared by their final FIDs only (Table 3, Fig. 4c, claims S3, S4)."""
    grid = _section(preset, "ablation")
    points = ablation_points(preset)
    if not points:
        return []
    curves = [{**points[0], "student_sigma": float(s), "student_nu": float(n)} for s, n in grid.get("sigma_nu", [])]
    return [p for p in points if p in curves]


def ablation_keys(preset: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """Stage-2 keys of one ablation point: its factor values, the ablation's batch and iterations. Its periodic
    evaluation is the 1-step FID only, and only on a point a figure draws as a curve (:func:`curve_points`)."""
    grid = _section(preset, "ablation")
    keys = section_keys(preset, "stage2")
    keys.update({k: float(v) for k, v in point.items()})
    keys.update({k: grid[k] for k in ("batch", "iterations") if k in grid})
    keys.update(eval_mid_t=None, eval_dfid_ts=[])
    if {k: float(v) for k, v in point.items()} not in curve_points(preset):
        keys.update(NO_CURVES)
    return keys


# ---------------------------------------------------------------------------------------------------------- seeds


def training_seeds(preset: dict[str, Any], target: str) -> int:
    """K: the training seeds of the claim-bearing arms for ``target`` (all | paper_tables | study); 1 when unset."""
    return int((preset.get("training_seeds") or {}).get(target, 1))


def split_seed(run: str) -> tuple[str, int]:
    """``"stage2/main/seed~2"`` -> ``("stage2/main", 2)``; a run without the suffix is seed 0."""
    head, _, last = run.rpartition("/")
    if head and last.startswith(SEED_FOLDER) and last[len(SEED_FOLDER):].isdigit():
        return head, int(last[len(SEED_FOLDER):])
    return run, 0


def seed_run(run: str, index: int) -> str:
    """The run folder of training seed ``index`` of ``run`` (seed 0: ``run`` itself)."""
    return run if index == 0 else f"{run}/{SEED_FOLDER}{index}"


def seeded_keys(keys: dict[str, Any], index: int, curves: bool = True) -> dict[str, Any]:
    """The keys of training seed ``index``: ``seed`` + index (seed 0 is the preset's run unchanged). With
    ``curves`` off the extra seed evaluates nothing mid-run: the distillation arm's seeds are compared by their
    final FIDs (claim S5, Table 5), no figure draws their curves, and seed 0's curves stay in MLflow."""
    if index == 0:
        return keys
    out = {**keys, "seed": int(keys.get("seed", TrainConfig.seed)) + index}
    if not curves:
        out.update(NO_CURVES)
    return out


def seeded_ablation_points(preset: dict[str, Any]) -> list[dict[str, float]]:
    """The ablation points the claims read: the grid centre, every t' of the t' grid (S4) and w_b =
    EXPLODING_W_B at the centre's rho (S3)."""
    points = ablation_points(preset)
    if not points:
        return []
    centre = points[0]

    def others_at_centre(point: dict[str, float], factor: str) -> bool:
        return all(point[k] == centre[k] for k in ABLATION_FACTORS if k != factor)

    return [p for p in points if p == centre or others_at_centre(p, "t_prime")
            or (others_at_centre(p, "w_b") and p["w_b"] == EXPLODING_W_B)]


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
    cfg = build_config(keys, mode)
    if mode == "pretrain" and cfg.arch:
        check_architecture(cfg.arch, "config key 'arch'")  # before the job allocates it
    return cfg


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
    modes += ["stage1_continued", "stage2"] + (["intermediate"] if has_intermediate(preset) else [])
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

    from tcm_core.networks import OverBudget, arch_preset, build_precond, count_parameters, registration_budget

    spec = dict(arch)
    spec.setdefault("img_resolution", 16)
    spec.setdefault("img_channels", 1)
    todo = "check model_channels / num_blocks / channel_mult"
    try:
        full = arch_preset(spec.pop("preset"), **spec) if "preset" in spec else spec
        with registration_budget(MAX_TENSORS, 2 * MAX_PARAMETERS), torch.device("meta"):
            count = count_parameters(build_precond(full))
    except OverBudget as error:
        raise ConfigError(f"the architecture has {error} (the limit: {MAX_PARAMETERS:,} parameters)", where,
                          todo) from None
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError, RuntimeError) as error:
        raise ConfigError(f"cannot build the architecture ({error})", where, "fix the arch keys") from None
    if count > MAX_PARAMETERS:
        raise ConfigError(f"the architecture has {count:,} parameters (more than {MAX_PARAMETERS:,})", where, todo)


def check_times(preset: dict[str, Any], stage2: TrainConfig, where: str) -> None:
    evaluation = _section(preset, "eval")
    for key in ("mid_t", "periodic_mid_t"):
        mid_t = evaluation.get(key)
        if mid_t is not None and not stage2.t_min < mid_t < stage2.t_max:
            raise ConfigError(f"{key} {mid_t} is outside (t_min, t_max) = ({stage2.t_min}, {stage2.t_max})",
                              f"{where}.eval.{key}", "choose a time inside the range")
    outside = [t for t in evaluation.get("mid_t_sweep", []) if not stage2.t_min < t < stage2.t_max]
    if outside:
        raise ConfigError(f"middle times {outside} are outside (t_min, t_max) = ({stage2.t_min}, {stage2.t_max})",
                          f"{where}.eval.mid_t_sweep", "choose times inside the range")
    for key in ("dfid_ts", "dfid_ts_wide", "periodic_dfid_ts"):
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


def check_teacher(preset: dict[str, Any], where: str) -> None:
    """The ``teacher`` block names one diffusion model the workflow can provide."""
    teacher = preset.get("teacher") or {}
    kind = teacher.get("kind")
    if kind == "pretrain" and (preset.get("init") or {}).get("kind") != "pretrain":
        raise ConfigError("teacher kind pretrain needs the preset to pretrain (init kind pretrain)",
                          f"{where}.teacher.kind", "use kind init, checkpoint or path")
    if kind == "init" and (preset.get("init") or {}).get("provides") == "stage1":
        raise ConfigError("the init is a Stage-1 consistency model, not a diffusion teacher", f"{where}.teacher.kind",
                          "name a diffusion checkpoint (kind checkpoint or path)")
    if kind == "checkpoint" and bool(teacher.get("name")) == bool(teacher.get("url")):
        raise ConfigError("teacher kind checkpoint needs exactly one of name, url", f"{where}.teacher", "set one")
    if kind == "path" and not teacher.get("path"):
        raise ConfigError("teacher kind path needs the checkpoint file", f"{where}.teacher.path", "set it")


def check_guided_teacher(preset: dict[str, Any], cfg: TrainConfig, where: str) -> None:
    """Guidance with our own pretrained teacher: it must be class-conditional and learn ∅ (label dropout)."""
    if cfg.guidance is None or (preset.get("teacher") or {}).get("kind") != "pretrain":
        return
    pretrain = checked_config(preset, "pretrain", section_keys(preset, "pretrain"), f"{where}.pretrain")
    if not int((preset.get("arch") or {}).get("label_dim", 0)) > 0 or not pretrain.label_dropout > 0:
        raise ConfigError(f"guidance {cfg.guidance} needs a class-conditional teacher pretrained with label dropout",
                          f"{where}.arch.label_dim / {where}.pretrain.label_dropout",
                          "set arch.label_dim (the data's classes) and pretrain.label_dropout > 0, or guidance null")


def check_distillation(preset: dict[str, Any], configs: dict[str, TrainConfig], where: str) -> dict[str, TrainConfig]:
    """The distillation arm's configs (and every CD job's teacher); returns them as ``distill/<mode>``."""
    distilling = [mode for mode, cfg in configs.items() if cfg.method == "cd"]
    arm: dict[str, TrainConfig] = {}
    if has_distillation(preset):
        if (preset.get("init") or {}).get("provides") == "stage1":
            raise ConfigError("the distillation arm trains its own Stage 1 from the init, but this init is a "
                              "Stage-1 model", f"{where}.distill", "drop the distill block")
        if _section(preset, "distill").get("method") != "cd":
            raise ConfigError("the distillation arm distils", f"{where}.distill.method", "set method: cd")
        arm = {f"distill/{mode}": checked_config(preset, mode, section_keys(preset, mode, "distill"),
                                                 f"{where}.distill ({mode})") for mode in DISTILL_MODES}
        distilling += list(arm)
    if distilling and not preset.get("teacher"):
        raise ConfigError(f"method cd ({', '.join(distilling)}) needs a teacher diffusion model", f"{where}.teacher",
                          "add e.g. teacher: {kind: pretrain} or {kind: checkpoint, name: edm-cifar10-uncond-vp}")
    if distilling:  # a teacher no job distils is never built (nor fetched)
        check_teacher(preset, where)
    for cfg in {**configs, **arm}.values():
        check_guided_teacher(preset, cfg, where)
    return arm


def check_nodes(preset: dict[str, Any], where: str) -> None:
    """Only training jobs span several nodes (torchrun per node); evaluation and preparation run on one."""
    for kind, res in (preset.get("resources") or {}).items():
        if kind != "train" and int((res or {}).get("nodes", 1)) != 1:
            raise ConfigError(f"{kind} jobs run on one node", f"{where}.resources.{kind}.nodes",
                              "remove the key (only resources.train.nodes may exceed 1)")


def check_preset(config: dict[str, Any], name: str, schema_path: str | Path | None = SCHEMA,
                 architecture: bool = True) -> dict[str, TrainConfig]:
    """Everything a job would refuse, refused now; returns the TrainConfig of each planned mode (and of the
    distillation arm's jobs, as ``distill/<mode>``). The JSON schema comes first (``schema_path``; None: already
    checked), so the checks below see the types it declares. ``architecture`` False skips building the network on
    the meta device (the one check that loads torch): for a cluster job's Snakemake, which re-reads the config its
    submitting Snakemake checked whole."""
    if schema_path is not None and Path(schema_path).is_file():
        problems = schema_problems(config, schema_path)
        if problems:
            raise problems[0]
    if name not in (config.get("presets") or {}):
        raise ConfigError(f"unknown preset {name!r}", "preset", f"use one of {', '.join(config.get('presets', {}))}")
    preset, where = config["presets"][name], f"presets.{name}"
    check_sources(preset, where)
    check_nodes(preset, where)
    configs = {mode: checked_config(preset, mode, section_keys(preset, mode), f"{where}.{mode}")
               for mode in planned_modes(preset)}
    for index, point in enumerate(ablation_points(preset)):
        checked_config(preset, "stage2", ablation_keys(preset, point), f"{where}.ablation (point {index}: {point})")
    if has_intermediate(preset):
        intermediate_stage2_keys(preset, where)  # the comparator exists (its keys were checked as ablation point 0)
    if "stage3" in configs and not configs["stage3"].t_prime > configs["stage2"].t_prime:
        raise ConfigError("the third stage must start above Stage 2's t'", f"{where}.stage3.t_prime",
                          f"use a t_prime > {configs['stage2'].t_prime}")
    check_times(preset, configs["stage2"], where)
    check_releases(preset, where)
    if architecture and preset.get("arch"):
        check_architecture(preset["arch"], f"{where}.arch")
    return {**configs, **check_distillation(preset, configs, where)}


# ---------------------------------------------------------------------------------------------------- check-config


def merge_config(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base``, mappings merged key by key (Snakemake's ``update_config``); a new dict."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _schema_validator(schema_path: Path) -> Any:
    """A Draft 2020-12 validator of the config schema that also fills its defaults (as Snakemake's does)."""
    import jsonschema

    base = jsonschema.Draft202012Validator

    def properties_with_defaults(validator: Any, properties: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    filling = jsonschema.validators.extend(base, {"properties": properties_with_defaults})
    return filling(yaml.safe_load(schema_path.read_text()))


def schema_problems(config: dict[str, Any], schema_path: str | Path = SCHEMA) -> list[ConfigError]:
    """Every violation of the JSON schema, the best match first, naming the key; fills the schema's defaults."""
    import jsonschema

    errors = list(_schema_validator(Path(schema_path)).iter_errors(config))
    best = jsonschema.exceptions.best_match(errors)
    ordered = ([best] if best is not None else []) + [e for e in errors if e is not best]
    out = []
    for error in ordered:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        hint = error.schema.get("description") if isinstance(error.schema, dict) and error.absolute_path else None
        out.append(ConfigError(f"invalid config: {error.message}", where, hint))
    return out


def check_config_files(paths: list[str | Path], preset: str | None = None,
                       schema_path: str | Path | None = SCHEMA) -> list[ConfigError | MissingFileError]:
    """The problems of the merged config files for ``preset`` (default: the merged ``preset`` key)."""
    problems: list[ConfigError | MissingFileError] = []
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            raw = read_yaml(path)
        except (ConfigError, MissingFileError) as error:
            problems.append(error)
            continue
        if raw is not None and not isinstance(raw, dict):
            problems.append(ConfigError("the config is not a mapping at the top level", str(path), "fix the YAML"))
            continue
        merged = merge_config(merged, raw or {})
    if problems:
        return problems  # the merged config is not what the workflow would see
    if preset is not None:
        merged["preset"] = preset
    if schema_path is not None and Path(schema_path).is_file():
        found = schema_problems(merged, schema_path)
        if found:
            return found
    try:
        check_preset(merged, str(merged.get("preset")), schema_path=None)  # the schema ran above
    except ConfigError as error:
        problems.append(error)
    return problems


def add_check_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="config.yaml, then the --configfile overlays, in order")
    parser.add_argument("--preset", default=None, help="the preset to check (default: the merged `preset` key)")
    parser.add_argument("--schema", type=Path, default=SCHEMA, help="the JSON schema (default: the repository's)")


def run_check_config(args: argparse.Namespace) -> int:
    problems = check_config_files(args.files, args.preset, args.schema)
    for problem in problems:
        print(problem.line(), file=sys.stderr)
    if problems:
        return problems[0].exit_code
    print(f"check-config: {', '.join(map(str, args.files))}: no problems")
    return 0
