# Stage 1 (standard consistency training from the init), the control (Stage 1 continued from its
# final training state for as long as Stage 2 runs, the paper's Fig. 1b), and Stage 2 (TCM) for the
# main run and every distinct ablation point. Mid-run state lives under results/<preset>/_state/
# (outside the declared outputs), so a killed job resumes.


if P["init"].get("provides") != "stage1":

    rule stage1:
        input:
            init=init_checkpoint(),
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
            periodic=periodic_eval_inputs,
        output:
            **train_outputs("results/{preset}/stage1"),
            state=weights("results/{preset}/stage1/train_state.pt"),
        log:
            "results/{preset}/logs/stage1.log",
        conda:
            "../../envs/tcm.yaml"
        threads: res("train", "cpus_per_task")
        resources:
            gpu=res("train", "gpu"),
            mem_mb=res("train", "mem_mb"),
            runtime=res("train", "runtime"),
            cpus_per_task=res("train", "cpus_per_task"),
        params:
            out="results/{preset}/stage1",
            run_key=run_key_for("stage1", "stage1"),
            env=train_env("stage1", "stage1", "stage1"),
            state=train_state("stage1", "stage1"),
            guard=state_guard("stage1", "stage1", ["init"]),
            overrides=train_overrides("stage1"),
            periodic=periodic_eval_args,
            device=P["device"],
            launch=launcher,
        shell:
            "{params.guard} && {params.env} OMP_NUM_THREADS={threads} {params.launch} tcm_core train"
            " --mode stage1 --init {input.init} --final-state {output.state} --data {input.data} --out {params.out}"
            " --state-dir {params.state} --device {params.device} --mlflow-uri"
            ' "$TCM_MLFLOW_URI" --mlflow-parent {input.mlflow} --run-key {params.run_key}'
            " {params.periodic} --no-progress {params.overrides} > {log} 2>&1"


rule stage1_continued:
    input:
        init=stage1_network(),
        state=stage1_state(),
        data=dataset_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
        periodic=periodic_eval_inputs,
    output:
        **train_outputs("results/{preset}/stage1_continued"),
    log:
        "results/{preset}/logs/stage1_continued.log",
    conda:
        "../../envs/tcm.yaml"
    threads: res("train", "cpus_per_task")
    resources:
        gpu=res("train", "gpu"),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        cpus_per_task=res("train", "cpus_per_task"),
    params:
        out="results/{preset}/stage1_continued",
        run_key=run_key_for("stage1_continued", "stage1_continued"),
        env=train_env("stage1_continued", "stage1_continued", "stage1_continued"),
        state=train_state("stage1_continued", "stage1_continued"),
        guard=state_guard("stage1_continued", "stage1_continued", ["init"]),
        overrides=train_overrides("stage1_continued"),
        init_state=control_state_args,
        periodic=periodic_eval_args,
        device=P["device"],
        launch=launcher,
    shell:
        "{params.guard} && {params.env} OMP_NUM_THREADS={threads} {params.launch} tcm_core train"
        " --mode stage1_continued --init {input.init} {params.init_state} --data {input.data} --out {params.out}"
        " --state-dir {params.state} --device {params.device} --mlflow-uri"
        ' "$TCM_MLFLOW_URI" --mlflow-parent {input.mlflow} --run-key {params.run_key}'
        " {params.periodic} --no-progress {params.overrides} > {log} 2>&1"


rule stage2:
    input:
        init=stage1_network(),
        boundary=stage1_network(),
        data=dataset_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
        periodic=periodic_eval_inputs,
    output:
        **train_outputs("results/{preset}/stage2/{run}"),
    log:
        "results/{preset}/logs/stage2/{run}.log",
    wildcard_constraints:
        run="main|ablation/.+",
    conda:
        "../../envs/tcm.yaml"
    threads: res("train", "cpus_per_task")
    resources:
        gpu=res("train", "gpu"),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        cpus_per_task=res("train", "cpus_per_task"),
    params:
        out="results/{preset}/stage2/{run}",
        run_key=run_key_for("stage2", "stage2/{run}"),
        env=train_env("stage2", "stage2/{run}", "stage2"),
        state=train_state("stage2", "stage2/{run}"),
        guard=state_guard("stage2", "stage2/{run}", ["init", "boundary"]),
        overrides=train_overrides("stage2"),
        periodic=periodic_eval_args,
        device=P["device"],
        launch=launcher,
    shell:
        "{params.guard} && {params.env} OMP_NUM_THREADS={threads} {params.launch} tcm_core train"
        " --mode stage2 --init {input.init} --boundary-model {input.boundary}"
        " --data {input.data} --out {params.out} --state-dir {params.state}"
        ' --device {params.device} --mlflow-uri "$TCM_MLFLOW_URI" --mlflow-parent {input.mlflow}'
        " --run-key {params.run_key} {params.periodic} --no-progress {params.overrides}"
        " > {log} 2>&1"
