# Released checkpoints (the preset's `releases` block, tcm_core.releases): each is pinned (sha256 at first
# use, a changed file refused) and read without running code by release_check, then evaluated by the fid and
# dfid rules like any run folder (releases/<key>), then released_table writes their FIDs beside the paper's.
# A missing file stops the run before any job with one line saying where to put it and where to get it;
# a dry run plans anyway and names the missing files.


rule release_check:
    input:
        release=release_file,
    output:
        record="results/{preset}/releases/{release}/release.json",
    log:
        "results/{preset}/logs/release_check/{release}.log",
    localrule: True
    conda:
        "../../envs/tcm.yaml"
    params:
        entry=release_entry,
    shell:
        "python -m tcm_core release-check --release {params.entry} --out {output.record} > {log} 2>&1"


rule released_table:
    """The releases' FIDs and dFIDs beside the paper's values (tcm_core.report.released)."""
    input:
        records=[release_record(key) for key in RELEASES],
        evaluations=release_targets(),
        ref=ref_stats_path,
        mlflow=ancient("results/{preset}/mlflow.json"),
    output:
        md=report(
            "results/{preset}/tables/released.md",
            caption="../report/released.rst",
            category="Released checkpoints",
            labels={"table": "released", "format": "md"},
        ),
        csv="results/{preset}/tables/released.csv",
    log:
        "results/{preset}/logs/released_table.log",
    localrule: True
    conda:
        "../../envs/tcm.yaml"
    params:
        # each release's folder, from its record (results/<preset>/releases/<key>/release.json)
        folders=lambda wildcards, input: " ".join(os.path.dirname(r) for r in input.records),
    shell:
        "python -m tcm_core released-tables --preset {wildcards.preset} --releases {params.folders}"
        ' --ref-stats {input.ref} --out {output.md} --tracking-uri "$TCM_MLFLOW_URI"'
        " --mlflow-parent {input.mlflow} 2>&1 | tee {log}"
