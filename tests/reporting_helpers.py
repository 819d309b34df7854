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
PERIODIC_LABEL = "FID (LeNet features, 256)"  # the periodic evaluation's (config.json: eval_label)
PERIODIC = "periodic/"  # mlflow_store.PERIODIC_PREFIX
DFID_TS = (0.2, 0.5, 2.0, 4.0, 80.0)
BASELINE = {"t_prime": 1.0, "rho": 0.25, "w_b": 0.1, "student_sigma": 0.2, "student_nu": 0.01}
CD = {"method": "cd", "ode_solver": "heun", "guidance": 1.5, "batch": 16}
DISTILL_FIDS = {"stage1": 45.0, "stage1_continued": 43.0, "stage2": 38.0}  # unlike every CT number
INTERMEDIATE_FIDS = {"init_stage1": 27.25, "init_finetune": 27.75}  # worse than the grid centre's 25.0


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
    histories: bool = True  # periodic evaluation during training (config eval.points > 0)
    seeds: int = 3  # training seeds of the claim-bearing arms, the CD control and CD Stage 2 included (<run>/seed~j)
    distill: dict[str, float] = field(default_factory=lambda: DISTILL_FIDS)  # the CD arm's final 1-step FIDs
    # the intermediate-stage arm (App. B, Table 6, claim S6): dFID_t' of Stage 1's network and of the fine-tuned
    # one (seed j: - 0.1 j), and the final 1-step FIDs of its two Stage-2 variants (grid centre: 25.0; seed j: + 0.2 j)
    intermediate: bool = True
    dfid_tprime: tuple[float, float] = (2.5, 2.2)  # (before, after)
    intermediate_fids: dict[str, float] = field(default_factory=lambda: dict(INTERMEDIATE_FIDS))


@dataclass
class RunSpec:
    run_key: str
    stage: str
    grid: str
    params: dict
    start: int
    end: int
    first_fid: float
    final_fid: float
    folder: Path
    jitter: float = 0.0  # what this training seed adds to the run's final values
    records: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    eval_names: list[str] = field(default_factory=list)  # the file stem of each of ``evals`` (fid_1step, dfid, ...)


def _dfid(spec: RunSpec, scenario: Scenario, t: float, frac: float) -> float:
    """dFID_t after a fraction ``frac`` of the run: below t' it rises in Stage 2, elsewhere it falls."""
    t_prime = spec.params.get("t_prime") or 1.0
    base = 2.0 + math.log(t + 1)
    start = base - 0.8 if spec.stage != "stage1" else base  # Stage 1 ends 0.8 lower: where later stages start
    if spec.stage == "stage2" and t < t_prime:
        return start + (1.5 if scenario.dfid_below_rises else -0.5) * frac
    return start - 0.8 * frac


def _training_records(spec: RunSpec, scenario: Scenario) -> list[dict]:
    records = []
    span = max(spec.end - spec.start, 1)
    for step in range(spec.start, spec.end + 1, 20):
        grad = 5.0 + (step % 7)
        if spec.stage == "stage1" and step in (200, 320):
            grad = 250.0  # spikes, as in the paper's Fig. 7
        record = {"step": step, "loss": 1.0 / (1 + step / 100), "grad_norm": grad, "lr": 1e-4}
        if scenario.histories and (step - spec.start) % 100 == 0:
            frac = (step - spec.start) / span
            record[PERIODIC + "fid_1step"] = spec.first_fid + (spec.final_fid - spec.first_fid) * frac
            for t in DFID_TS:
                record[f"{PERIODIC}dfid_t{t:g}"] = _dfid(spec, scenario, t, frac) + 0.1 * spec.jitter * frac
        records.append(record)
    return records


def build_synthetic(root: Path, preset: str = "tiny", scenario: Scenario | None = None) -> list[RunSpec]:
    """Write ``root`` (= results/<preset>) in the workflow's layout and return the run specs (for MLflow)."""
    scenario = scenario or Scenario()
    specs: list[RunSpec] = []

    def add(run, stage, grid, params, start, end, first, final, seeded=False):
        for j in range(scenario.seeds if seeded else 1):
            folder = run if j == 0 else f"{run}/seed~{j}"
            jitter = 0.2 * j if stage == "stage2" else -0.1 * j  # the arms' seeds differ a little, differently
            spec = RunSpec(f"{stage}:{preset}:{folder}", stage, grid, {**params, "seed": 101 + j}, start, end, first,
                           final + jitter, root / folder, jitter)
            spec.records = _training_records(spec, scenario)
            specs.append(spec)

    s2_final, s1c_final = scenario.stage2_final, scenario.stage1_continued_final
    main = [
        ("stage1", "stage1", {"t_prime": None}, 0, 400, 80.0, 40.0),
        ("stage1_continued", "stage1_continued", {"t_prime": None}, 400, 800, 40.0, s1c_final),
        ("stage2/main", "stage2", dict(BASELINE), 400, 800, 40.0, s2_final),
        ("stage3/main", "stage3", {**BASELINE, "t_prime": 4.0}, 800, 1000, s2_final, 19.5),
    ]
    for run, stage, params, start, end, first, final in main:
        if stage not in scenario.skip_stages:
            add(run, stage, "main", params, start, end, first, final, seeded=run in ("stage1_continued", "stage2/main"))
    distill = [("stage1", {"t_prime": None}, 0, 400, 80.0), ("stage1_continued", {"t_prime": None}, 400, 800, 45.0),
               ("stage2", dict(BASELINE), 400, 800, 45.0)]
    for stage, params, start, end, first in distill:
        if stage in scenario.distill:
            add(f"distill/{stage}", stage, "distill", {**params, **CD}, start, end, first, scenario.distill[stage],
                seeded=stage != "stage1")
    if scenario.ablations:
        grid: list[tuple[dict, float]] = [({**BASELINE, "t_prime": t}, f) for t, f in scenario.tprime_fids.items()]
        grid += [({**BASELINE, "rho": rho}, 26.0 + rho) for rho in (0.1, 0.5)]
        grid += [({**BASELINE, "w_b": 0.01}, scenario.wb001_final), ({**BASELINE, "w_b": 1.0}, 26.5)]
        grid += [({**BASELINE, "student_sigma": s, "student_nu": n}, 29.0 + s) for s, n in ((2.0, 10000.0), (0.2, 2.0))]
        seen = set()
        for point, fid in grid:
            name = "/".join(f"{k}~{point[k]}" for k in BASELINE)  # a Paramspace instance pattern
            if name not in seen:
                seen.add(name)
                claimed = [k for k in BASELINE if point[k] != BASELINE[k]] in ([], ["t_prime"]) or point["w_b"] == 0.01
                add(f"stage2/ablation/{name}", "stage2", "ablation", point, 400, 600, 40.0, fid, seeded=claimed)
    if scenario.intermediate:  # the fine-tuning (400 -> 500), then Stage 2 from Stage 1 (400 ->) or from it (500 ->)
        add("intermediate/finetune", "intermediate", "intermediate", {"t_prime": 1.0}, 400, 500, 40.0, 39.0, True)
        for variant, fid in scenario.intermediate_fids.items():
            start = 400 if variant == "init_stage1" else 500
            add(f"intermediate/stage2_{variant}", "stage2", "intermediate", dict(BASELINE), start, start + 200, 40.0,
                fid, seeded=True)

    for spec in specs:
        spec.folder.mkdir(parents=True, exist_ok=True)
        spec.config = {
            "mode": spec.stage,
            "iterations": spec.end - spec.start,
            "start_iteration": spec.start,
            "end_iteration": spec.end,
            **{"rho": 0.25, "w_b": 0.1, "student_sigma": 0.2, "student_nu": 0.01, "student_mu": 0.0, "t_max": 80.0},
            **spec.params,
            "eval_label": PERIODIC_LABEL,
        }
        (spec.folder / "config.json").write_text(json.dumps(spec.config))
        (spec.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spec.records))
        (spec.folder / "params.json").write_text(json.dumps(spec.config))  # JsonlTracker.log_params
        ckpt = spec.folder / "network.safetensors"
        ckpt.write_bytes(b"")
        if spec.grid == "main":  # the checkpoint's sidecar, as save_network writes it
            meta = {"arch": arch_preset("tiny"), "iteration": spec.end, "provenance": {}}
            (spec.folder / "network.json").write_text(json.dumps(meta))
        evals = spec.folder / "eval"
        evals.mkdir()
        seed_run = "/seed~" in spec.run_key
        finals = [("fid_1step", spec.final_fid)] + ([] if seed_run else [("fid_2step", spec.final_fid * 0.8)])
        for metric, value in finals:
            data = {
                "metric": metric,
                "label": LABEL,
                "extractor": "lenet",
                "num": 5000,
                "seeds": 3,
                "per_seed": [value, value + 0.3, value + 0.5],
                "min": value,
                "steps": [80.0] if metric == "fid_1step" else [80.0, 1.0],
                "ckpt": str(ckpt.relative_to(root.parent.parent)),  # relative to the workflow's folder
                "ckpt_sha256": "0" * 64,
                "iteration": spec.end,
                "seconds": 1.0,
            }
            (evals / f"{metric}.json").write_text(json.dumps(data))
            spec.evals.append(data)
            spec.eval_names.append(metric)
            # the evaluation job's own tracking folder (JsonlTracker): never a training run
            tracking = evals / f"{metric}.tracking"
            tracking.mkdir()
            (tracking / "metrics.jsonl").write_text(json.dumps({"step": spec.end, metric: value}) + "\n")
            (tracking / "params.json").write_text(json.dumps({"ckpt": data["ckpt"], "num": 5000, "seeds": 3}))
        if spec.grid == "main":
            values = {f"{t:g}": _dfid(spec, scenario, t, 1.0) + 0.1 * spec.jitter for t in DFID_TS}
            data = {
                "metric": "dfid",
                "label": "dFID (LeNet features, 1k)",
                "ts": list(DFID_TS),
                "values": values,
                "num": 1000,
                "extractor": "lenet",
                "ckpt": str(ckpt.relative_to(root.parent.parent)),
                "iteration": spec.end,
            }
            (evals / "dfid.json").write_text(json.dumps(data))
            spec.evals.append(data)
            spec.eval_names.append("dfid")
        _write_dfid_tprime(spec, scenario, root)
        _write_mid_t_sweep(spec)
    return specs


SWEEP_MID_TS = (0.5, 1.0, 2.0, 5.0)


def _write_mid_t_sweep(spec: RunSpec) -> None:
    """The 2-step middle-time sweep of seed 0 of each main and distillation arm (Stage 3 has none): a parabola
    in ln t_mid around 2, at the run's 2-step FID; a truncated network is not swept below its t'."""
    if "/seed~" in spec.run_key or spec.grid not in ("main", "distill") or spec.stage == "stage3":
        return
    t_prime = spec.params.get("t_prime") if spec.stage == "stage2" else None
    swept = [m for m in SWEEP_MID_TS if t_prime is None or m >= t_prime]
    fids = [spec.final_fid * 0.8 * (1 + 0.05 * math.log(m / 2.0) ** 2) for m in swept]
    best = min(range(len(fids)), key=fids.__getitem__)
    (spec.folder / "eval" / "fid_2step_sweep.json").write_text(json.dumps({
        "metric": "fid_2step_sweep", "label": LABEL, "mid_ts": swept, "fids": fids,
        "skipped_below_t_prime": [m for m in SWEEP_MID_TS if m not in swept], "best_mid_t": swept[best],
        "best": fids[best]}))


def _write_dfid_tprime(spec: RunSpec, scenario: Scenario, root: Path) -> None:
    """dFID at t' = 1 (the workflow's eval/dfid_tprime.json) of Stage 1's network and of each fine-tuned one."""
    if not scenario.intermediate or spec.run_key.split(":", 2)[2] not in ("stage1", "intermediate/finetune") and \
            spec.stage != "intermediate":
        return
    before, after = scenario.dfid_tprime
    value = before if spec.stage == "stage1" else after + spec.jitter
    data = {"metric": "dfid", "label": "dFID (LeNet features, 1k)", "ts": [1.0], "values": {"1": value}, "num": 1000,
            "extractor": "lenet", "ckpt": str((spec.folder / "network.safetensors").relative_to(root.parent.parent)),
            "iteration": spec.end}
    (spec.folder / "eval" / "dfid_tprime.json").write_text(json.dumps(data))
    spec.evals.append(data)
    spec.eval_names.append("dfid_tprime")


def mirror_to_mlflow(specs: list[RunSpec], tracking_uri: str, preset: str = "tiny") -> dict[str, str]:
    """Log every run into a real MLflow store (SQLite) with the project's tags; returns run_key -> run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = client.create_experiment(f"tcm-{preset}")
    parent = client.create_run(exp_id, tags={"tcm.study": preset, "tcm.role": "parent"}).info.run_id
    ids = {}
    for spec in specs:
        if spec.stage == "stage1":
            # an earlier attempt that a fresh start superseded (tracking.MlflowTracker renames its key)
            old = {"tcm.preset": preset, "tcm.stage": "stage1", "tcm.grid": "main", "tcm.superseded": "true",
                   "tcm.run_key": f"{spec.run_key}#superseded@1", "mlflow.parentRunId": parent}  # fmt: skip
            old_id = client.create_run(exp_id, tags=old).info.run_id
            client.log_batch(old_id, metrics=[Metric("fid_1step", 999.0, 0, spec.end)])
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
        # the artifact store beside the SQLite file keeps copies of the run's files: never results of their own
        artifacts = spec.folder.parents[len(Path(spec.run_key.split(":", 2)[2]).parts) - 1] / "mlartifacts"
        copy = artifacts / run_id / "artifacts"
        copy.mkdir(parents=True)
        for name in ("config.json", "metrics.jsonl"):
            (copy / name).write_text((spec.folder / name).read_text())
        (copy / "fid_1step.json").write_text((spec.folder / "eval" / "fid_1step.json").read_text())
        for data, name in zip(spec.evals, spec.eval_names):
            run = spec.run_key.split(":", 2)[2]
            eval_key = f"{data['metric'].split('_')[0]}:{preset}:{run}:{name}"
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
