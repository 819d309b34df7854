# The consistency-distillation arm (paper App. A, Table 5), planned when the preset has a `distill` block:
# CD Stage 1 from the init, the CD control (CD Stage 1 continued from its final training state for as
# long as Stage 2 runs, as the CT control) and CD Stage 2 (TCM), each distilling the preset's `teacher`
# (method cd: x_s is one PF-ODE step of the frozen teacher, tcm_core.distillation). Same command builder
# (jobs.smk: train_params / TRAIN_SHELL) and rule inheritance as training.smk; runs under
# results/<preset>/distill/<stage> (training seed j > 0 of the control and Stage 2, claim S5:
# results/<preset>/distill/<stage>/seed~j), evaluated by the rules of evaluation.smk.

if teacher_fetched():

    rule fetch_teacher:
        output:
            ckpt=verified(teacher_checkpoint(), P["teacher"].get("sha256")),
        log:
            f"logs/fetch_teacher/{Path(teacher_checkpoint()).name}.log",
        retries: 3
        localrule: True
        conda:
            "../../envs/tcm.yaml"
        params:
            source=fetch_source_args(P["teacher"]),
        shell:
            "python -m tcm_core fetch {params.source} --out {output.ckpt} > {log} 2>&1"


if DISTILL_RUNS:

    use rule stage2 as cd_stage1 with:
        input:
            init=init_checkpoint(),
            teacher=teacher_checkpoint(),
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
            periodic=periodic_eval_inputs,
        output:
            **train_outputs("results/{preset}/distill/stage1"),
            state=weights("results/{preset}/distill/stage1/train_state.pt"),
        log:
            "results/{preset}/logs/distill/stage1.log",
        params:
            **train_params("stage1", "distill/stage1"),

    # {seed}: empty for the run of `all_distillation`; for training seed j (training_seeds) the subfolder
    # seed~j, from the one CD Stage-1 run with seed + j (as the CT control and Stage 2, training.smk).
    use rule stage2 as cd_stage1_continued with:
        input:
            init="results/{preset}/distill/stage1/network.safetensors",
            state="results/{preset}/distill/stage1/train_state.pt",
            teacher=teacher_checkpoint(),
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
            periodic=periodic_eval_inputs,
        output:
            **train_outputs("results/{preset}/distill/stage1_continued{seed}"),
        log:
            "results/{preset}/logs/distill/stage1_continued{seed}.log",
        wildcard_constraints:
            seed="(/seed~[1-9][0-9]*)?",
        params:
            **train_params("stage1_continued", "distill/stage1_continued{seed}"),

    use rule stage2 as cd_stage2 with:
        input:
            init="results/{preset}/distill/stage1/network.safetensors",
            boundary="results/{preset}/distill/stage1/network.safetensors",
            teacher=teacher_checkpoint(),
            data=dataset_path,
            mlflow=ancient("results/{preset}/mlflow.json"),
            periodic=periodic_eval_inputs,
        output:
            **train_outputs("results/{preset}/distill/stage2{seed}"),
        log:
            "results/{preset}/logs/distill/stage2{seed}.log",
        wildcard_constraints:
            seed="(/seed~[1-9][0-9]*)?",
        params:
            **train_params("stage2", "distill/stage2{seed}"),
