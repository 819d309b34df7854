# Where Stage 1 starts when a published checkpoint exists: fetched once, sha256-verified. (Presets
# without one pretrain their own EDM model: rule pretrain_edm in training.smk.)


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
