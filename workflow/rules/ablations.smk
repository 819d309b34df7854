# Ablations. The Stage-2 grid points (t', rho x w_b, (sigma, nu)) are the distinct rows of the
# ABLATION Paramspace (common.smk) and are trained by rule stage2 under stage2/ablation/<point>;
# Table 4's third stage continues from the MAIN Stage-2 run with t' = 4 (stage3 section).


rule stage3:
    input:
        init="results/{preset}/stage2/main/network.safetensors",
        boundary="results/{preset}/stage2/main/network.safetensors",
        data=dataset_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
        periodic=periodic_eval_inputs,
    output:
        **train_outputs("results/{preset}/stage3/main"),
    log:
        "results/{preset}/logs/stage3/main.log",
    conda:
        "../../envs/tcm.yaml"
    threads: res("train", "cpus_per_task")
    resources:
        gpu=res("train", "gpu"),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        cpus_per_task=res("train", "cpus_per_task"),
    params:
        out="results/{preset}/stage3/main",
        run_key=run_key_for("stage3", "stage3/main"),
        env=train_env("stage3", "stage3/main", "stage3"),
        state=train_state("stage3", "stage3/main"),
        guard=state_guard("stage3", "stage3/main", ["init", "boundary"]),
        overrides=train_overrides("stage3"),
        periodic=periodic_eval_args,
        device=P["device"],
        launch=launcher,
    shell:
        "{params.guard} && {params.env} OMP_NUM_THREADS={threads} {params.launch} tcm_core train"
        " --mode stage3 --init {input.init} --boundary-model {input.boundary}"
        " --data {input.data} --out {params.out} --state-dir {params.state}"
        ' --device {params.device} --mlflow-uri "$TCM_MLFLOW_URI" --mlflow-parent {input.mlflow}'
        " --run-key {params.run_key} {params.periodic} --no-progress {params.overrides}"
        " > {log} 2>&1"
