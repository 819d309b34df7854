# Released checkpoints (the preset's `releases` block, tcm_core.releases): each is pinned (sha256 at first
# use, a changed file refused) and read without running code by release_check, then evaluated by the fid and
# dfid rules like any run folder (releases/<key>), then released_table writes their FIDs beside the paper's.
# A missing file stops the run before any job with one line saying where to put it and where to get it;
# a dry run plans anyway and names the missing files.


MISSING_NOTED = set()  # the dry run names each missing release once


def release_file(wildcards):
    """The dropped file (release_check's input); a missing one stops a real run here, before any job runs."""
    release = RELEASES[wildcards["release"]]
    try:
        found = releases.locate(release)
    except ConfigError as error:
        raise WorkflowError(error.line()) from None
    if found is not None:
        return str(found)
    line = releases.missing_error(release).line()
    if not workflow.dryrun:
        raise WorkflowError(line)
    if release.key not in MISSING_NOTED:
        MISSING_NOTED.add(release.key)
        print(f"note (dry run, planned anyway): {line}", file=sys.stderr)
    return []


def released_tables_input(wildcards):
    """The target's input: the table, once every release file is in place. The target's input function always
    runs when the target is asked for, so a missing file stops the run here, before any job (Snakemake would
    skip a missing input of a table that exists already); a dry run plans anyway and names the missing files.
    """
    for key in RELEASES:
        release_file({"release": key})
    return [f"{RESULTS}/tables/released.md", f"{RESULTS}/tables/released.csv"]


def release_entry(wildcards):
    return shlex.quote(json.dumps(RELEASES[wildcards.release].as_dict(), sort_keys=True))


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
        folders=" ".join(f"{RESULTS}/{RELEASE_RUN}{key}" for key in RELEASES),
    shell:
        "python -m tcm_core released-tables --preset {wildcards.preset} --releases {params.folders}"
        ' --ref-stats {input.ref} --out {output.md} --tracking-uri "$TCM_MLFLOW_URI"'
        " --mlflow-parent {input.mlflow} 2>&1 | tee {log}"
