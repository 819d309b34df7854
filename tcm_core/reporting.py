"""Paper tables, figures and the claims check: ``python -m tcm_core tables``.

Numbers come from two places and are cross-checked:

* the declared result files under ``results/<preset>/`` (the source of truth, and the inputs of the Snakemake
  rule, so the rule reruns when they change): every training run folder (``metrics.jsonl`` + ``config.json``)
  and every evaluation JSON (``evaluate fid`` / ``evaluate dfid``);
* the MLflow store (``mlflow.search_runs`` filtered by the ``tcm.*`` tags, and
  ``MlflowClient.get_metric_history``), which fills in runs whose files are absent and is compared with the files
  value by value (``tables/crosscheck.csv``).

A cell with no measurement is written as "—", never estimated. Paper numbers come only from
``paper_values.csv`` (transcribed once, with the table or figure each number is printed in).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcm_core.atomic import write_bytes_atomic

MISSING = "—"
PAPER_METRIC = "FID (Inception, 50k; paper)"
TRAIN_STAGES = ("pretrain", "stage1", "stage1_continued", "stage2", "stage3")
SWEPT_PARAMS = ("t_prime", "rho", "w_b", "sigma", "nu")
# The paper's Stage-2 setting (Sec. 4.1 and 4.4); used only to break ties when guessing the ablation baseline.
PAPER_DEFAULTS = {"t_prime": 1.0, "rho": 0.25, "w_b": 0.1, "sigma": 0.2, "nu": 0.01}
# Names other code may use for the same hyperparameter (the first is ours).
PARAM_ALIASES = {
    "t_prime": ("t_prime", "transition_t", "tprime"),
    "rho": ("rho", "boundary_prob"),
    "w_b": ("w_b", "wb", "boundary_weight"),
    "sigma": ("sigma", "t_sigma", "tdist_sigma", "student_sigma"),
    "nu": ("nu", "df", "t_nu", "student_nu"),
    "mu": ("mu", "t_mu", "tdist_mu", "student_mu"),
    "t_max": ("t_max", "sigma_max", "t_upper"),
}
# The metrics the report reads (their MLflow histories are fetched; dfid_t* as well).
REPORTED_METRICS = ("fid_1step", "fid_2step", "grad_norm", "loss")
EXPLODE_FACTOR = 2.0  # claim S3: "explodes" = final 1-step FID > EXPLODE_FACTOR x the baseline's, or non-finite
GRAD_SPIKE = 100.0  # Fig. 7: gradient norms above this are circled, as in the paper

TABLES = {
    "table1_cifar10": "Table 1: CIFAR-10, FID / NFE / # params",
    "table2_imagenet64": "Table 2: ImageNet 64x64, FID / NFE / # params",
    "table3_tprime": "Table 3: FID vs the dividing time t'",
    "table4_stages": "Table 4: FID for training stages 1, 2, 3",
    "claims": "Claims check",
}
FIGURES = {
    "fig1b_fid_stages": "Fig. 1b: 1-step FID vs iteration, Stage 1 continued vs Stage 2",
    "fig2_dfid_stage1": "Fig. 2: dFID_t during Stage 1",
    "fig3_dfid_stage2": "Fig. 3: dFID_t, Stage 1 continued vs Stage 2",
    "fig4a_time_density": "Fig. 4a: densities of the Stage-2 time distribution",
    "fig4b_fid_sigma_nu": "Fig. 4b: FID vs iteration for the (sigma, nu) grid",
    "fig4c_fid_rho_wb": "Fig. 4c: FID over the rho x w_b grid",
    "fig7_grad_norm": "Fig. 7: gradient norm, Stages 1 and 2",
    "fig8_dfid_vs_t": "Fig. 8: dFID_t vs t at several Stage-1 iterations",
}
FIG_SIZE_IN = (8.0, 5.0)
FIG_DPI = 100  # -> every figure is 800 x 500 pixels


def output_files(out_dir: str | Path) -> dict[str, list[str]]:
    """The files ``tables`` writes under ``out_dir`` (the Snakemake rule declares exactly these)."""
    out = Path(out_dir)
    tables = [str(out / "tables" / f"{name}.{ext}") for name in TABLES for ext in ("md", "csv")]
    tables.append(str(out / "tables" / "crosscheck.csv"))
    figures = [str(out / "figures" / f"{name}.png") for name in FIGURES]
    return {"tables": tables, "figures": figures}


# ----------------------------------------------------------------------------------------------------------------
# Data model


@dataclass
class TrainingRun:
    key: str  # tcm.run_key when known, else the run folder relative to the results folder
    stage: str
    grid: str
    params: dict[str, Any] = field(default_factory=dict)
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    run_dir: Path | None = None
    mlflow_run_id: str | None = None
    n_params: int | None = None
    aliases: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)

    def param(self, name: str) -> float | None:
        for alias in PARAM_ALIASES.get(name, (name,)):
            value = _as_float(self.params.get(alias))
            if value is not None:
                return value
        return None

    def names(self) -> set[str]:
        return {self.key, *self.aliases}


@dataclass
class Evaluation:
    metric: str  # fid_1step | fid_2step | dfid
    label: str
    value: float | None = None  # FID: the min over seeds
    values: dict[float, float] = field(default_factory=dict)  # dFID by t
    iteration: int | None = None
    seeds: int | None = None
    target: str | None = None  # the key of the training run evaluated
    path: Path | None = None
    source: str = "files"
    setup: tuple = ()  # (extractor, num, seeds): two FIDs compare only when their setups agree


@dataclass
class Measured:
    value: float
    label: str
    run: str
    iteration: int | None
    source: str
    setup: tuple = ()


@dataclass
class Results:
    preset: str
    runs: list[TrainingRun]
    evaluations: list[Evaluation]
    crosscheck: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def runs_of(self, stage: str, grid: str | None = None) -> list[TrainingRun]:
        return [r for r in self.runs if r.stage == stage and (grid is None or r.grid == grid)]

    def main_run(self, stage: str) -> TrainingRun | None:
        """The main-grid run of a stage (falling back to any grid when the main grid has none)."""
        runs = self.runs_of(stage, "main") or self.runs_of(stage)
        return runs[0] if runs else None

    def evaluations_of(self, run: TrainingRun, metric: str) -> list[Evaluation]:
        names = run.names()
        return [e for e in self.evaluations if e.metric == metric and e.target in names]


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.{digits}f}"


def _fmt_diff(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return MISSING
    return f"{ours - paper:+.2f}" if math.isfinite(ours) else MISSING


def _fmt_g(value: float | None) -> str:
    return MISSING if value is None else f"{value:g}"


def _dfid_t(key: str) -> float | None:
    return _as_float(key[len("dfid_t") :]) if key.startswith("dfid_t") else None


def _write_atomic(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _history_from_records(records: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    histories: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        step = record.get("step")
        if step is None:
            continue
        for key, value in record.items():
            if key == "step":
                continue
            number = _as_float(value)
            # metrics.jsonl writes non-finite values as null: keep them as NaN (an exploded FID is a result)
            histories.setdefault(key, []).append((int(step), math.nan if number is None else number))
    for points in histories.values():
        points.sort(key=lambda p: p[0])
    return histories


def full_label(label: str, seeds: int | None) -> str:
    """The evaluation's label, with "min of N" added when the value is the minimum over N seeds."""
    if seeds and seeds > 1 and "min" not in label:
        return label[:-1] + f", min of {seeds})" if label.endswith(")") else f"{label}, min of {seeds}"
    return label


# ----------------------------------------------------------------------------------------------------------------
# Paper values


@dataclass
class PaperRow:
    key: str
    source: str
    dataset: str
    category: str
    method: str
    network: str
    nfe: str
    fid: float | None
    params_m: float | None
    setting: str
    note: str


def load_paper_values(path: Path | None = None) -> list[PaperRow]:
    """Rows of ``paper_values.csv`` (lines starting with # are comments)."""
    path = path or Path(__file__).with_name("paper_values.csv")
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    rows = []
    for raw in csv.DictReader(lines):
        rows.append(
            PaperRow(
                key=raw["key"].strip(),
                source=raw["source"].strip(),
                dataset=raw["dataset"].strip(),
                category=raw["category"].strip(),
                method=raw["method"].strip(),
                network=raw["network"].strip(),
                nfe=raw["nfe"].strip(),
                fid=_as_float(raw["fid"] or None),
                params_m=_as_float(raw["params_m"] or None),
                setting=raw["setting"].strip(),
                note=raw["note"].strip(),
            )
        )
    return rows


def _paper(rows: Sequence[PaperRow], key: str) -> PaperRow | None:
    return next((r for r in rows if r.key == key), None)


# ----------------------------------------------------------------------------------------------------------------
# Loading: result files


# Folders under results/<preset>/ that hold no results of their own: MLflow's artifact copies, logs.
NOT_RESULTS = {"mlartifacts", "mlruns", "logs"}


def _skipped(parts: Sequence[str]) -> bool:
    """Mid-run state, hidden folders, an evaluation job's tracking folder, MLflow artifact copies."""
    return any(p.startswith(("_", ".")) or p.endswith(".tracking") or p in NOT_RESULTS for p in parts)


def _walk(results_dir: Path, wanted) -> list[Path]:
    """Files under ``results_dir`` whose name satisfies ``wanted``, never descending into skipped folders."""
    found = []
    for folder, dirs, files in os.walk(results_dir):
        dirs[:] = sorted(d for d in dirs if not _skipped([d]))
        found += [Path(folder) / f for f in sorted(files) if wanted(f)]
    return found


def _infer_stage(config: dict[str, Any], parts: Sequence[str]) -> str | None:
    for key in ("mode", "stage"):
        if config.get(key) in TRAIN_STAGES:
            return config[key]
    for part in reversed(parts):  # the deepest folder naming a stage wins ("stage1_continued" before "stage1")
        for stage in sorted(TRAIN_STAGES, key=len, reverse=True):
            if part == stage or part.startswith(stage + "_") or part.startswith(stage + "-"):
                return stage
    return None


def _infer_grid(config: dict[str, Any], parts: Sequence[str]) -> str:
    grid = config.get("grid") or config.get("tcm.grid")
    if isinstance(grid, str) and grid:
        return grid
    return "ablation" if any(p.startswith("ablation") for p in parts) else "main"


def _n_params_from_meta(meta: dict[str, Any] | None) -> int | None:
    if not meta:
        return None
    for key in ("n_params", "num_params", "parameters", "param_count"):
        if isinstance(meta.get(key), int):
            return meta[key]
    arch = meta.get("arch")
    if not isinstance(arch, dict):
        return None
    key = json.dumps(arch, sort_keys=True, default=str)
    if key not in _N_PARAMS:
        _N_PARAMS[key] = _count_parameters(arch)
    return _N_PARAMS[key]


_N_PARAMS: dict[str, int | None] = {}


def _count_parameters(arch: dict[str, Any]) -> int | None:
    try:  # counting needs the network code; building on the meta device allocates nothing
        import torch

        from tcm_core.networks import build_precond, count_parameters

        with torch.device("meta"):
            return int(count_parameters(build_precond(arch)))
    except Exception:  # noqa: BLE001 - a table cell then shows "—"; never fail the report for it
        return None


def load_result_files(results_dir: Path) -> tuple[list[TrainingRun], list[Evaluation]]:
    """Training runs (folders with ``metrics.jsonl`` and a training ``config.json``) and evaluation JSONs."""
    from tcm_core.tracking import read_metrics

    runs: list[TrainingRun] = []
    by_dir: dict[Path, TrainingRun] = {}
    results_dir = Path(results_dir)
    for metrics_path in _walk(results_dir, lambda name: name == "metrics.jsonl"):
        run_dir = metrics_path.parent
        rel = run_dir.relative_to(results_dir)
        if _skipped(rel.parts):
            continue
        config = _read_json(run_dir / "config.json")
        if not isinstance(config, dict):
            continue  # ``train`` always writes config.json; anything else is not a training run
        params_file = _read_json(run_dir / "params.json") or {}
        merged = {**params_file, **config} if isinstance(params_file, dict) else config
        stage = _infer_stage(merged, rel.parts)
        if stage is None:
            continue
        mlflow_run = _read_json(run_dir / "mlflow_run.json") or {}  # written by tracking.open_tracker
        key = str(mlflow_run.get("run_key") or merged.get("run_key") or rel.as_posix())
        run = TrainingRun(
            key=key,
            stage=stage,
            grid=_infer_grid(merged, rel.parts),
            params={k: v for k, v in merged.items() if not isinstance(v, dict | list)},
            histories=_history_from_records(read_metrics(metrics_path)),
            run_dir=run_dir.resolve(),
            mlflow_run_id=mlflow_run.get("run_id"),
            aliases={rel.as_posix()},
            sources={"files"},
        )
        run.n_params = _n_params_from_meta(_read_json(run_dir / "network.json"))
        runs.append(run)
        by_dir[run.run_dir] = run

    evaluations: list[Evaluation] = []
    for path in _walk(results_dir, lambda name: name.endswith(".json")):
        rel = path.relative_to(results_dir)
        if _skipped(rel.parts[:-1]) or path.stat().st_size > 5_000_000:
            continue
        data = _read_json(path)
        if not isinstance(data, dict) or data.get("metric") not in ("fid_1step", "fid_2step", "dfid"):
            continue
        target = data.get("target_run_key") or data.get("run_key")
        ckpt = data.get("ckpt")
        if target is None and ckpt:
            ckpt_dir = Path(ckpt).parent
            candidates = [ckpt_dir] if ckpt_dir.is_absolute() else [Path.cwd() / ckpt_dir, results_dir / ckpt_dir]
            candidates += [results_dir.parent / ckpt_dir, results_dir.parent.parent / ckpt_dir]
            for candidate in candidates:
                run = by_dir.get(candidate.resolve())
                if run is not None:
                    target = run.key
                    break
        if target is None and path.parent.name == "eval":  # the workflow's layout: <run folder>/eval/<metric>.json
            folder = path.parent.parent.resolve()
            run = by_dir.get(folder)
            stage = _infer_stage({}, rel.parts[:-2])
            if run is None and stage is not None:
                # an evaluated checkpoint that no training job here produced (e.g. a downloaded Stage-1 model)
                run = TrainingRun(
                    key=Path(*rel.parts[:-2]).as_posix(),
                    stage=stage,
                    grid=_infer_grid({}, rel.parts[:-2]),
                    run_dir=folder,
                    sources={"files"},
                )
                runs.append(run)
                by_dir[folder] = run
            target = run.key if run is not None else None
        seeds = data.get("seeds")
        seeds = len(seeds) if isinstance(seeds, list) else (int(seeds) if isinstance(seeds, int | float) else None)
        label = str(data.get("label") or data["metric"])
        values = {}
        if isinstance(data.get("values"), dict):
            values = {float(t): _nan_if_none(v) for t, v in data["values"].items()}
        value = data.get("min")
        evaluations.append(
            Evaluation(
                metric=data["metric"],
                label=full_label(label, seeds) if data["metric"] != "dfid" else label,
                value=_nan_if_none(value) if data["metric"] != "dfid" else None,
                values=values,
                iteration=int(data["iteration"]) if isinstance(data.get("iteration"), int | float) else None,
                seeds=seeds,
                target=str(target) if target else None,
                path=path,
                source="files",
                setup=(
                    data.get("extractor"),
                    int(data["num"]) if isinstance(data.get("num"), int) else None,
                    seeds or 1,
                ),
            )
        )
    return runs, evaluations


def _nan_if_none(value: Any) -> float:
    number = _as_float(value)
    return math.nan if number is None else number


# ----------------------------------------------------------------------------------------------------------------
# Loading: MLflow


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def load_mlflow(uri: str, preset: str) -> tuple[list[TrainingRun], list[Evaluation], list[str]]:
    """Runs tagged ``tcm.preset = preset`` (the newest run per ``tcm.run_key``), with full metric histories."""
    notes: list[str] = []
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        return [], [], [f"no MLflow store at {db}: tables use the result files only"]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    frame = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`tcm.preset` = '{preset}'",
        order_by=["attributes.start_time DESC"],
    )
    runs: list[TrainingRun] = []
    evaluations: list[Evaluation] = []
    if frame is None or len(frame) == 0:
        return runs, evaluations, [f"MLflow store {uri} holds no run tagged tcm.preset={preset}"]
    seen: set[str] = set()
    superseded = 0
    for row in frame.to_dict("records"):
        # The frame has a column per key of any run: a key this run lacks reads as None or NaN.
        present = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        tags = {k[len("tags.") :]: v for k, v in present.items() if k.startswith("tags.")}
        params = {k[len("params.") :]: v for k, v in present.items() if k.startswith("params.")}
        metric_keys = [k[len("metrics.") :] for k in present if k.startswith("metrics.")]
        metric_keys = [k for k in metric_keys if k in REPORTED_METRICS or _dfid_t(k) is not None]
        run_key = tags.get("tcm.run_key") or row["run_id"]
        if tags.get("tcm.superseded") == "true":
            superseded += 1  # an attempt replaced by a fresh start of the same job (tracking.MlflowTracker)
            continue
        if run_key in seen:
            superseded += 1  # an older attempt of the same job: the newest run wins
            continue
        seen.add(run_key)
        stage = tags.get("tcm.stage")
        if stage == "eval":
            target = tags.get("tcm.target_run_key")
            seeds = _as_float(params.get("seeds"))
            num = _as_float(params.get("num"))
            extractor = params.get("extractor")
            setup = (extractor, int(num) if num else None, int(seeds) if seeds else 1)
            # evaluate logs no label to MLflow: rebuild one that names what was measured
            described = ", ".join(
                x
                for x in (
                    extractor,
                    f"{int(num)} samples" if num else None,
                    f"min of {int(seeds)}" if seeds and seeds > 1 else None,
                )
                if x
            )
            label = params.get("label") or tags.get("tcm.label")
            dfid_values: dict[float, float] = {}
            dfid_step = None
            for key in metric_keys:
                history = client.get_metric_history(row["run_id"], key)
                if not history:
                    continue
                last = max(history, key=lambda m: (m.step, m.timestamp))
                t = _dfid_t(key)
                if t is not None:
                    dfid_values[t] = last.value
                    dfid_step = int(last.step)
                elif key in ("fid_1step", "fid_2step"):
                    evaluations.append(
                        Evaluation(
                            metric=key,
                            label=full_label(str(label), int(seeds) if seeds else None)
                            if label
                            else f"FID ({described or 'MLflow eval run'})",
                            value=last.value,
                            iteration=int(last.step),
                            seeds=int(seeds) if seeds else None,
                            target=target,
                            source="mlflow",
                            setup=setup,
                        )
                    )
            if dfid_values:
                evaluations.append(
                    Evaluation(
                        metric="dfid",
                        label=str(label or f"dFID ({described or 'MLflow eval run'})"),
                        values=dfid_values,
                        iteration=dfid_step,
                        target=target,
                        source="mlflow",
                        setup=setup,
                    )
                )
            continue
        if stage not in TRAIN_STAGES:
            continue
        histories = {
            key: sorted((int(m.step), float(m.value)) for m in client.get_metric_history(row["run_id"], key))
            for key in metric_keys
        }
        n_params = _as_float(params.get("n_params") or params.get("num_params"))
        runs.append(
            TrainingRun(
                key=run_key,
                stage=stage,
                grid=tags.get("tcm.grid", "main"),
                params=params,
                histories=histories,
                mlflow_run_id=row["run_id"],
                n_params=int(n_params) if n_params is not None else None,
                aliases={row["run_id"]},
                sources={"mlflow"},
            )
        )
    if superseded:
        notes.append(f"MLflow: {superseded} older run(s) with a repeated tcm.run_key ignored (newest kept)")
    return runs, evaluations, notes


# ----------------------------------------------------------------------------------------------------------------
# Merging files and MLflow


def _compatible(a: TrainingRun, b: TrainingRun) -> bool:
    """Same stage and grid, and no swept hyperparameter known on both sides with different values."""
    if (a.stage, a.grid) != (b.stage, b.grid):
        return False
    for name in SWEPT_PARAMS:
        va, vb = a.param(name), b.param(name)
        if va is not None and vb is not None and not _same(va, vb):
            return False
    return True


def _find_match(ml_run: TrainingRun, file_runs: list[TrainingRun], taken: set[int]) -> TrainingRun | None:
    for run in file_runs:  # 1. the same run key
        if id(run) not in taken and ml_run.key in run.names():
            return run
    for run in file_runs:  # 2. an MLflow param that names the run folder
        if id(run) in taken or run.run_dir is None:
            continue
        for value in ml_run.params.values():
            if isinstance(value, str) and value and ("/" in value):
                try:
                    if Path(value).resolve() in (run.run_dir, run.run_dir / "network.safetensors"):
                        return run
                except (OSError, ValueError):
                    continue
    same = [r for r in file_runs if id(r) not in taken and _compatible(r, ml_run)]
    return same[0] if len(same) == 1 else None  # 3. the only run with the same stage, grid and hyperparameters


def _compare(rows: list[dict[str, Any]], run: str, metric: str, step: Any, files: float, mlflow_value: float) -> None:
    agree = (math.isnan(files) and math.isnan(mlflow_value)) or math.isclose(
        files, mlflow_value, rel_tol=1e-4, abs_tol=1e-6
    )
    rows.append({"run": run, "metric": metric, "step": step, "files": files, "mlflow": mlflow_value, "agree": agree})


def merge(
    preset: str,
    file_runs: list[TrainingRun],
    file_evals: list[Evaluation],
    ml_runs: list[TrainingRun],
    ml_evals: list[Evaluation],
) -> Results:
    """Files are the source of truth; MLflow fills in what the files lack and is compared where both exist."""
    results = Results(preset=preset, runs=list(file_runs), evaluations=list(file_evals))
    taken: set[int] = set()
    for ml_run in ml_runs:
        match = _find_match(ml_run, file_runs, taken)
        if match is None:
            results.runs.append(ml_run)
            continue
        taken.add(id(match))
        old_key = match.key
        match.aliases |= {match.key, *ml_run.aliases}
        match.key = ml_run.key  # the deterministic tcm.run_key names the run everywhere
        match.aliases.discard(match.key)
        match.mlflow_run_id = ml_run.mlflow_run_id
        match.sources.add("mlflow")
        match.n_params = match.n_params or ml_run.n_params
        for e in results.evaluations:
            if e.target == old_key:
                e.target = match.key
        for metric, ml_points in ml_run.histories.items():
            points = match.histories.get(metric)
            if not points:
                match.histories[metric] = ml_points
                continue
            file_by_step = dict(points)
            common = [s for s, _ in ml_points if s in file_by_step]
            if common:
                step = max(common)
                _compare(results.crosscheck, match.key, metric, step, file_by_step[step], dict(ml_points)[step])
            else:
                results.notes.append(f"cross-check: {match.key} {metric}: no common step between files and MLflow")
    for ml_eval in ml_evals:
        twins = [
            e
            for e in results.evaluations
            if e.source == "files"
            and e.metric == ml_eval.metric
            and e.target == ml_eval.target
            and (ml_eval.iteration is None or e.iteration is None or e.iteration == ml_eval.iteration)
        ]
        if not twins:
            results.evaluations.append(ml_eval)
            continue
        twin = twins[0]
        if ml_eval.metric == "dfid":
            for t, value in ml_eval.values.items():
                if t in twin.values:
                    _compare(
                        results.crosscheck, str(twin.target), f"dfid_t{t:g}", twin.iteration, twin.values[t], value
                    )
        elif twin.value is not None and ml_eval.value is not None:
            _compare(results.crosscheck, str(twin.target), ml_eval.metric, twin.iteration, twin.value, ml_eval.value)
    results.runs.sort(key=lambda r: (TRAIN_STAGES.index(r.stage), r.grid != "main", r.key))
    return results


def collect(results_dir: Path, preset: str, tracking_uri: str | None) -> tuple[Results, dict[str, float]]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    file_runs, file_evals = load_result_files(results_dir) if results_dir.exists() else ([], [])
    timings["read result files"] = time.perf_counter() - start
    ml_runs: list[TrainingRun] = []
    ml_evals: list[Evaluation] = []
    notes: list[str] = []
    start = time.perf_counter()
    if tracking_uri and tracking_uri.lower() != "none":
        try:
            ml_runs, ml_evals, notes = load_mlflow(tracking_uri, preset)
        except Exception as error:  # noqa: BLE001 - the files alone still make every table
            notes = [f"MLflow store {tracking_uri} could not be read ({type(error).__name__}: {error})"]
    else:
        notes = ["no tracking URI given: tables use the result files only"]
    timings["read MLflow"] = time.perf_counter() - start
    results = merge(preset, file_runs, file_evals, ml_runs, ml_evals)
    results.notes[:0] = notes
    return results, timings


# ----------------------------------------------------------------------------------------------------------------
# Selecting measurements


def final_fid(results: Results, run: TrainingRun | None, metric: str = "fid_1step") -> Measured | None:
    """The FID of a run's final evaluation JSON; else the last value of its periodic evaluation history."""
    if run is None:
        return None
    evals = [e for e in results.evaluations_of(run, metric) if e.value is not None]
    if evals:
        best = max(evals, key=lambda e: (e.iteration if e.iteration is not None else -1, e.source == "files"))
        return Measured(best.value, best.label, run.key, best.iteration, best.source, best.setup)
    points = run.histories.get(metric)
    if points:
        step, value = points[-1]
        label = f"{metric} (periodic evaluation during training)"
        return Measured(value, label, run.key, step, "/".join(sorted(run.sources)), ("periodic",))
    return None


# The run each stage starts from: its final checkpoint is the first point of the next stage's curves.
INIT_OF = {"stage1_continued": "stage1", "stage2": "stage1", "stage3": "stage2"}


def _init_run(results: Results, run: TrainingRun) -> TrainingRun | None:
    parent = INIT_OF.get(run.stage)
    return results.main_run(parent) if parent else None


def _start(run: TrainingRun) -> float | None:
    return _as_float(run.params.get("start_iteration"))


def _with_start_point(
    points: dict[int, float], parent_points: Sequence[tuple[int, float]], start: float | None
) -> dict[int, float]:
    """Add the parent's last point at or before the run's start (the checkpoint the run started from)."""
    if not points:
        return points
    first = min(points) if start is None else start
    before = [(s, v) for s, v in parent_points if s <= first]
    if before:
        points.setdefault(*before[-1])
    return points


def metric_series(
    results: Results, run: TrainingRun | None, metric: str, source: str = "history", with_init: bool = True
) -> list[tuple[int, float]]:
    """A run's curve of ``metric`` from one source, so that one curve never mixes two evaluation setups:
    ``history`` (periodic evaluation during training) or ``evaluations`` (the evaluation JSONs of its
    checkpoints). With ``with_init`` the curve starts at the checkpoint the run started from."""
    if run is None:
        return []
    if source == "history":
        points = dict(run.histories.get(metric, []))
    else:
        evals = [e for e in results.evaluations_of(run, metric) if e.iteration is not None and e.value is not None]
        points = {e.iteration: e.value for e in sorted(evals, key=lambda e: e.source != "files")[::-1]}
    parent = _init_run(results, run) if with_init else None
    if parent is not None:
        parent_points = metric_series(results, parent, metric, source, False)
        points = _with_start_point(points, parent_points, _start(run))
    return sorted(points.items())


def curve(results: Results, run: TrainingRun | None, metric: str) -> tuple[list[tuple[int, float]], str]:
    """The periodic-evaluation curve when it has two points or more, else the evaluation JSONs' curve."""
    history = metric_series(results, run, metric, "history")
    if len(history) >= 2:
        return history, "periodic evaluation"
    return metric_series(results, run, metric, "evaluations"), "evaluation JSONs of checkpoints"


def dfid_series(
    results: Results, run: TrainingRun | None, source: str = "history", with_init: bool = True
) -> dict[float, list[tuple[int, float]]]:
    """dFID_t by t from one source: the ``dfid_t*`` histories or the ``evaluate dfid`` JSONs of the run's
    checkpoints; with ``with_init``, starting at the dFID of the checkpoint the run started from."""
    if run is None:
        return {}
    series: dict[float, dict[int, float]] = {}
    if source == "history":
        for key, points in run.histories.items():
            t = _dfid_t(key)
            if t is not None:
                series.setdefault(t, {}).update(dict(points))
    else:
        for e in sorted(results.evaluations_of(run, "dfid"), key=lambda e: e.source == "files"):
            if e.iteration is not None:
                for t, value in e.values.items():
                    series.setdefault(t, {})[e.iteration] = value  # files (sorted last) win over MLflow
    parent = _init_run(results, run) if with_init else None
    if parent is not None:
        parent_series = dfid_series(results, parent, source, False)
        for t in series:
            series[t] = _with_start_point(series[t], parent_series.get(t, []), _start(run))
    return {t: sorted(points.items()) for t, points in sorted(series.items())}


def dfid_curve(results: Results, run: TrainingRun | None) -> tuple[dict[float, list[tuple[int, float]]], str]:
    history = dfid_series(results, run, "history")
    if any(len(points) >= 2 for points in history.values()):
        return history, "periodic evaluation"
    return dfid_series(results, run, "evaluations"), "evaluate dfid JSONs"


def ablation_baseline(results: Results) -> dict[str, float | None]:
    """The centre of the ablation grid: the main Stage-2 run's hyperparameters (the grid is built around them);
    without that run, the most common value of each swept hyperparameter among the grid's runs."""
    main = next(iter(results.runs_of("stage2", "main")), None)
    runs = _ablation_runs(results) or results.runs_of("stage2")
    baseline: dict[str, float | None] = {}
    for name in SWEPT_PARAMS:
        if main is not None and main.param(name) is not None:
            baseline[name] = main.param(name)
            continue
        values = [v for r in runs if (v := r.param(name)) is not None]
        if not values:
            baseline[name] = None
            continue
        modes = statistics.multimode(round(v, 9) for v in values)
        default = PAPER_DEFAULTS.get(name)
        baseline[name] = next((m for m in modes if _same(m, default)), modes[0])
    return baseline


def _ablation_runs(results: Results, stage: str = "stage2") -> list[TrainingRun]:
    return results.runs_of(stage, "ablation")


def ablation_slice(results: Results, vary: Sequence[str], stage: str = "stage2") -> list[TrainingRun]:
    """Ablation runs whose hyperparameters, other than those in ``vary``, sit at the baseline."""
    runs = _ablation_runs(results, stage)
    baseline = ablation_baseline(results)
    chosen = []
    for run in runs:
        if all(
            name in vary or baseline[name] is None or _same(run.param(name), baseline[name]) for name in SWEPT_PARAMS
        ):
            chosen.append(run)
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Tables


@dataclass
class Table:
    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    intro: list[str] = field(default_factory=list)
    quoted_header: list[str] = field(default_factory=list)
    quoted: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        lines += [*self.intro, ""] if self.intro else []
        lines += _md_table(self.header, self.rows)
        if self.quoted:
            lines += ["", "## Baselines quoted from the paper (not rerun here)", ""]
            lines += _md_table(self.quoted_header, self.quoted)
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["kind", *self.header])
        for row in self.rows:
            writer.writerow(["measured", *row])
        for row in self.quoted:
            # quoted rows fill the same columns: method, NFE, paper FID, paper params, source
            record = dict(zip(self.quoted_header, row))
            writer.writerow(["quoted from paper", *[record.get(h, "") for h in self.header]])
        return buffer.getvalue()


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


MAIN_HEADER = [
    "Method",
    "NFE",
    "FID (ours)",
    "FID (paper)",
    "Δ (ours − paper)",
    "# param. (M, ours)",
    "# param. (M, paper)",
    "our metric",
    "paper source",
    "run",
]
QUOTED_HEADER = ["Method", "NFE", "FID (paper)", "# param. (M, paper)", "category", "paper source"]


def _params_m(n: int | None) -> str:
    return MISSING if n is None else (f"{n / 1e6:.2f}" if n < 1e7 else f"{n / 1e6:.1f}")


def _measured_row(
    name: str, nfe: str, measured: Measured | None, paper: PaperRow | None, run: TrainingRun | None
) -> list[str]:
    ours = measured.value if measured else None
    return [
        name,
        nfe,
        _fmt(ours),
        _fmt(paper.fid if paper else None),
        _fmt_diff(ours, paper.fid if paper else None),
        _params_m(run.n_params if run else None),
        _fmt(paper.params_m, 1) if paper and paper.params_m is not None else MISSING,
        measured.label if measured else MISSING,
        paper.source if paper else MISSING,
        (f"{measured.run} @ it {measured.iteration}" if measured.iteration is not None else measured.run)
        if measured
        else MISSING,
    ]


def _metric_intro(preset: str, measured: Iterable[Measured | None], dataset_note: str) -> list[str]:
    labels = sorted({m.label for m in measured if m is not None})
    ours = "; ".join(labels) if labels else f"{MISSING} (no evaluation yet)"
    return [
        f"Preset: `{preset}`. {dataset_note}",
        "",
        f"Our metric: **{ours}**. Paper metric: **{PAPER_METRIC}**.",
        "Δ = ours − paper; it compares like with like only when both metrics are the same.",
        f"A cell with no run is shown as {MISSING}.",
    ]


def _quoted(rows: Sequence[PaperRow], source: str) -> list[list[str]]:
    return [
        [f"{r.method} [quoted]", r.nfe, _fmt(r.fid), _fmt(r.params_m, 1), r.category, r.source]
        for r in rows
        if r.source == source and not r.key
    ]


def _dataset_note(preset: str, table_dataset: str) -> str:
    if preset == "cifar10" and table_dataset == "cifar10":
        return "Dataset: CIFAR-10, as in the paper."
    if preset.startswith("imagenet64") and table_dataset == "imagenet64":
        return "Dataset: ImageNet 64x64, as in the paper."
    return (
        f"This preset is a scaled-down stand-in for the paper's {table_dataset} setting "
        "(different data, network and metric): compare trends, not absolute values."
    )


def table1(results: Results, paper: Sequence[PaperRow]) -> Table:
    fills = not results.preset.startswith("imagenet64")
    spec = [
        ("Stage 1 (standard consistency training)", "stage1", "1", "fid_1step", "t1_stage1_1"),
        ("Stage 1 (standard consistency training)", "stage1", "2", "fid_2step", ""),
        ("Stage 1 continued (control)", "stage1_continued", "1", "fid_1step", ""),
        ("Stage 1 continued (control)", "stage1_continued", "2", "fid_2step", ""),
        ("TCM (Stage 2)", "stage2", "1", "fid_1step", "t1_tcm_1"),
        ("TCM (Stage 2)", "stage2", "2", "fid_2step", "t1_tcm_2"),
    ]
    rows, measured = [], []
    for name, stage, nfe, metric, key in spec:
        run = results.main_run(stage) if fills else None
        m = final_fid(results, run, metric)
        measured.append(m)
        rows.append(_measured_row(name, nfe, m, _paper(paper, key) if key else None, run))
    notes = [] if fills else [f"preset {results.preset} is an ImageNet preset: its numbers are in Table 2"]
    return Table(
        "table1_cifar10",
        f"Table 1 (CIFAR-10): NFE, FID and # params — preset {results.preset}",
        MAIN_HEADER,
        rows,
        intro=_metric_intro(results.preset, measured, _dataset_note(results.preset, "cifar10")),
        quoted_header=QUOTED_HEADER,
        quoted=_quoted(paper, "Table 1"),
        notes=notes,
    )


def table2(results: Results, paper: Sequence[PaperRow]) -> Table:
    rows, measured, notes = [], [], []
    for network, preset in (("EDM2-S", "imagenet64_s"), ("EDM2-XL", "imagenet64_xl")):
        fills = results.preset == preset
        if not fills:
            notes.append(f"{network} rows are measured by preset {preset} (this report is preset {results.preset})")
        suffix = "s" if network == "EDM2-S" else "xl"
        for name, stage, nfe, metric, key in (
            (f"Stage 1 ({network})", "stage1", "1", "fid_1step", ""),
            (f"Stage 1 ({network})", "stage1", "2", "fid_2step", ""),
            (f"TCM ({network})", "stage2", "1", "fid_1step", f"t2_tcm_{suffix}_1"),
            (f"TCM ({network})", "stage2", "2", "fid_2step", f"t2_tcm_{suffix}_2"),
        ):
            run = results.main_run(stage) if fills else None
            m = final_fid(results, run, metric)
            measured.append(m)
            rows.append(_measured_row(name, nfe, m, _paper(paper, key) if key else None, run))
    return Table(
        "table2_imagenet64",
        f"Table 2 (ImageNet 64x64): NFE, FID and # params — preset {results.preset}",
        MAIN_HEADER,
        rows,
        intro=_metric_intro(results.preset, measured, _dataset_note(results.preset, "imagenet64")),
        quoted_header=QUOTED_HEADER,
        quoted=_quoted(paper, "Table 2") + _quoted(paper, "Appendix E"),
        notes=notes,
    )


ABLATION_HEADER = ["setting", "FID (ours)", "FID (paper)", "Δ (ours − paper)", "our metric", "paper source", "run"]


def _ablation_row(setting: str, m: Measured | None, p: PaperRow | None) -> list[str]:
    ours = m.value if m else None
    return [
        setting,
        _fmt(ours),
        _fmt(p.fid if p else None),
        _fmt_diff(ours, p.fid if p else None),
        m.label if m else MISSING,
        p.source if p else MISSING,
        m.run if m else MISSING,
    ]


def table3(results: Results, paper: Sequence[PaperRow]) -> Table:
    paper_rows = {r.setting.split("=")[1]: r for r in paper if r.source == "Table 3"}
    runs = ablation_slice(results, ["t_prime"])
    ours = {round(v, 9): r for r in runs if (v := r.param("t_prime")) is not None}
    values = sorted({round(float(k), 9) for k in paper_rows} | set(ours))
    rows, measured = [], []
    for t in values:
        p = next((r for k, r in paper_rows.items() if _same(float(k), t)), None)
        m = final_fid(results, ours.get(t), "fid_1step")
        measured.append(m)
        rows.append(_ablation_row(f"t' = {t:g}", m, p))
    baseline = ablation_baseline(results)
    fixed = ", ".join(f"{k} = {_fmt_g(v)}" for k, v in baseline.items() if k != "t_prime" and v is not None)
    intro = _metric_intro(results.preset, measured, _dataset_note(results.preset, "cifar10"))
    intro.append(f"Ablation grid (Stage 2), other hyperparameters at the grid centre: {fixed or MISSING}.")
    return Table(
        "table3_tprime",
        f"Table 3: FID vs the dividing time t' — preset {results.preset}",
        ABLATION_HEADER,
        rows,
        intro=intro,
        notes=["The paper uses batch 128 for this table (1024 in its default setting)."],
    )


def table4(results: Results, paper: Sequence[PaperRow]) -> Table:
    rows, measured = [], []
    for stage_number, stage in ((1, "stage1"), (2, "stage2"), (3, "stage3")):
        # the main runs: Stage 3 continues from the main Stage 2, which starts from the main Stage 1
        m = final_fid(results, results.main_run(stage), "fid_1step")
        measured.append(m)
        rows.append(_ablation_row(f"Stage {stage_number}", m, _paper(paper, f"t4_stage_{stage_number}")))
    intro = _metric_intro(results.preset, measured, _dataset_note(results.preset, "cifar10"))
    intro.append("Stage 3 continues from Stage 2 with t' = 4 (paper Sec. 4.4).")
    return Table(
        "table4_stages",
        f"Table 4: FID for training stages 1, 2, 3 — preset {results.preset}",
        ABLATION_HEADER,
        rows,
        intro=intro,
    )


# ----------------------------------------------------------------------------------------------------------------
# Claims


@dataclass
class Claim:
    cid: str
    statement: str
    criterion: str
    measured: str
    verdict: str  # holds | does not hold | not measured
    paper: str


def _value_at_common_step(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> tuple[int, float, float] | None:
    common = sorted(set(dict(a)) & set(dict(b)))
    if not common:
        return None
    step = common[-1]
    return step, dict(a)[step], dict(b)[step]


def _fmt_claim(value: float | None) -> str:
    """Six significant digits: claims compare values that may differ only in the third decimal."""
    return MISSING if value is None else f"{value:.6g}"


def claim_s1(results: Results) -> Claim:
    statement = "Stage 2 (TCM) reaches a lower 1-step FID than Stage 1 continued for the same iterations"
    criterion = "final 1-step FID of Stage 2 < that of Stage 1 continued (same evaluation, same iteration count)"
    s2, s1c = results.main_run("stage2"), results.main_run("stage1_continued")
    f2, f1c = final_fid(results, s2), final_fid(results, s1c)
    measured, ok = MISSING, None
    if f2 and f1c and f2.setup == f1c.setup:
        measured = f"Stage 2 {_fmt_claim(f2.value)} vs Stage 1 continued {_fmt_claim(f1c.value)} ({f2.label})"
        ok = f2.value < f1c.value if _finite(f2.value) and _finite(f1c.value) else _finite(f2.value)
    elif s2 and s1c and s2.histories.get("fid_1step") and s1c.histories.get("fid_1step"):
        common = _value_at_common_step(s2.histories["fid_1step"], s1c.histories["fid_1step"])
        if common:
            step, v2, v1c = common
            measured = (
                f"at iteration {step}: Stage 2 {_fmt_claim(v2)} vs Stage 1 continued {_fmt_claim(v1c)} "
                "(fid_1step history)"
            )
            ok = v2 < v1c if _finite(v2) and _finite(v1c) else _finite(v2)
    return Claim("S1", statement, criterion, measured, _verdict(ok), "Fig. 1b, Table 4")


def claim_s2(results: Results) -> Claim:
    statement = "During Stage 2, dFID below t' rises while dFID above t' and the 1-step FID fall"
    criterion = (
        "change = value at the end of Stage 2 − value at its start (the Stage-1 checkpoint it starts from, or its "
        "first periodic evaluation), each curve from one evaluation setup; holds if every dFID_t with t < t' "
        "rises (> 0), every dFID_t with t > t' falls (< 0) and the 1-step FID falls (< 0)"
    )
    run = results.main_run("stage2")
    t_prime = run.param("t_prime") if run else None
    series, _ = dfid_curve(results, run)
    changes: dict[str, float] = {}
    below, above = [], []
    for t, points in series.items():
        if len(points) < 2 or t_prime is None or _same(t, t_prime):
            continue
        delta = points[-1][1] - points[0][1]
        changes[f"dFID_t{t:g}"] = delta
        (below if t < t_prime else above).append(delta)
    fid_points, _ = curve(results, run, "fid_1step")
    fid_delta = fid_points[-1][1] - fid_points[0][1] if len(fid_points) >= 2 else None
    if fid_delta is not None:
        changes["fid_1step"] = fid_delta
    measured = ", ".join(f"{k} {v:+.3g}" for k, v in changes.items()) or MISSING
    if t_prime is not None:
        measured = f"t' = {t_prime:g}: {measured}"
    ok = None
    if below and above and fid_delta is not None:
        ok = all(d > 0 for d in below) and all(d < 0 for d in above) and fid_delta < 0
    elif changes:
        missing = [n for n, v in (("dFID below t'", below), ("dFID above t'", above)) if not v]
        missing += ["1-step FID at two iterations"] if fid_delta is None else []
        measured += f" (not measured: {', '.join(missing)})"
    return Claim("S2", statement, criterion, measured, _verdict(ok), "Fig. 3, Sec. 4.2")


def claim_s3(results: Results) -> Claim:
    statement = "The FID explodes when w_b = 0.01"
    criterion = (
        f"'explodes' = the final 1-step FID with w_b = 0.01 is > {EXPLODE_FACTOR:g}x the FID of the run at the grid "
        "centre (same other hyperparameters), or is not finite"
    )
    runs = ablation_slice(results, ["w_b"])
    baseline = ablation_baseline(results)
    small = next((r for r in runs if _same(r.param("w_b"), 0.01)), None)
    centre = next(
        (r for r in runs if _same(r.param("w_b"), baseline["w_b"]) and not _same(baseline["w_b"], 0.01)), None
    )
    fs, fc = final_fid(results, small), final_fid(results, centre)
    measured, ok = MISSING, None
    if fs and fc and _finite(fc.value) and fc.value > 0:
        ratio = fs.value / fc.value if _finite(fs.value) else math.inf
        measured = (
            f"w_b = 0.01: {_fmt_claim(fs.value)} vs w_b = {_fmt_g(baseline['w_b'])}: {_fmt_claim(fc.value)} "
            f"(ratio {ratio:.2f}; {fs.label})"
        )
        ok = ratio > EXPLODE_FACTOR
    return Claim("S3", statement, criterion, measured, _verdict(ok), "Fig. 4c, Sec. 4.4")


def claim_s4(results: Results) -> Claim:
    statement = "t' = 1 gives the best FID among the t' grid"
    criterion = "the final 1-step FID at t' = 1 is the lowest over the t' values run (others at the grid centre)"
    runs = ablation_slice(results, ["t_prime"])
    fids = {r.param("t_prime"): final_fid(results, r) for r in runs if r.param("t_prime") is not None}
    fids = {t: m for t, m in fids.items() if m is not None}
    measured, ok = MISSING, None
    if fids:
        measured = ", ".join(f"t' = {t:g}: {_fmt_claim(m.value)}" for t, m in sorted(fids.items()))
        one = next((m for t, m in fids.items() if _same(t, 1.0)), None)
        if one is not None and len(fids) >= 2:
            finite = {t: m.value for t, m in fids.items() if _finite(m.value)}
            best = min(finite, key=finite.get) if finite else None
            ok = best is not None and _same(best, 1.0)
            measured += f"; best t' = {_fmt_g(best)}"
        else:
            measured += " (t' = 1 and at least one other t' are needed)"
    return Claim("S4", statement, criterion, measured, _verdict(ok), "Table 3")


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("holds" if ok else "does not hold")


def claims(results: Results) -> list[Claim]:
    return [claim_s1(results), claim_s2(results), claim_s3(results), claim_s4(results)]


def claims_table(results: Results, checked: Sequence[Claim]) -> Table:
    rows = [[c.cid, c.statement, c.criterion, c.measured, c.verdict, c.paper] for c in checked]
    return Table(
        "claims",
        f"Claims check — preset {results.preset}",
        ["claim", "statement", "criterion", "measured", "verdict", "paper"],
        rows,
        intro=[
            f"Preset: `{results.preset}`. Each claim of the paper is checked on the runs of this preset; a claim "
            "that does not hold at this scale is reported as such.",
            "Verdicts: holds / does not hold / not measured (the runs it needs are missing).",
        ],
    )


# ----------------------------------------------------------------------------------------------------------------
# Figures


def _new_figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=FIG_SIZE_IN, dpi=FIG_DPI, squeeze=False, layout="constrained")
    return fig, list(axes[0])


def _empty_message(runs: Sequence[TrainingRun | None], what: str) -> str:
    return f"no {what} in the runs yet" if any(r is not None for r in runs) else "no runs yet"


def _no_data(ax, message: str = "no runs yet") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=13, color="0.35")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIG_DPI)
    plt.close(fig)
    _write_atomic(path, buffer.getvalue())


def _t_colours(ts: Sequence[float]):
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    positive = [t for t in ts if t > 0] or [1.0]
    lo, hi = min(positive), max(positive)
    norm = mcolors.LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    return norm, plt.get_cmap("viridis")


def _plot_dfid(
    fig, ax, series: dict[float, list[tuple[int, float]]], t_prime: float | None, title: str, empty: str
) -> bool:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training iteration (global)")
    ax.set_ylabel("dFID_t (lower is better)")
    if not series:
        _no_data(ax, empty)
        return False
    norm, cmap = _t_colours(list(series))
    for t, points in series.items():
        below = t_prime is not None and t < t_prime
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            markersize=3,
            color=cmap(norm(t)) if t > 0 else "k",
            linestyle="--" if below else "-",
            label=f"t = {t:g}" + (" (< t')" if below else ""),
        )
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncols=2)
    import matplotlib.cm as cm

    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    bar.set_label("t (noise level)")
    if t_prime is not None and norm.vmin <= t_prime <= norm.vmax:
        bar.ax.axhline(t_prime, color="red", linewidth=2)
        bar.ax.text(-0.15, t_prime, "t'", color="red", va="center", ha="right", transform=bar.ax.get_yaxis_transform())
    return True


def figure_fig1b(results: Results, path: Path) -> bool:
    fig, (ax,) = _new_figure()
    ax.set_title(f"Fig. 1b analogue: 1-step FID (fid_1step) vs iteration — preset {results.preset}")
    ax.set_xlabel("training iteration (global)")
    ax.set_ylabel("1-step FID (lower is better)")
    drawn = False
    runs = [results.main_run(stage) for stage in ("stage1", "stage1_continued", "stage2")]
    for run, name in zip(runs, ("Stage 1", "Stage 1 continued", "Stage 2 (TCM)")):
        points, source = curve(results, run, "fid_1step")
        if points:
            ax.plot(
                [p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=f"{name} ({source})"
            )
            drawn = True
    return _finish_fid_curves(fig, ax, path, drawn, runs)


def _finish_fid_curves(fig, ax, path: Path, drawn: bool, runs) -> bool:
    """Legend and plain y ticks for FID-vs-iteration curves, or the "no runs yet" note; then save."""
    if drawn:
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend()
    else:
        _no_data(ax, _empty_message(runs, "1-step FID"))
    _save(fig, path)
    return drawn


def figure_fig2(results: Results, path: Path) -> bool:
    fig, (ax,) = _new_figure()
    run = results.main_run("stage1")
    t_prime = results.main_run("stage2").param("t_prime") if results.main_run("stage2") else None
    drawn = _plot_dfid(
        fig,
        ax,
        dfid_curve(results, run)[0],
        t_prime,
        f"Fig. 2 analogue: dFID_t during Stage 1 (dashed: t < t') — preset {results.preset}",
        _empty_message([run], "dFID_t"),
    )
    _save(fig, path)
    return drawn


def figure_fig3(results: Results, path: Path) -> bool:
    fig, axes = _new_figure(2)
    stage2 = results.main_run("stage2")
    t_prime = stage2.param("t_prime") if stage2 else None
    drawn = False
    for ax, stage, name in zip(axes, ("stage1_continued", "stage2"), ("Stage 1 continued", "Stage 2 (TCM)")):
        run = results.main_run(stage)
        series, source = dfid_curve(results, run)
        title = f"{name} ({source})" if series else name
        drawn |= _plot_dfid(fig, ax, series, t_prime, title, _empty_message([run], "dFID_t"))
    suffix = f", t' = {t_prime:g} in red" if t_prime is not None else ""
    fig.suptitle(f"Fig. 3 analogue: dFID_t vs iteration{suffix} — preset {results.preset}", fontsize=11)
    _save(fig, path)
    return drawn


def figure_fig8(results: Results, path: Path) -> bool:
    fig, (ax,) = _new_figure()
    ax.set_title(f"Fig. 8 analogue: dFID_t vs t at several Stage-1 iterations — preset {results.preset}", fontsize=10)
    ax.set_xlabel("t (noise level, log scale)")
    ax.set_ylabel("dFID_t (lower is better)")
    series, _ = dfid_curve(results, results.main_run("stage1"))
    by_step: dict[int, list[tuple[float, float]]] = {}
    for t, points in series.items():
        for step, value in points:
            by_step.setdefault(step, []).append((t, value))
    stage2 = results.main_run("stage2")
    t_prime = stage2.param("t_prime") if stage2 else None
    drawn = bool(by_step)
    if drawn:
        import matplotlib.pyplot as plt

        cmap = plt.get_cmap("plasma")
        steps = sorted(by_step)
        for i, step in enumerate(steps):
            pts = sorted(by_step[step])
            colour = cmap(i / max(len(steps) - 1, 1) * 0.9)
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                markersize=3,
                color=colour,
                label=f"iteration {step}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        if t_prime is not None:
            ax.axvline(t_prime, color="red", linestyle=":", label=f"t' = {t_prime:g}")
        ax.legend(fontsize=7, ncols=2)
    else:
        _no_data(ax, _empty_message([results.main_run("stage1")], "dFID_t"))
    _save(fig, path)
    return drawn


def _sigma_nu_pairs(results: Results) -> list[tuple[float, float]]:
    pairs = {(r.param("sigma"), r.param("nu")) for r in _ablation_runs(results)}
    return sorted({(s, n) for s, n in pairs if s is not None and n is not None})


def figure_fig4a(results: Results, path: Path) -> bool:
    fig, (ax,) = _new_figure()
    runs = _ablation_runs(results) or results.runs_of("stage2")
    baseline = ablation_baseline(results)
    t_prime = baseline["t_prime"] if baseline["t_prime"] is not None else PAPER_DEFAULTS["t_prime"]
    t_max = next((v for r in runs if (v := r.param("t_max")) is not None), 80.0)
    mu = next((v for r in runs if (v := r.param("mu")) is not None), 0.0)
    pairs = _sigma_nu_pairs(results) or [(2.0, 10000.0), (0.2, 0.01), (0.2, 2.0)]
    source = "grid of this preset" if _sigma_nu_pairs(results) else "paper's three cases (no grid runs yet)"
    ax.set_title(
        f"Fig. 4a: density of t ~ truncated log-Student-t on [{t_prime:g}, {t_max:g}], mu = {mu:g} "
        f"({source}) — preset {results.preset}",
        fontsize=9,
    )
    ax.set_xlabel("t (noise level, log scale)")
    ax.set_ylabel("density p(t) (per unit t, log scale)")
    try:
        import numpy as np

        from tcm_core.schedules import TruncatedLogStudentT
    except ImportError as error:
        _no_data(ax, f"schedules not available ({error})")
        _save(fig, path)
        return False
    ts = np.geomspace(t_prime, t_max, 400)
    for sigma, nu in pairs:
        dist = TruncatedLogStudentT(mu=mu, sigma=sigma, nu=nu, t_min=t_prime, t_max=t_max)
        ax.plot(ts, dist.pdf(ts), label=f"sigma = {sigma:g}, nu = {nu:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    _save(fig, path)
    return True


def figure_fig4b(results: Results, path: Path) -> bool:
    fig, (ax,) = _new_figure()
    ax.set_title(f"Fig. 4b analogue: 1-step FID vs iteration for (sigma, nu) — preset {results.preset}", fontsize=10)
    ax.set_xlabel("training iteration (global)")
    ax.set_ylabel("1-step FID (fid_1step, lower is better)")
    drawn = False
    runs = sorted(ablation_slice(results, ["sigma", "nu"]), key=lambda r: (r.param("sigma"), r.param("nu")))
    for run in runs:
        points, source = curve(results, run, "fid_1step")
        if points:
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=3,
                label=f"sigma = {_fmt_g(run.param('sigma'))}, nu = {_fmt_g(run.param('nu'))} ({source})",
            )
            drawn = True
    return _finish_fid_curves(fig, ax, path, drawn, runs)


def figure_fig4c(results: Results, path: Path) -> bool:
    fig, (ax,) = _new_figure()
    runs = ablation_slice(results, ["rho", "w_b"])
    cells = {}
    for run in runs:
        m = final_fid(results, run)
        rho, w_b = run.param("rho"), run.param("w_b")
        if m is not None and rho is not None and w_b is not None:
            cells[(round(rho, 9), round(w_b, 9))] = m
    label = sorted({m.label for m in cells.values()})
    ax.set_title(
        f"Fig. 4c analogue: final 1-step FID over rho x w_b ({'; '.join(label) or 'no evaluation'}) — "
        f"preset {results.preset}",
        fontsize=9,
    )
    ax.set_xlabel("w_b (boundary-loss weight)")
    ax.set_ylabel("rho (boundary batch fraction)")
    if not cells:
        _no_data(ax, _empty_message(runs, "final 1-step FID"))
        _save(fig, path)
        return False
    import matplotlib.pyplot as plt
    import numpy as np

    rhos = sorted({k[0] for k in cells})
    wbs = sorted({k[1] for k in cells})
    grid = np.full((len(rhos), len(wbs)), np.nan)
    for (rho, w_b), m in cells.items():
        grid[rhos.index(rho), wbs.index(w_b)] = m.value if _finite(m.value) else np.nan
    masked = np.ma.masked_invalid(grid)
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="0.85")
    image = ax.imshow(masked, origin="lower", cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(wbs)), [f"{v:g}" for v in wbs])
    ax.set_yticks(range(len(rhos)), [f"{v:g}" for v in rhos])
    for i, rho in enumerate(rhos):
        for j, w_b in enumerate(wbs):
            m = cells.get((rho, w_b))
            ax.text(
                j,
                i,
                _fmt(m.value) if m else MISSING,
                ha="center",
                va="center",
                fontsize=9,
                color="white" if m and _finite(m.value) else "black",
            )
    fig.colorbar(image, ax=ax).set_label("1-step FID (grey: not run / not finite)")
    _save(fig, path)
    return True


def figure_fig7(results: Results, path: Path) -> bool:
    fig, (ax,) = _new_figure()
    ax.set_title(
        f"Fig. 7 analogue: gradient norm (grad_norm history), circles > {GRAD_SPIKE:g} — preset {results.preset}",
        fontsize=10,
    )
    ax.set_xlabel("training iteration (global)")
    ax.set_ylabel("gradient norm ||g||_2 (log scale)")
    drawn = False
    for stage, name in (("stage1", "Stage 1"), ("stage1_continued", "Stage 1 continued"), ("stage2", "Stage 2 (TCM)")):
        run = results.main_run(stage)
        points = [p for p in (run.histories.get("grad_norm") or []) if _finite(p[1])] if run else []
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=0.8, label=name)
        spikes = [p for p in points if p[1] > GRAD_SPIKE]
        if spikes:
            ax.scatter(
                [p[0] for p in spikes],
                [p[1] for p in spikes],
                s=80,
                facecolors="none",
                edgecolors="red",
                linewidths=1.5,
                label=f"{name}: {len(spikes)} spike(s) > {GRAD_SPIKE:g}",
                zorder=3,
            )
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.axhline(GRAD_SPIKE, color="red", linestyle=":", linewidth=0.8)
        ax.legend(fontsize=8)
    else:
        runs = [results.main_run(s) for s in ("stage1", "stage1_continued", "stage2")]
        _no_data(ax, _empty_message(runs, "grad_norm history"))
    _save(fig, path)
    return drawn


FIGURE_BUILDERS = {
    "fig1b_fid_stages": figure_fig1b,
    "fig2_dfid_stage1": figure_fig2,
    "fig3_dfid_stage2": figure_fig3,
    "fig4a_time_density": figure_fig4a,
    "fig4b_fid_sigma_nu": figure_fig4b,
    "fig4c_fid_rho_wb": figure_fig4c,
    "fig7_grad_norm": figure_fig7,
    "fig8_dfid_vs_t": figure_fig8,
}


# ----------------------------------------------------------------------------------------------------------------
# The command


@dataclass
class Report:
    files: list[Path]
    empty_figures: list[str]
    claims: list[Claim]
    results: Results
    timings: dict[str, float]


def build_report(
    preset: str,
    results_dir: str | Path,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    paper_values: Path | None = None,
    figures: bool = True,
) -> Report:
    """Read every result of ``preset`` and write the tables, figures and claims under ``out_dir``."""
    results, timings = collect(Path(results_dir), preset, tracking_uri)
    out = Path(out_dir)
    paper = load_paper_values(paper_values)
    files: list[Path] = []

    start = time.perf_counter()
    checked = claims(results)
    tables = [
        table1(results, paper),
        table2(results, paper),
        table3(results, paper),
        table4(results, paper),
        claims_table(results, checked),
    ]
    for table in tables:
        for ext, text in (("md", table.markdown()), ("csv", table.csv_text())):
            path = out / "tables" / f"{table.name}.{ext}"
            _write_atomic(path, text.encode())
            files.append(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["run", "metric", "step", "files", "mlflow", "agree"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(results.crosscheck)
    path = out / "tables" / "crosscheck.csv"
    _write_atomic(path, buffer.getvalue().encode())
    files.append(path)
    timings["tables and claims"] = time.perf_counter() - start

    start = time.perf_counter()
    empty = []
    for name, builder in FIGURE_BUILDERS.items() if figures else ():
        path = out / "figures" / f"{name}.png"
        if not builder(results, path):
            empty.append(name)
        files.append(path)
    timings["figures"] = time.perf_counter() - start
    return Report(files, empty, checked, results, timings)


def format_summary(report: Report, seconds: float) -> str:
    results = report.results
    lines = [f"tables: preset {results.preset}"]
    by_source: dict[str, int] = {}
    for run in results.runs:
        for source in run.sources:
            by_source[source] = by_source.get(source, 0) + 1
    lines.append(
        f"  runs found: {len(results.runs)} training runs "
        f"({', '.join(f'{n} with {s}' for s, n in sorted(by_source.items())) or 'none'}), "
        f"{len(results.evaluations)} evaluations"
    )
    lines += [f"  note: {n}" for n in results.notes]
    mismatches = [c for c in results.crosscheck if not c["agree"]]
    lines.append(f"  cross-check files vs MLflow: {len(results.crosscheck)} values compared, {len(mismatches)} differ")
    lines += [
        f"    differs: {c['run']} {c['metric']} step {c['step']}: files {c['files']} vs mlflow {c['mlflow']}"
        for c in mismatches[:10]
    ]
    lines.append("  claims:")
    lines += [f"    {c.cid} {c.verdict}: {c.measured}" for c in report.claims]
    lines.append("  files:")
    for path in report.files:
        name = path.stem
        flag = "  (no runs yet)" if name in report.empty_figures else ""
        lines.append(f"    {path}  {path.stat().st_size:,} B{flag}")
    if report.empty_figures:
        lines.append(f"  figures with no data yet: {', '.join(report.empty_figures)}")
    lines.append(
        "  timing: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items()) + f"; total {seconds:.1f} s"
    )
    return "\n".join(lines)


def add_tables_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="preset whose runs are reported (tag tcm.preset)")
    parser.add_argument("--results", required=True, type=Path, help="results folder of the preset (results/P)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (sqlite:///abs/path or http://host:port); 'none' to skip MLflow",
    )
    parser.add_argument("--out", required=True, type=Path, help="writes OUT/tables/*.md|csv and OUT/figures/*.png")
    parser.add_argument("--paper-values", type=Path, default=None, help="override of tcm_core/paper_values.csv")
    parser.add_argument("--no-figures", action="store_true", help="write the tables and claims only (quick look)")


def run_tables(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    report = build_report(
        args.preset, args.results, args.out, args.tracking_uri, args.paper_values, figures=not args.no_figures
    )
    print(format_summary(report, time.perf_counter() - start), flush=True)
    return 0
