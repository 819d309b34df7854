# Training: EDM pretraining (presets without a published checkpoint), Stage 1 (consistency training
# from the init), the control (Stage 1 continued from its final training state for as long as Stage 2
# runs, the paper's Fig. 1b), Stage 2 (TCM) for the main run and every distinct ablation point, and
# Table 4's third stage (from the main Stage-2 run, t' = 4), the intermediate-stage arm (App. B); a job whose method is cd also gets the preset's
# teacher (--teacher). Every rule runs the same command
# (jobs.smk: TRAIN_SHELL); mid-run state lives under results/<preset>/_state/ (outside the declared
# outputs), so a killed job resumes.


rule stage2:
    input:
        init=stage1_network(),
        boundary=stage1_network(),
        teacher=teacher_input("stage2", "stage2/{run}"),
        data=dataset_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
        periodic=periodic_eval_inputs,
    output:
        **train_outputs("results/{preset}/stage2/{run}"),
    log:
        "results/{preset}/logs/stage2/{run}.log",
    wildcard_constraints:
        run="main(/seed~[1-9][0-9]*)?|ablation/.+",
    conda:
        "../../envs/tcm.yaml"
    threads: train_cpus(alone=False)
    resources:
        **train_resources(alone=False),
    params:
        **train_params("stage2", "stage2/{run}"),
    shell:
        TRAIN_SHELL


# {seed}: empty for the run of `all`; for training seed j (training_seeds) the subfolder seed~j, Stage 1's
# state continued with seed + j.
use rule stage2 as stage1_continued with:
    input:
        init=stage1_network(),
        state=stage1_state(),
        teacher=teacher_input("stage1_continued", "stage1_continued"),
        data=dataset_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
        periodic=periodic_eval_inputs,
    output:
        **train_outputs("results/{preset}/stage1_continued{seed}"),
    log:
        "results/{preset}/logs/stage1_continued{seed}.log",
    wildcard_constraints:
        seed="(/seed~[1-9][0-9]*)?",
    params:
        **train_params("stage1_continued", "stage1_continued{seed}"),


use rule stage2 as stage3 with:
    input:
        init="results/{preset}/stage2/main/network.safetensors",
        boundary="results/{preset}/stage2/main/network.safetensors",
        teacher=teacher_input("stage3", "stage3/main"),
        data=dataset_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
        periodic=periodic_eval_inputs,
    output:
        **train_outputs("results/{preset}/stage3/main"),
    log:
        "results/{preset}/logs/stage3/main.log",
    params:
        **train_params("stage3", "stage3/main"),


if INTERMEDIATE:

    # The intermediate stage (paper App. B): Stage 1 continued from its final training state (as the control;
    # control=ema_restart where there is none) for intermediate.iterations, with its times on [t_min, t'). {seed}:
    # empty for the run of `all_ablations`, seed~j for training seed j (the Stage-2 variants of seed j use it).
    use rule stage2 as intermediate with:
        input:
            init=stage1_network(),
            state=stage1_state(),
            teacher=teacher_input("intermediate", INTERMEDIATE["finetune"]),
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
            periodic=periodic_eval_inputs,
        output:
            **train_outputs(f"results/{{preset}}/{INTERMEDIATE['finetune']}{{seed}}"),
        log:
            f"results/{{preset}}/logs/{INTERMEDIATE['finetune']}{{seed}}.log",
        wildcard_constraints:
            seed="(/seed~[1-9][0-9]*)?",
        params:
            **train_params("intermediate", f"{INTERMEDIATE['finetune']}{{seed}}"),

    # Stage 2 with the fine-tuned network as its frozen boundary, from Stage 1's network ({variant} init_stage1)
    # or from the fine-tuned one (init_finetune): the keys of the ablation grid's centre, the default Stage 2
    # it is compared with (tcm_core.presets.intermediate_stage2_keys).
    use rule stage2 as intermediate_stage2 with:
        input:
            init=intermediate_init,
            boundary=f"results/{{preset}}/{INTERMEDIATE['finetune']}{{seed}}/network.safetensors",
            teacher=teacher_input("stage2", "intermediate/stage2_{variant}{seed}"),
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
            periodic=periodic_eval_inputs,
        output:
            **train_outputs("results/{preset}/intermediate/stage2_{variant}{seed}"),
        log:
            "results/{preset}/logs/intermediate/stage2_{variant}{seed}.log",
        wildcard_constraints:
            variant="|".join(presets.INTERMEDIATE_VARIANTS),
            seed="(/seed~[1-9][0-9]*)?",
        params:
            **train_params("stage2", "intermediate/stage2_{variant}{seed}"),


if not FOREIGN_STAGE1:

    use rule stage2 as stage1 with:
        input:
            init=init_checkpoint(),
            teacher=teacher_input("stage1", "stage1"),
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
            periodic=periodic_eval_inputs,
        output:
            **train_outputs("results/{preset}/stage1"),
            state=weights("results/{preset}/stage1/train_state.pt"),
        log:
            "results/{preset}/logs/stage1.log",
        threads: train_cpus(alone=True)
        resources:
            **train_resources(alone=True),
        params:
            **train_params("stage1", "stage1"),


if P["init"]["kind"] == "pretrain":

    use rule stage2 as pretrain_edm with:
        input:
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
        output:
            **train_outputs("results/{preset}/pretrain"),
        log:
            "results/{preset}/logs/pretrain_edm.log",
        threads: train_cpus(alone=True)
        resources:
            **train_resources(alone=True),
        params:
            **train_params("pretrain", "pretrain"),
