"""A synthetic results folder and a real SQLite MLflow store, shaped like the workflow's, for the reporting tests.

Every training run is a folder with ``metrics.jsonl`` + ``config.json`` (as ``train`` writes them) and every
evaluation an ``evaluate fid|dfid`` JSON pointing at the run's checkpoint. The same numbers are mirrored into
MLflow with the tags of docs/ARCHITECTURE.md (tcm.preset, tcm.stage, tcm.grid, tcm.run_key,
tcm.target_run_key, mlflow.parentRunId), params and full metric histories.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tcm_core.networks import arch_preset

LABEL = "FID (LeNet features, 5k, min of 3)"  # as evaluation.fid_label writes it
DFID_TS = (0.2, 0.5, 2.0, 4.0, 80.0)
BASELINE = {"t_prime": 1.0, "rho": 0.25, "w_b": 0.1, "sigma": 0.2, "nu": 0.01}


@dataclass
class Scenario:
    """What the synthetic runs show; the defaults make every paper claim hold."""

    stage2_final: float = 20.0  # Stage-2 final 1-step FID
    stage1_continued_final: float = 30.0
    wb001_final: float = 90.0  # w_b = 0.01 (baseline grid centre: 25.0)
    tprime_fids: dict[float, float] = field(default_factory=lambda: {0.5: 28.0, 1.0: 25.0, 2.0: 27.0})
    dfid_below_rises: bool = True
    skip_stages: tuple[str, ...] = ()  # main-grid stages with no run at all
    ablations: bool = True


@dataclass
class RunSpec:
    run_key: str
    stage: str
    grid: str
    params: dict
    start: int
    end: int
    final_fid: float
    folder: Path
    records: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)


def _fid_curve(start: int, end: int, first: float, final: float, every: int = 100) -> list[tuple[int, float]]:
    steps = list(range(start, end + 1, every))
    n = max(len(steps) - 1, 1)
    return [(s, first + (final - first) * (i / n)) for i, s in enumerate(steps)]


def _training_records(spec: RunSpec, scenario: Scenario, first_fid: float) -> list[dict]:
    records = []
    fid = dict(_fid_curve(spec.start, spec.end, first_fid, spec.final_fid))
    t_prime = spec.params.get("t_prime") or 1.0
    for step in range(spec.start, spec.end + 1, 20):
        grad = 5.0 + (step % 7)
        if spec.stage == "stage1" and step in (200, 320):
            grad = 250.0  # spikes, as in the paper's Fig. 7
        record = {"step": step, "loss": 1.0 / (1 + step / 100), "grad_norm": grad, "lr": 1e-4}
        if step in fid:
            record["fid_1step"] = fid[step]
            frac = (step - spec.start) / max(spec.end - spec.start, 1)
            for t in DFID_TS:
                base = 2.0 + math.log(t + 1)
                if spec.stage == "stage2" and t < t_prime:
                    change = (1.5 if scenario.dfid_below_rises else -0.5) * frac
                else:
                    change = -0.8 * frac
                record[f"dfid_t{t:g}"] = base + change
        records.append(record)
    return records


def build_synthetic(root: Path, preset: str = "tiny", scenario: Scenario | None = None) -> list[RunSpec]:
    """Write ``root`` (= results/<preset>) and return the run specs (to mirror into MLflow)."""
    scenario = scenario or Scenario()
    specs: list[RunSpec] = []

    def add(run_key, stage, grid, params, start, end, final, first, folder):
        spec = RunSpec(run_key, stage, grid, params, start, end, final, root / folder)
        spec.records = _training_records(spec, scenario, first)
        specs.append(spec)
        return spec

    main = [
        ("train_stage1/main", "stage1", {"t_prime": None}, 0, 400, 40.0, 80.0, "main/stage1"),
        (
            "train_stage1_continued/main",
            "stage1_continued",
            {"t_prime": None},
            400,
            800,
            scenario.stage1_continued_final,
            40.0,
            "main/stage1_continued",
        ),
        ("train_stage2/main", "stage2", dict(BASELINE), 400, 800, scenario.stage2_final, 40.0, "main/stage2"),
        (
            "train_stage3/main",
            "stage3",
            {**BASELINE, "t_prime": 4.0},
            800,
            1000,
            19.5,
            scenario.stage2_final,
            "main/stage3",
        ),
    ]
    for key, stage, params, start, end, final, first, folder in main:
        if stage not in scenario.skip_stages:
            add(key, stage, "main", params, start, end, final, first, folder)
    if scenario.ablations:
        grid: list[dict] = []
        for t_prime, fid in scenario.tprime_fids.items():
            grid.append({**BASELINE, "t_prime": t_prime, "_fid": fid})
        for rho in (0.1, 0.5):
            grid.append({**BASELINE, "rho": rho, "_fid": 26.0 + rho})
        for w_b, fid in ((0.01, scenario.wb001_final), (1.0, 26.5)):
            grid.append({**BASELINE, "w_b": w_b, "_fid": fid})
        for sigma, nu in ((2.0, 10000.0), (0.2, 2.0)):
            grid.append({**BASELINE, "sigma": sigma, "nu": nu, "_fid": 29.0 + sigma})
        seen = set()
        for point in grid:
            fid = point.pop("_fid")
            name = "_".join(f"{k}{point[k]:g}" for k in BASELINE)
            if name in seen:
                continue
            seen.add(name)
            add(f"train_ablation/{name}", "stage2", "ablation", point, 400, 600, fid, 40.0, f"ablation/{name}")

    for spec in specs:
        spec.folder.mkdir(parents=True, exist_ok=True)
        spec.config = {
            "mode": spec.stage,
            "iterations": spec.end - spec.start,
            "start_iteration": spec.start,
            "end_iteration": spec.end,
            **{"rho": 0.25, "w_b": 0.1, "sigma": 0.2, "nu": 0.01, "mu": 0.0, "t_max": 80.0},
            **spec.params,
        }
        config = spec.config
        (spec.folder / "config.json").write_text(json.dumps(config))
        (spec.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spec.records))
        (spec.folder / "params.json").write_text(json.dumps(spec.config))  # JsonlTracker.log_params
        ckpt = spec.folder / "network.safetensors"
        ckpt.write_bytes(b"")
        if spec.grid == "main":  # the checkpoint's sidecar, as save_network writes it
            meta = {"arch": arch_preset("tiny"), "iteration": spec.end, "provenance": {}}
            (spec.folder / "network.json").write_text(json.dumps(meta))
        for metric, value in (("fid_1step", spec.final_fid), ("fid_2step", spec.final_fid * 0.8)):
            if spec.grid == "ablation" and metric == "fid_2step":
                continue
            data = {
                "metric": metric,
                "label": LABEL,
                "extractor": "lenet",
                "num": 5000,
                "seeds": 3,
                "per_seed": [value, value + 0.3, value + 0.5],
                "min": value,
                "steps": [80.0],
                "ckpt": str(ckpt),
                "ckpt_sha256": "0" * 64,
                "iteration": spec.end,
                "seconds": 1.0,
            }
            (spec.folder / f"{metric}.json").write_text(json.dumps(data))
            spec.evals.append(data)
            # the evaluation job's own tracking folder (JsonlTracker): never a training run
            tracking = spec.folder / f"{metric}.tracking"
            tracking.mkdir(exist_ok=True)
            (tracking / "metrics.jsonl").write_text(json.dumps({"step": spec.end, metric: value}) + "\n")
            (tracking / "params.json").write_text(json.dumps({"ckpt": str(ckpt), "num": 5000, "seeds": 3}))
        if spec.grid == "main":
            values = {f"{t:g}": spec.records[-1][f"dfid_t{t:g}"] for t in DFID_TS}
            data = {
                "metric": "dfid",
                "label": "dFID (LeNet features, 1k)",
                "ts": list(DFID_TS),
                "values": values,
                "num": 1000,
                "ckpt": str(ckpt),
                "iteration": spec.end,
            }
            (spec.folder / "dfid.json").write_text(json.dumps(data))
            spec.evals.append(data)
    return specs


def mirror_to_mlflow(specs: list[RunSpec], tracking_uri: str, preset: str = "tiny") -> dict[str, str]:
    """Log every run into a real MLflow store (SQLite) with the project's tags; returns run_key -> run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = client.create_experiment(f"tcm-{preset}")
    parent = client.create_run(exp_id, tags={"tcm.study": preset, "tcm.role": "parent"}).info.run_id
    ids = {}
    for spec in specs:
        tags = {
            "mlflow.parentRunId": parent,
            "tcm.preset": preset,
            "tcm.stage": spec.stage,
            "tcm.grid": spec.grid,
            "tcm.run_key": spec.run_key,
            "tcm.rule": spec.run_key.split("/")[0],
        }
        run_id = client.create_run(exp_id, tags=tags).info.run_id
        # as training logs them: the resolved config, values JSON-encoded
        params = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in spec.config.items()]
        metrics = [Metric(k, float(v), 0, r["step"]) for r in spec.records for k, v in r.items() if k != "step"]
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i : i + 900], params=params if i == 0 else [])
        client.set_terminated(run_id)
        ids[spec.run_key] = run_id
        # what tracking.open_tracker leaves in the run folder
        info = {"run_id": run_id, "run_key": spec.run_key, "tracking_uri": tracking_uri}
        (spec.folder / "mlflow_run.json").write_text(json.dumps(info))
        for data in spec.evals:
            eval_key = f"evaluate_{data['metric']}/{spec.run_key}"
            eval_tags = {**tags, "tcm.stage": "eval", "tcm.run_key": eval_key, "tcm.target_run_key": spec.run_key}
            eval_id = client.create_run(exp_id, tags=eval_tags).info.run_id
            if data["metric"] == "dfid":
                metrics = [Metric(f"dfid_t{t}", float(v), 0, data["iteration"]) for t, v in data["values"].items()]
                params = [Param("ts", json.dumps(data["ts"])), Param("num", str(data["num"]))]
            else:  # the params ``evaluate fid`` logs (no label: the reader rebuilds one)
                metrics = [Metric(data["metric"], float(data["min"]), 0, data["iteration"])]
                params = [Param(k, str(data[k])) for k in ("num", "seeds", "extractor")]
            client.log_batch(eval_id, metrics=metrics, params=params)
    return ids
