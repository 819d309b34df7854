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
        steps=eval_steps,
        num=eval_num,
        seeds=eval_seeds,
        features=feature_args,
        device=P["device"],
        tracking=eval_tracking("fid"),
        env=eval_env("fid"),
    shell:
        "{params.env} OMP_NUM_THREADS={threads} python -m tcm_core evaluate fid --ckpt {input.ckpt}"
        " --steps {params.steps} --num {params.num} --seeds {params.seeds} {params.features}"
        " --ref-stats {input.ref} --out {output.json} --device {params.device}"
        " {params.tracking} > {log} 2>&1"


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
        ts=dfid_ts,
        num=EVAL["dfid_num"],
        features=feature_args,
        device=P["device"],
        tracking=eval_tracking("dfid"),
        env=eval_env("dfid"),
    shell:
        "{params.env} OMP_NUM_THREADS={threads} python -m tcm_core evaluate dfid --ckpt {input.ckpt}"
        " --data {input.data} --ts {params.ts} --num {params.num} {params.features}"
        " --ref-stats {input.ref} --out {output.json} --device {params.device}"
        " {params.tracking} > {log} 2>&1"


rule sample_grid:
    input:
        ckpt=eval_ckpt,
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        png=report(
            "results/{preset}/{run}/eval/grid_{steps}.png",
            caption="../report/sample_grid.rst",
            category="Samples",
            subcategory="{run}",
            labels={"run": "{run}", "sampling": "{steps}"},
        ),
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
        steps=eval_steps,
        num=EVAL["grid_num"],
        device=P["device"],
        tracking=eval_tracking("sample_grid"),
        env=eval_env("sample_grid"),
    shell:
        "{params.env} OMP_NUM_THREADS={threads} python -m tcm_core evaluate grid --ckpt {input.ckpt}"
        " --steps {params.steps} --num {params.num} --seed 0 --out {output.png}"
        " --device {params.device} {params.tracking} > {log} 2>&1"
