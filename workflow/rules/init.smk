# Where Stage 1 starts: a published checkpoint (fetched once, sha256-verified) or our own EDM model
# pretrained from scratch (the tiny/ci presets, for which no checkpoint exists).


if P["init"]["kind"] == "checkpoint":

    rule fetch_checkpoint:
        output:
            ckpt=verified(init_checkpoint(), P["init"].get("sha256")),
        log:
            f"logs/fetch_checkpoint/{init_file_name()}.log",
        retries: 3
        localrule: True
        conda:
            "../../envs/tcm.yaml"
        params:
            source=fetch_source_args(),
        shell:
            "python -m tcm_core fetch {params.source} --out {output.ckpt} > {log} 2>&1"


if P["init"]["kind"] == "pretrain":

    rule pretrain_edm:
        input:
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
        output:
            **train_outputs("results/{preset}/pretrain"),
        log:
            "results/{preset}/logs/pretrain_edm.log",
        conda:
            "../../envs/tcm.yaml"
        threads: res("train", "cpus_per_task")
        resources:
            gpu=res("train", "gpu"),
            mem_mb=res("train", "mem_mb"),
            runtime=res("train", "runtime"),
            cpus_per_task=res("train", "cpus_per_task"),
        params:
            out="results/{preset}/pretrain",
            run_key=run_key_for("pretrain_edm", "pretrain"),
            env=train_env("pretrain_edm", "pretrain", "pretrain"),
            state=train_state("pretrain", "pretrain"),
            overrides=train_overrides("pretrain"),
            device=P["device"],
            launch=launcher,
        shell:
            "{params.env} OMP_NUM_THREADS={threads} {params.launch} tcm_core train --mode pretrain"
            " --data {input.data} --out {params.out} --state-dir {params.state}"
            ' --device {params.device} --mlflow-uri "$TCM_MLFLOW_URI" --mlflow-parent {input.mlflow}'
            " --run-key {params.run_key} --no-progress {params.overrides} > {log} 2>&1"
