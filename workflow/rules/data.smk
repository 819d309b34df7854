# Dataset, LeNet feature network (lenet FID only) and FID reference statistics.


if dataset_download_url():

    rule fetch_dataset:
        output:
            archive=verified(
                f"resources/datasets/{dataset_archive_name()}", P["dataset"].get("sha256")
            ),
        log:
            f"logs/fetch_dataset/{dataset_archive_name()}.log",
        retries: 3
        localrule: True
        conda:
            "../../envs/tcm.yaml"
        params:
            source=dataset_fetch_args(),
        shell:
            "python -m tcm_core fetch {params.source} --out {output.archive} > {log} 2>&1"


if not P["dataset"].get("path"):

    rule prepare_dataset:
        input:
            source=dataset_source_input(),
        output:
            data="results/{preset}/data/dataset.zip",
        log:
            "results/{preset}/logs/prepare_dataset.log",
        conda:
            "../../envs/tcm.yaml"
        threads: res("prepare", "cpus_per_task")
        resources:
            gpu=0,
            mem_mb=res("prepare", "mem_mb"),
            runtime=res("prepare", "runtime"),
            cpus_per_task=res("prepare", "cpus_per_task"),
        params:
            args=prepare_dataset_args,
        shell:
            "python -m tcm_core prepare-dataset {params.args} --out {output.data} > {log} 2>&1"


rule train_feature_net:
    input:
        data=dataset_path,
    output:
        net="results/{preset}/data/lenet.pt",
    log:
        "results/{preset}/logs/train_feature_net.log",
    conda:
        "../../envs/tcm.yaml"
    threads: res("eval", "cpus_per_task")
    resources:
        gpu=min(1, res("eval", "gpu")),
        mem_mb=res("eval", "mem_mb"),
        runtime=res("eval", "runtime"),
        cpus_per_task=res("eval", "cpus_per_task"),
    params:
        epochs=EVAL["feature_net_epochs"],
        device=P["device"],
    shell:
        "OMP_NUM_THREADS={threads} python -m tcm_core train-feature-net --data {input.data}"
        " --out {output.net} --epochs {params.epochs} --device {params.device} > {log} 2>&1"


rule reference_stats:
    input:
        data=dataset_path,
        feature_net=feature_net_path,
    output:
        stats="results/{preset}/data/ref_stats_{extractor}.npz",
    log:
        "results/{preset}/logs/reference_stats_{extractor}.log",
    conda:
        "../../envs/tcm.yaml"
    threads: res("eval", "cpus_per_task")
    resources:
        gpu=min(1, res("eval", "gpu")),
        mem_mb=res("eval", "mem_mb"),
        runtime=res("eval", "runtime"),
        cpus_per_task=res("eval", "cpus_per_task"),
    params:
        features=feature_args,
        device=P["device"],
    shell:
        "OMP_NUM_THREADS={threads} python -m tcm_core reference-stats --data {input.data}"
        " {params.features} --device {params.device} --no-cache"
        " --out {output.stats} > {log} 2>&1"
