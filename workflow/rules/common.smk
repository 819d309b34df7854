# Helpers shared by every rule module (config validation, the chosen preset, paths, the ablation
# Paramspace, and the command-line pieces passed to `python -m tcm_core`). No science here.

import hashlib
import json
import os
import shlex
from pathlib import Path

import pandas as pd
import yaml
from snakemake.utils import Paramspace, validate


class ConfigError(ValueError):
    """An invalid config.yaml value, reported before any job runs."""


def _schema_error_message(error) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    hint = error.schema.get("description") if isinstance(error.schema, dict) else None
    return f"invalid config: {where}: {error.message}" + (f" ({hint})" if hint else "")


def validate_config(cfg):
    """JSON-schema validation naming the failing key, then Snakemake's (which fills defaults)."""
    import jsonschema

    schema_file = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
    schema = yaml.safe_load(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if error is not None:
        raise ConfigError(_schema_error_message(error))
    validate(cfg, schema="../schemas/config.schema.yaml")


def check_config(cfg):
    """Cross-field rules the schema cannot express, for the preset being run."""
    names = sorted(cfg["presets"])
    name = cfg["preset"]
    if name not in cfg["presets"]:
        raise ConfigError(f"invalid config: preset: {name!r} is not one of {names}")
    p = cfg["presets"][name]
    where = f"presets.{name}"
    init = p["init"]
    if init["kind"] == "pretrain":
        if "pretrain" not in p or "arch" not in p:
            raise ConfigError(
                f"invalid config: {where}.init: kind pretrain needs `arch` and `pretrain`"
            )
    elif init["kind"] == "checkpoint":
        if bool(init.get("name")) == bool(init.get("url")):
            raise ConfigError(
                f"invalid config: {where}.init: kind checkpoint needs exactly one of name, url"
            )
    elif not init.get("path"):
        raise ConfigError(
            f"invalid config: {where}.init.path: kind path needs the checkpoint file "
            "(e.g. the ECM-XL checkpoint for imagenet64_xl); set it in config.yaml or a --configfile"
        )
    data = p["dataset"]
    if not data.get("path"):
        if data.get("name") is None:
            raise ConfigError(
                f"invalid config: {where}.dataset.path: set an EDM-layout dataset (.zip or folder) "
                "or dataset.name (mnist5k | cifar10)"
            )
        if data["name"] == "cifar10" and not data.get("source"):
            raise ConfigError(
                f"invalid config: {where}.dataset.source: cifar10 needs a URL or path"
            )
    for section in ("stage1", "stage2", "stage3", "pretrain"):
        keys = merged_section(p, section) if section in p or section == "stage3" else {}
        t_min, t_max = keys.get("t_min", 0.002), keys.get("t_max", 80.0)
        if t_min >= t_max:
            raise ConfigError(
                f"invalid config: {where}.{section}.t_min: {t_min} must be < t_max {t_max}"
            )
        if "t_prime" in keys and not t_min < keys["t_prime"] < t_max:
            raise ConfigError(
                f"invalid config: {where}.{section}.t_prime: {keys['t_prime']} must lie in "
                f"(t_min, t_max) = ({t_min}, {t_max})"
            )
    s2 = p["stage2"]
    for t in p["ablation"].get("t_prime", []):
        if not s2.get("t_min", 0.002) < t < s2.get("t_max", 80.0):
            raise ConfigError(
                f"invalid config: {where}.ablation.t_prime: {t} must lie in (t_min, t_max)"
            )
    if (
        3 in p["ablation"].get("stages", [])
        and merged_section(p, "stage3")["t_prime"] <= s2["t_prime"]
    ):
        raise ConfigError(f"invalid config: {where}.stage3.t_prime must be > stage2.t_prime")
    mid_t = p["eval"].get("mid_t")
    if mid_t is not None and not 0.002 < mid_t < s2.get("t_max", 80.0):
        raise ConfigError(f"invalid config: {where}.eval.mid_t: {mid_t} must lie in (t_min, t_max)")


def merged_section(p, section):
    """TrainConfig keys of a section as tcm_core.train_config resolves them (documented in
    ARCHITECTURE.md): stage1_continued = stage1 with the iterations of stage2; stage3 = stage3 over
    stage2; pretrain also takes `arch`; the preset's eval block fills eval_* keys."""
    if section == "stage1_continued":
        keys = dict(p["stage1"])
        if "iterations" in p["stage2"]:
            keys["iterations"] = p["stage2"]["iterations"]
    elif section == "stage3":
        keys = {**p["stage2"], **p.get("stage3", {})}
    else:
        keys = dict(p.get(section, {}))
    if section == "pretrain" and "arch" not in keys and "arch" in p:
        keys["arch"] = dict(p["arch"])
    for eval_key, cfg_key in (
        ("every", "eval_every"),
        ("num", "eval_num"),
        ("mid_t", "eval_mid_t"),
        ("dfid_ts", "eval_dfid_ts"),
    ):
        if cfg_key not in keys and eval_key in p["eval"]:
            keys[cfg_key] = p["eval"][eval_key]
    return keys


validate_config(config)
check_config(config)

PRESET = config["preset"]
P = config["presets"][PRESET]
EVAL = P["eval"]
ABL = P["ablation"]
RESULTS = f"results/{PRESET}"


wildcard_constraints:
    preset=PRESET,
    steps="1step|2step",
    sweep="dfid|dfid_wide",
    extractor=P["eval"]["extractor"],
    run="stage1|stage1_continued|stage2/main|stage3/main|stage2/ablation/.+",


# ---------------------------------------------------------------------------------------------
# MLflow: the tracking URI is infrastructure, not an experiment setting, so jobs read it from the
# environment (changing it must not retrain anything); the parent record comes from mlflow_init.

TRACKING_URI = config.get("tracking_uri") or f"sqlite:///{Path.cwd().resolve()}/{RESULTS}/mlflow.db"
os.environ.update(TCM_MLFLOW_URI=TRACKING_URI)
EXPERIMENT = config.get("experiment") or f"tcm-{PRESET}"
STUDY = config.get("study") or f"{PRESET}-study"


def mlflow_env(run_key, stage, grid="main", target=None, artifacts=()):
    """Environment prefix that tags the job's MLflow child run (read by tcm_core.tracking.open_tracker)."""
    tags = {
        "tcm.run_key": run_key,
        "tcm.rule": run_key.split(":", 1)[0],
        "tcm.preset": PRESET,
        "tcm.stage": stage,
        "tcm.grid": grid,
        "tcm.study": STUDY,
    }
    if target:
        tags["tcm.target_run_key"] = target
    env = f"TCM_MLFLOW_TAGS={shlex.quote(json.dumps(tags, sort_keys=True))}"
    if artifacts:
        env += f" TCM_MLFLOW_ARTIFACTS={shlex.quote(json.dumps(list(artifacts)))}"
    return env


# ---------------------------------------------------------------------------------------------
# Ablation grid: one Paramspace of the DISTINCT Stage-2 configurations of every grid (the baseline,
# shared by all grids, appears once). All points start from the one Stage-1 checkpoint.

ABLATION_COLUMNS = ["t_prime", "rho", "w_b", "student_sigma", "student_nu"]


def ablation_frame(p):
    s2 = p["stage2"]
    ab = p["ablation"]
    base = {k: float(s2[k]) for k in ABLATION_COLUMNS}
    rows = [dict(base)]
    rows += [{**base, "t_prime": float(t)} for t in ab.get("t_prime", [])]
    rows += [
        {**base, "rho": float(r), "w_b": float(w)}
        for r in ab.get("rho", [])
        for w in ab.get("w_b", [])
    ]
    rows += [
        {**base, "student_sigma": float(s), "student_nu": float(n)}
        for s, n in ab.get("sigma_nu", [])
    ]
    if not (ab.get("t_prime") or ab.get("rho") or ab.get("w_b") or ab.get("sigma_nu")):
        rows = []
    frame = pd.DataFrame(rows, columns=ABLATION_COLUMNS, dtype=float)
    return frame.drop_duplicates(ignore_index=True)


ABLATION = Paramspace(ablation_frame(P), single_wildcard="cfg")
ABLATION_RUNS = [f"stage2/ablation/{cfg}" for cfg in ABLATION.instance_patterns]


# ---------------------------------------------------------------------------------------------
# Paths


def dataset_path(wildcards=None):
    return P["dataset"].get("path") or f"{RESULTS}/data/dataset.zip"


def feature_net_path(wildcards=None):
    return f"{RESULTS}/data/lenet.pt" if EVAL["extractor"] == "lenet" else []


def ref_stats_path(wildcards=None):
    return f"{RESULTS}/data/ref_stats_{EVAL['extractor']}.npz"


def init_checkpoint(wildcards=None):
    """The checkpoint Stage 1 starts from."""
    init = P["init"]
    if init["kind"] == "pretrain":
        return f"{RESULTS}/pretrain/network.safetensors"
    if init["kind"] == "path":
        return init["path"]
    return f"resources/checkpoints/{init_file_name()}"


def init_file_name():
    init = P["init"]
    if init.get("name"):
        return init["name"]
    return Path(init["url"]).name or "checkpoint"


def stage1_network(wildcards=None):
    if P["init"].get("provides") == "stage1":
        return init_checkpoint()  # e.g. ECM-XL: already a consistency model
    return f"{RESULTS}/stage1/network.safetensors"


def stage1_state(wildcards=None):
    """Stage 1's final training state (the control's start); none for a foreign Stage-1 checkpoint."""
    if P["init"].get("provides") == "stage1":
        return []
    return f"{RESULTS}/stage1/train_state.pt"


def control_state_args(wildcards, input):
    return f"--init-state {input.state}" if input.get("state") else ""


def network_of(run):
    """Network file of a run folder name (stage1, stage1_continued, stage2/main, stage2/ablation/...)."""
    if run == "stage1":
        return stage1_network()
    return f"{RESULTS}/{run}/network.safetensors"


def verified(path, sha256=None):
    """A download: Snakemake checks the sha256 when it is pinned (fetch verifies it too), else non-empty."""
    return ensure(path, sha256=sha256) if sha256 else ensure(path, non_empty=True)


def weights(path):
    return protected(path) if P.get("protect_weights") else path


def train_outputs(run_dir):
    return {
        "ckpt": weights(f"{run_dir}/network.safetensors"),
        "meta": f"{run_dir}/network.json",
        "config": f"{run_dir}/config.json",
    }


# ---------------------------------------------------------------------------------------------
# Command-line pieces


def _yaml_value(value):
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def train_keys(section, extra=None):
    keys = merged_section(P, section)
    keys.update(extra or {})
    return keys


def format_overrides(keys):
    """`key=value` arguments for `python -m tcm_core train` (values in YAML, shell-quoted)."""
    return " ".join(shlex.quote(f"{k}={_yaml_value(v)}") for k, v in sorted(keys.items()))


def stage2_extra(run):
    """Ablation points override the Stage-2 section with their factor values and the ablation batch."""
    if run == "main":
        return {}
    point = ABLATION.instance({"cfg": run[len("ablation/") :]})
    extra = {k: float(v) for k, v in point.items()}
    extra.update(batch=ABL["batch"], iterations=ABL["iterations"])
    return extra


def state_dir(run, keys, *inputs):
    """Mid-run state folder outside the declared outputs; keyed by the settings, so a killed job
    resumes and a job whose settings or inputs changed starts afresh."""
    digest = hashlib.sha256(
        json.dumps([keys, [str(i) for i in inputs]], sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    return f"{RESULTS}/_state/{run}/{digest}"


def launcher(wildcards, resources):
    """`torchrun` inside the job when it holds several GPUs, else plain python."""
    if resources.gpu > 1:
        return f"torchrun --standalone --nproc_per_node {resources.gpu} -m"
    return "python -m"


def periodic_eval_args(wildcards=None):
    if not EVAL.get("every"):
        return ""
    args = f"--eval-ref-stats {ref_stats_path()} --eval-extractor {EVAL['extractor']}"
    if EVAL["extractor"] == "lenet":
        args += f" --eval-feature-net {feature_net_path()}"
    return args


def periodic_eval_inputs(wildcards=None):
    if not EVAL.get("every"):
        return []
    return [ref_stats_path()] + ([feature_net_path()] if EVAL["extractor"] == "lenet" else [])


def res(kind, key):
    return P["resources"][kind][key]


def feature_args(wildcards=None):
    args = f"--extractor {EVAL['extractor']}"
    if EVAL["extractor"] == "lenet":
        args += f" --feature-net {feature_net_path()}"
    return args


def fid_steps(steps):
    return "80" if steps == "1step" else f"80,{EVAL['mid_t']}"


def is_ablation(run):
    return run.startswith("stage2/ablation/")


def eval_num(wildcards):
    return ABL.get("eval_num", EVAL["num"]) if is_ablation(wildcards.run) else EVAL["num"]


def eval_seeds(wildcards):
    return ABL.get("eval_seeds", EVAL["seeds"]) if is_ablation(wildcards.run) else EVAL["seeds"]


def train_run_key(run):
    """Deterministic run key (rule + wildcards) of the training job that produced `run`."""
    if run == "stage1" and P["init"].get("provides") == "stage1":
        return f"init:{PRESET}"
    rule_name = run.split("/", 1)[0]
    return f"{rule_name}:{PRESET}:{run}"


def grid_of(run):
    return "ablation" if is_ablation(run) else "main"


# ---------------------------------------------------------------------------------------------
# Targets


def main_runs():
    runs = ["stage1", "stage1_continued", "stage2/main"]
    return runs


def main_targets():
    out = []
    for run in main_runs():
        out += [f"{RESULTS}/{run}/eval/fid_{s}.json" for s in ("1step", "2step")]
        out += [f"{RESULTS}/{run}/eval/{sweep}.json" for sweep in dfid_sweeps()]
        out += [f"{RESULTS}/{run}/eval/grid_{s}.png" for s in ("1step", "2step")]
    return out


def dfid_sweeps():
    return ["dfid"] + (["dfid_wide"] if EVAL.get("dfid_ts_wide") else [])


def ablation_targets():
    runs = list(ABLATION_RUNS)
    if 3 in ABL.get("stages", []):
        runs.append("stage3/main")
    return [f"{RESULTS}/{run}/eval/fid_{s}.json" for run in runs for s in ("1step", "2step")]


# ---------------------------------------------------------------------------------------------
# Per-rule params (functions of the job's wildcards; no lambdas inside rules)


def _fill(template, wildcards):
    return template.format(**dict(wildcards.items()))


def section_keys(section, wildcards):
    extra = stage2_extra(wildcards.run) if section == "stage2" else {}
    if section == "stage1_continued" and P["init"].get("provides") == "stage1":
        extra = {
            "control": "ema_restart"
        }  # no Stage-1 training state exists: the named, visible variant
    return train_keys(section, extra)


def run_key_for(rule_name, run_template):
    def run_key(wildcards):
        return f"{rule_name}:{PRESET}:{_fill(run_template, wildcards)}"

    return run_key


def train_env(rule_name, run_template, stage):
    def env(wildcards):
        run = _fill(run_template, wildcards)
        return mlflow_env(f"{rule_name}:{PRESET}:{run}", stage, grid_of(run))

    return env


def train_overrides(section):
    def overrides(wildcards):
        return format_overrides(section_keys(section, wildcards))

    return overrides


def train_state(section, run_template):
    def state(wildcards):
        return state_dir(_fill(run_template, wildcards), section_keys(section, wildcards))

    return state


def state_guard(section, run_template, input_names):
    """Shell snippet run before training: a state saved while the job's input checkpoints were
    different files (an upstream job reran) is discarded instead of resumed."""

    def guard(wildcards, input):
        folder = state_dir(_fill(run_template, wildcards), section_keys(section, wildcards))
        files = " ".join(shlex.quote(str(input[name])) for name in input_names)
        stamp = f"$(stat -L -c '%n %s %Y' {files} | tr '\\n' ' ')"
        return (
            f'S={folder} && mkdir -p "$S" && stamp="{stamp}" && '
            'if [ "$(cat "$S/.inputs" 2>/dev/null)" != "$stamp" ]; then '
            'rm -rf "$S" && mkdir -p "$S" && printf %s "$stamp" > "$S/.inputs"; fi'
        )

    return guard


def eval_ckpt(wildcards):
    return network_of(wildcards.run)


def eval_steps(wildcards):
    return fid_steps(wildcards.steps)


def eval_target(wildcards):
    return train_run_key(wildcards.run)


def eval_run_key(rule_name):
    def run_key(wildcards):
        suffix = wildcards.get("steps") or wildcards.get("sweep")
        return f"{rule_name}:{PRESET}:{wildcards.run}:{suffix}"

    return run_key


def eval_env(rule_name):
    def env(wildcards, output):
        suffix = wildcards.get("steps") or wildcards.get("sweep")
        return mlflow_env(
            f"{rule_name}:{PRESET}:{wildcards.run}:{suffix}",
            "eval",
            grid_of(wildcards.run),
            target=train_run_key(wildcards.run),
            artifacts=[str(Path(f).resolve()) for f in output],
        )

    return env


def dfid_ts(wildcards):
    ts = EVAL["dfid_ts"] if wildcards.sweep == "dfid" else EVAL["dfid_ts_wide"]
    return ",".join(f"{float(t):g}" for t in ts)


# ---------------------------------------------------------------------------------------------
# Data and checkpoint sources


def dataset_download_url():
    source = P["dataset"].get("source") or ""
    return source if source.startswith(("http://", "https://")) else None


def dataset_archive_name():
    return Path(dataset_download_url()).name


def dataset_fetch_args():
    args = f"--url {shlex.quote(dataset_download_url())}"
    if P["dataset"].get("sha256"):
        args += f" --sha256 {P['dataset']['sha256']}"
    return args


def dataset_source_input():
    if P["dataset"].get("name") != "cifar10":
        return []
    if dataset_download_url():
        return f"resources/datasets/{dataset_archive_name()}"
    return P["dataset"]["source"]


def prepare_dataset_args(wildcards, input):
    data = P["dataset"]
    if data["name"] == "mnist5k":
        return f"--name mnist5k --resolution {data.get('resolution', 16)}"
    return f"--name cifar10 --source {shlex.quote(str(input.source))}"


def fetch_source_args():
    init = P["init"]
    args = f"--name {init['name']}" if init.get("name") else f"--url {shlex.quote(init['url'])}"
    if init.get("sha256"):
        args += f" --sha256 {init['sha256']}"
    return args
