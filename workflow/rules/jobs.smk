# How each job is called: the command lines passed to `python -m tcm_core`. One builder renders every
# training rule's command (train_params / TRAIN_SHELL); the keys of each job come from tcm_core.presets.

import hashlib
import json
import shlex
import types

import yaml

from tcm_core.schedules import T_MAX


def yaml_value(value):
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def format_overrides(keys):
    """`key=value` arguments for `python -m tcm_core train` (values in YAML, shell-quoted)."""
    return " ".join(shlex.quote(f"{k}={yaml_value(v)}") for k, v in sorted(keys.items()))


def fill(template, wildcards):
    return template.format(**dict(wildcards.items()))


def mlflow_env(run_key, stage, grid="main", target=None, artifacts=()):
    """Environment prefix that tags the job's MLflow child run (read by tcm_core.tracking.tracker.open_tracker);
    run_key None: the tags every run of an `evaluate many` job shares (each adds its own run key and rule).
    """
    tags = {} if run_key is None else {"tcm.run_key": run_key, "tcm.rule": run_key.split(":", 1)[0]}
    tags |= {
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


def tracking_args(run_key, mlflow_record):
    return (
        f'--mlflow-uri "$TCM_MLFLOW_URI" --mlflow-parent {shlex.quote(str(mlflow_record))}'
        f" --run-key {shlex.quote(run_key)}"
    )


# ---------------------------------------------------------------------------------------------
# Training jobs


def train_keys(mode, run):
    """The TrainConfig keys of one training job (training seed j of a run folder R/seed~j: seed + j), as
    tcm_core.presets resolves them."""
    base, seed_index = presets.split_seed(run)
    distill = grid_of(base) == "distill"
    if distill:
        keys = presets.section_keys(P, mode, "distill")
    elif mode == "stage2" and is_ablation(base):
        point = ABLATION.instance({"cfg": base[len("stage2/ablation/") :]})
        keys = presets.ablation_keys(P, point)
    elif mode == "stage2" and base in INTERMEDIATE_STAGE2_RUNS:
        keys = presets.intermediate_stage2_keys(P)  # the grid centre's: its default Stage 2
    else:
        keys = presets.section_keys(P, mode)
    if mode in ("stage1_continued", "intermediate") and FOREIGN_STAGE1:
        keys["control"] = (
            "ema_restart"  # no Stage-1 training state exists: the named, visible variant
        )
    # the CD arm's extra seeds: claim S5 reads their final FIDs only
    return presets.seeded_keys(keys, seed_index, curves=not distill)


def state_dir(run, keys):
    """Mid-run state folder outside the declared outputs, keyed by the settings: a killed job resumes,
    a job whose settings changed starts afresh (train discards a state whose input files changed).
    """
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{RESULTS}/_state/{run}/{digest}"


def train_cpus(alone):
    """Cores of a training job: one that runs alone in the DAG (pretraining, Stage 1) takes cpus_per_task;
    one that runs beside another (the control and Stage 2, ablation cells) takes parallel_cpus."""
    train = P["resources"]["train"]
    return train["cpus_per_task"] if alone else train.get("parallel_cpus", train["cpus_per_task"])


def train_nodes():
    """Nodes of each training job: TCM_SLURM_TRAIN_NODES when set, else the preset's resources.train.nodes."""
    try:
        return presets.train_nodes(P, os.environ.get("TCM_SLURM_TRAIN_NODES"))
    except ConfigError as error:
        raise WorkflowError(error.line()) from None


def train_resources(alone):
    """A training job's request. gpu is the job's total (sbatch --gpus): resources.train.gpu on each node;
    mem_mb and cpus_per_task are per node. Several nodes: one SLURM task per node, and `mpi` makes the
    SLURM plugin run the rule's shell as it is (the launcher calls srun); tasks_per_gpu=0 stops the
    plugin from turning `tasks` into --ntasks-per-gpu."""
    nodes = train_nodes()
    out = {
        "gpu": res("train", "gpu") * nodes,
        "nodes": nodes,
        "mem_mb": res("train", "mem_mb"),
        "runtime": res("train", "runtime"),
        "cpus_per_task": train_cpus(alone),
    }
    if nodes > 1:
        out.update(tasks=nodes, tasks_per_gpu=0, mpi="srun")
    return out


# per job: two jobs sharing a first node do not collide
RDZV_PORT = "$((29400 + SLURM_JOB_ID % 1000))"


def launcher(wildcards, resources):
    """How a training job starts: plain python (one process), `torchrun --standalone` (one node, several
    GPUs), or, on several nodes, srun starting one torchrun per node that meet in a c10d rendezvous on
    the job's first host. `"$@"` is the `tcm_core train ...` that TRAIN_SHELL appends."""
    try:
        per_node = presets.processes_per_node(resources.gpu, resources.nodes)
    except ConfigError as error:
        raise WorkflowError(error.line()) from None
    if resources.nodes == 1:
        if resources.gpu > 1:
            return f"torchrun --standalone --nproc_per_node {resources.gpu} -m"
        return "python -m"
    first_host = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    torchrun = (
        f"exec torchrun --nnodes=$SLURM_NNODES --nproc_per_node={per_node} --rdzv_backend=c10d"
        f' --rdzv_endpoint={first_host}:{RDZV_PORT} --rdzv_id=$SLURM_JOB_ID -m "$@"'
    )
    return (
        f"srun --nodes={resources.nodes} --ntasks-per-node=1 --cpus-per-task={resources.cpus_per_task}"
        f" --kill-on-bad-exit=1 bash -c {shlex.quote(torchrun)} torchrun-node"
    )


def periodic_eval_on(mode):
    """Periodic FID/dFID during the consistency stages (never pretraining: no 1-step generator yet)."""
    return mode != "pretrain" and bool(EVAL.get("every") or EVAL.get("points"))


def periodic_eval_inputs(wildcards=None):
    if not periodic_eval_on("stage1"):
        return []
    return [ref_stats_path()] + ([feature_net_path()] if EVAL["extractor"] == "lenet" else [])


def periodic_eval_args(mode):
    if not periodic_eval_on(mode):
        return ""
    args = f"--eval-ref-stats {ref_stats_path()} --eval-extractor {EVAL['extractor']}"
    if EVAL["extractor"] == "lenet":
        args += f" --eval-feature-net {feature_net_path()}"
    return args


def train_run_key(run):
    """Deterministic run key (rule + wildcards) of the training job that produced `run`."""
    if run == "stage1" and FOREIGN_STAGE1:
        return f"init:{PRESET}"
    if run.startswith("distill/"):  # cd_<stage>, also for its training seeds distill/<stage>/seed~j
        return f"cd_{presets.split_seed(run)[0].split('/', 1)[1]}:{PRESET}:{run}"
    if run.startswith("intermediate/"):  # its two rules: the fine-tuning and the Stage-2 variants
        finetune = presets.split_seed(run)[0] == INTERMEDIATE["finetune"]
        return f"{'intermediate' if finetune else 'intermediate_stage2'}:{PRESET}:{run}"
    rule_name = {"pretrain": "pretrain_edm"}.get(run, run.split("/", 1)[0])
    return f"{rule_name}:{PRESET}:{run}"


def train_files(mode, run_template):
    """The file arguments of a training rule's `tcm_core train` (a params function of input and output)."""

    def files(wildcards, input, output):
        run = fill(run_template, wildcards)
        parts = [f"--data {input.data}", f"--out {RESULTS}/{run}"]
        for flag, value in (
            ("--init", input.get("init")),
            ("--boundary-model", input.get("boundary")),
            ("--init-state", input.get("state")),
            ("--final-state", output.get("state")),
            ("--teacher", input.get("teacher")),
        ):
            if value:
                parts.append(f"{flag} {shlex.quote(str(value))}")
        return " ".join(parts + [tracking_args(train_run_key(run), input.mlflow)])

    return files


def train_settings(mode, run_template):
    """Everything else of the command, from the wildcards alone: Snakemake reruns a job when these change
    (params derived from input/output files are not compared)."""

    def settings(wildcards):
        run = fill(run_template, wildcards)
        keys = train_keys(mode, run)
        parts = [f"--mode {mode}", f"--state-dir {state_dir(run, keys)}", f"--device {P['device']}"]
        return " ".join(p for p in parts + [periodic_eval_args(mode), format_overrides(keys)] if p)

    return settings


def train_params(mode, run_template):
    """params of every training rule: the MLflow tags, the launcher, the file arguments and the settings."""

    def env(wildcards):
        run = fill(run_template, wildcards)
        return mlflow_env(train_run_key(run), mode, grid_of(run))

    return {
        "env": env,
        "launch": launcher,
        "files": train_files(mode, run_template),
        "settings": train_settings(mode, run_template),
    }


TRAIN_SHELL = (
    "{params.env} OMP_NUM_THREADS={threads} {params.launch} tcm_core train {params.settings} {params.files}"
    " > {log} 2>&1"
)


# ---------------------------------------------------------------------------------------------
# Evaluation jobs


def feature_args(wildcards=None):
    args = f"--extractor {EVAL['extractor']}"
    if EVAL["extractor"] == "lenet":
        args += f" --feature-net {feature_net_path()}"
    return args


def eval_steps(wildcards):
    """1 step: T; 2 steps: T, then the middle time (a release's own mid_t, default eval.mid_t: the paper's)."""
    release = release_of(wildcards.run)
    mid_t = release.mid_t if release is not None else EVAL["mid_t"]
    return f"{T_MAX:g}" if wildcards.steps == "1step" else f"{T_MAX:g},{mid_t}"


def eval_num(wildcards):
    return ABL.get("eval_num", EVAL["num"]) if ablation_evaluation(wildcards.run) else EVAL["num"]


def eval_seeds(wildcards):
    return (
        ABL.get("eval_seeds", EVAL["seeds"])
        if ablation_evaluation(wildcards.run)
        else EVAL["seeds"]
    )


def eval_ckpt(wildcards):
    """The evaluated network: the run's file, or a release's dropped file (release_file: a missing one stops a
    real run with its line; a dry run plans without it)."""
    release = release_of(wildcards.run)
    return network_of(wildcards.run) if release is None else release_file({"release": release.key})


def eval_release_record(wildcards):
    """A release's record (release_check pins its file before any evaluation reads it); nothing for a run."""
    release = release_of(wildcards.run)
    return release_record(release.key) if release is not None else []


def target_run_key(run):
    """The training run an evaluation is logged on (none for a release)."""
    return None if release_of(run) is not None else train_run_key(run)


def eval_run_key(rule_name, wildcards):
    suffix = getattr(wildcards, "steps", None) or getattr(wildcards, "sweep", None) or "sweep"
    return f"{rule_name}:{PRESET}:{wildcards.run}:{suffix}"


def eval_tracking_args(rule_name, wildcards, mlflow_record):
    target = target_run_key(wildcards.run)
    extra = f" --target-run-key {shlex.quote(target)}" if target else ""
    return tracking_args(eval_run_key(rule_name, wildcards), mlflow_record) + extra


def eval_tracking(rule_name):
    def args(wildcards, input):
        return eval_tracking_args(rule_name, wildcards, input.mlflow)

    return args


def eval_env(rule_name):
    def env(wildcards, output):
        return mlflow_env(
            eval_run_key(rule_name, wildcards),
            "eval",
            grid_of(wildcards.run),
            target=target_run_key(wildcards.run),
            artifacts=[str(Path(f).resolve()) for f in output],
        )

    return env


def network_eval_env(wildcards):
    """The MLflow tags an `evaluate many` job shares: no run key, rule or artifacts (each evaluation has its own)."""
    return mlflow_env(None, "eval", grid_of(wildcards.run), target=target_run_key(wildcards.run))


# The arguments of `python -m tcm_core evaluate fid | dfid | grid`: rendered once here, for the rules that run one
# evaluation (fid, dfid, sample_grid) and for evaluate_network, which runs several in one `evaluate many` job.


def fid_command(wildcards, input, out):
    return (
        f"fid --ckpt {input.ckpt} --steps {eval_steps(wildcards)} --num {eval_num(wildcards)}"
        f" --seeds {eval_seeds(wildcards)} {feature_args()} --ref-stats {input.ref} --out {out}"
        f" --device {P['device']} {eval_tracking_args('fid', wildcards, input.mlflow)}"
    )


def dfid_command(wildcards, input, out):
    return (
        f"dfid --ckpt {input.ckpt} --data {input.data} --ts {dfid_ts(wildcards)} --num {EVAL['dfid_num']}"
        f" {feature_args()} --ref-stats {input.ref} --out {out} --device {P['device']}"
        f" {eval_tracking_args('dfid', wildcards, input.mlflow)}"
    )


def grid_command(wildcards, input, out):
    return (
        f"grid --ckpt {input.ckpt} --steps {eval_steps(wildcards)} --num {EVAL['grid_num']} --seed 0 --out {out}"
        f" --device {P['device']} {eval_tracking_args('sample_grid', wildcards, input.mlflow)}"
    )


def fid_params(wildcards, input, output):
    return fid_command(wildcards, input, output.json)


def dfid_params(wildcards, input, output):
    return dfid_command(wildcards, input, output.json)


def grid_params(wildcards, input, output):
    return grid_command(wildcards, input, output.png)


def network_evaluations(arm="main"):
    """What evaluate_network writes for a main network, {output name: (command, wildcards besides run)}: the
    1- and 2-step FIDs, their sample grids and the dFID sweeps, each the command of its own rule; arm="distill":
    what evaluate_distill_network writes for the distillation arm's (the FIDs and the 1-step grid).
    """
    out = {f"fid_{s}": (fid_command, {"steps": s}) for s in ("1step", "2step")}
    if arm == "distill":
        return out | {"grid_1step": (grid_command, {"steps": "1step"})}
    out |= {f"grid_{s}": (grid_command, {"steps": s}) for s in ("1step", "2step")}
    return out | {sweep: (dfid_command, {"sweep": sweep}) for sweep in dfid_sweeps()}


def grid_report(path, steps):
    """A sample grid as the report shows it (under Samples, per run)."""
    return report(
        path,
        caption="../report/sample_grid.rst",
        category="Samples",
        subcategory="{run}",
        labels={"run": "{run}", "sampling": steps},
    )


def network_eval_outputs(arm="main"):
    out = {}
    for name in network_evaluations(arm):
        if name.startswith("grid_"):
            out[name] = grid_report(
                f"results/{{preset}}/{{run}}/eval/{name}.png", name.removeprefix("grid_")
            )
        else:
            out[name] = f"results/{{preset}}/{{run}}/eval/{name}.json"
    return out


def in_double_quotes(text):
    """`text` as one double-quoted shell word in which only $TCM_MLFLOW_URI (the tracking URI) is expanded."""
    escaped = "".join(f"\\{c}" if c in '\\"`$' else c for c in text)
    uri = "$TCM_MLFLOW_URI"
    escaped = escaped.replace(f"\\{uri}", uri)
    return f'"{escaped}"'


def network_each(wildcards, input, output):
    """`--each '...'` of every evaluation of evaluate_network (or evaluate_distill_network), in the order of
    network_evaluations()."""
    words = []
    arm = "distill" if grid_of(wildcards.run) == "distill" else "main"
    for name, (command, extra) in network_evaluations(arm).items():
        sub = types.SimpleNamespace(run=wildcards.run, **extra)
        words.append(f"--each {in_double_quotes(command(sub, input, getattr(output, name)))}")
    return " ".join(words)


def dfid_ts(wildcards):
    """The times of a dFID sweep; dfid_tprime: the intermediate stage's t' (Stage 2's), before and after it."""
    if wildcards.sweep == "dfid_tprime":
        return f"{CONFIGS['intermediate'].t_prime:g}"
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


def fetch_source_args(source=None):
    """`fetch` arguments of a checkpoint block (default: the init)."""
    source = source or P["init"]
    args = (
        f"--name {source['name']}" if source.get("name") else f"--url {shlex.quote(source['url'])}"
    )
    if source.get("sha256"):
        args += f" --sha256 {source['sha256']}"
    return args


# ---------------------------------------------------------------------------------------------
# The teacher of consistency distillation (method cd): the preset's `teacher` block


def teacher_checkpoint(wildcards=None):
    """The diffusion model every method-cd job distils."""
    teacher = P.get("teacher") or {}
    if teacher.get("kind") == "pretrain":
        return f"{RESULTS}/pretrain/network.safetensors"
    if teacher.get("kind") == "init":
        return init_checkpoint()
    if teacher.get("kind") == "path":
        return teacher["path"]
    name = teacher["name"] if teacher.get("name") else (Path(teacher["url"]).name or "teacher")
    return f"resources/checkpoints/{name}"


def teacher_fetched():
    """A teacher checkpoint to download that is not the init's own file (that one is fetched already)."""
    if (P.get("teacher") or {}).get("kind") != "checkpoint":
        return False
    return P["init"]["kind"] != "checkpoint" or teacher_checkpoint() != init_checkpoint()


def teacher_input(mode, run_template):
    """Input function of a training rule: the teacher file when the job's method is cd, else nothing."""

    def teacher(wildcards):
        keys = train_keys(mode, fill(run_template, wildcards))
        return teacher_checkpoint() if keys.get("method") == "cd" else []

    return teacher
