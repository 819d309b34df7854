# Evaluations of a trained network (any run folder) or of a released checkpoint (releases/<key>, after
# release_check pinned it): 1- and 2-step FID, dFID sweeps, sample grids. Each is an MLflow child run,
# tagged with the training run it evaluates (tcm.target_run_key; none for a release, tcm.grid release).


rule fid:
    input:
        ckpt=eval_ckpt,
        release=eval_release_record,
        ref=ref_stats_path,
        feature_net=feature_net_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        json="results/{preset}/{run}/eval/fid_{steps}.json",
    log:
        "results/{preset}/logs/fid/{run}/{steps}.log",
    conda:
        "../../envs/tcm.yaml"
    threads: res("eval", "cpus_per_task")
    resources:
        gpu=min(1, res("eval", "gpu")),
        mem_mb=res("eval", "mem_mb"),
        runtime=res("eval", "runtime"),
        cpus_per_task=res("eval", "cpus_per_task"),
    params:
        command=fid_params,
        env=eval_env("fid"),
    shell:
        "{params.env} OMP_NUM_THREADS={threads} python -m tcm_core evaluate {params.command} > {log} 2>&1"


rule mid_t_sweep:
    """The 2-step FID at each middle time of eval.mid_t_sweep (those at or above a truncated network's t') and
    the best (tcm_core.evaluation.mid_t_sweep): paper_tables' sweep table and figure."""
    input:
        ckpt=eval_ckpt,
        ref=ref_stats_path,
        feature_net=feature_net_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        json="results/{preset}/{run}/eval/fid_2step_sweep.json",
    log:
        "results/{preset}/logs/mid_t_sweep/{run}.log",
    conda:
        "../../envs/tcm.yaml"
    threads: res("eval", "cpus_per_task")
    resources:
        gpu=min(1, res("eval", "gpu")),
        mem_mb=res("eval", "mem_mb"),
        runtime=res("eval", "runtime"),
        cpus_per_task=res("eval", "cpus_per_task"),
    params:
        mid_ts=",".join(f"{t:g}" for t in EVAL.get("mid_t_sweep", [])),
        num=eval_num,
        seeds=eval_seeds,
        features=feature_args,
        device=P["device"],
        tracking=eval_tracking("mid_t_sweep"),
        env=eval_env("mid_t_sweep"),
    shell:
        "{params.env} OMP_NUM_THREADS={threads} python -m tcm_core evaluate mid-t-sweep --ckpt {input.ckpt}"
        " --mid-ts {params.mid_ts} --num {params.num} --seeds {params.seeds} {params.features}"
        " --ref-stats {input.ref} --out {output.json} --device {params.device}"
        " {params.tracking} > {log} 2>&1"


rule dfid:
    input:
        ckpt=eval_ckpt,
        release=eval_release_record,
        data=dataset_path,
        ref=ref_stats_path,
        feature_net=feature_net_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        json="results/{preset}/{run}/eval/{sweep}.json",
    log:
        "results/{preset}/logs/dfid/{run}/{sweep}.log",
    conda:
        "../../envs/tcm.yaml"
    threads: res("eval", "cpus_per_task")
    resources:
        gpu=min(1, res("eval", "gpu")),
        mem_mb=res("eval", "mem_mb"),
        runtime=res("eval", "runtime"),
        cpus_per_task=res("eval", "cpus_per_task"),
    params:
        command=dfid_params,
        env=eval_env("dfid"),
    shell:
        "{params.env} OMP_NUM_THREADS={threads} python -m tcm_core evaluate {params.command} > {log} 2>&1"


rule sample_grid:
    input:
        ckpt=eval_ckpt,
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        png=grid_report("results/{preset}/{run}/eval/grid_{steps}.png", "{steps}"),
    log:
        "results/{preset}/logs/sample_grid/{run}/{steps}.log",
    conda:
        "../../envs/tcm.yaml"
    threads: res("eval", "cpus_per_task")
    resources:
        gpu=min(1, res("eval", "gpu")),
        mem_mb=res("eval", "mem_mb"),
        runtime=res("eval", "runtime"),
        cpus_per_task=res("eval", "cpus_per_task"),
    params:
        command=grid_params,
        env=eval_env("sample_grid"),
    shell:
        "{params.env} OMP_NUM_THREADS={threads} python -m tcm_core evaluate {params.command} > {log} 2>&1"


rule evaluate_network:
    """Every evaluation `all` reads of a main network (network_evaluations: 1- and 2-step FID, their grids, the
    dFID sweeps) in one job: `evaluate many` runs each evaluation's own command in one process, so torch and
    MLflow start once, not six times. The outputs, MLflow child runs and run keys are those of the separate
    rules (fid, sample_grid, dfid), which still evaluate every other network and any single file asked for.
    """
    input:
        ckpt=eval_ckpt,
        data=dataset_path,
        ref=ref_stats_path,
        feature_net=feature_net_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        **network_eval_outputs(),
    log:
        "results/{preset}/logs/evaluate_network/{run}.log",
    wildcard_constraints:
        run="|".join(main_runs()),
    conda:
        "../../envs/tcm.yaml"
    threads: res("eval", "cpus_per_task")
    resources:
        gpu=min(1, res("eval", "gpu")),
        mem_mb=res("eval", "mem_mb"),
        runtime=res("eval", "runtime") * len(network_evaluations()),  # the separate jobs' time, in turn
        cpus_per_task=res("eval", "cpus_per_task"),
    params:
        each=network_each,
        env=network_eval_env,
    shell:
        "{params.env} OMP_NUM_THREADS={threads} python -m tcm_core evaluate many {params.each} > {log} 2>&1"


ruleorder: evaluate_network > fid
ruleorder: evaluate_network > dfid
ruleorder: evaluate_network > sample_grid


if DISTILL_RUNS:

    use rule evaluate_network as evaluate_distill_network with:
        output:
            **network_eval_outputs("distill"),
        log:
            "results/{preset}/logs/evaluate_distill_network/{run}.log",
        wildcard_constraints:
            run="|".join(DISTILL_RUNS),
        resources:
            gpu=min(1, res("eval", "gpu")),
            mem_mb=res("eval", "mem_mb"),
            runtime=res("eval", "runtime") * len(network_evaluations("distill")),
            cpus_per_task=res("eval", "cpus_per_task"),

    ruleorder: evaluate_distill_network > fid
    ruleorder: evaluate_distill_network > sample_grid
