"""Released checkpoints (released_tables): the sha256 pin at first use, the missing-file line, a dropped folder,
class-conditioning, and the ci target end to end on a network pickled as NVlabs' persistence code writes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import SENTINEL_SOURCE, write_edm_snapshot

from tcm_core import cli, releases
from tcm_core.errors import ConfigError
from tcm_core.gpu.bench import activate_weights
from tcm_core.io.hashing import recorded_sha256, sha256_file, sha256_sidecar
from tcm_core.networks import arch_preset, build_precond
from tcm_core.presets import read_yaml

REPO = Path(__file__).resolve().parents[1]


def release_net(seed: int = 0, label_dim: int = 10):
    """ci's network (tiny, 16x16, 1 channel), class-conditional, with weights its output depends on."""
    torch.manual_seed(seed)
    return activate_weights(build_precond(arch_preset("tiny", label_dim=label_dim))).eval()


def write_release(path: Path, seed: int = 0, label_dim: int = 10, sentinel: Path | None = None) -> Path:
    """A TCM-style training snapshot of the net, pickled through persistence's _reconstruct_persistent_obj."""
    source = SENTINEL_SOURCE.format(path=str(sentinel)) if sentinel else "# TCM networks source\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_edm_snapshot(release_net(seed, label_dim), path, module_src=source)


def ci_release(folder: Path, **changes) -> releases.Release:
    [release] = releases.release_entries(read_yaml(REPO / "config.yaml")["presets"]["ci"], "presets.ci")
    return releases.Release.from_dict({**release.as_dict(), "folder": str(folder), **changes})


def release_check(release: releases.Release, out: Path) -> int:
    return cli.main(["release-check", "--release", json.dumps(release.as_dict()), "--out", str(out)])


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tcm: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------- pins


def test_first_use_records_the_sha256_and_a_changed_file_is_refused(tmp_path, capsys):
    release = ci_release(tmp_path / "releases")
    path = write_release(release.path)
    assert recorded_sha256(path) is None
    assert release_check(release, tmp_path / "r1.json") == 0
    digest = sha256_file(path)
    assert recorded_sha256(path) == digest and f"recorded sha256 {digest}" in capsys.readouterr().out
    record = json.loads((tmp_path / "r1.json").read_text())
    assert record["sha256_pinned"] == digest and record["sha256_source"] == "recorded at first use"
    assert record["label_dim"] == 10 and record["parameter_count"] > 0 and record["steps"] == [1, 2]
    assert release_check(release, tmp_path / "r2.json") == 0  # the same file again: accepted, record unchanged
    write_release(path, seed=1)  # another network in its place
    assert release_check(release, tmp_path / "r3.json") == 3
    line = _one_line(capsys.readouterr().err)
    assert "checksum mismatch" in line and digest in line and str(path) in line and "recorded in" in line
    assert recorded_sha256(path) == digest and not (tmp_path / "r3.json").exists()
    # every evaluation refuses it too (load_network enforces FILE.sha256)
    assert cli.main(["inspect", str(path)]) == 0  # inspect describes, it does not judge
    from tcm_core.io.network_files import load_network

    with pytest.raises(Exception, match="checksum mismatch"):
        load_network(path)


def test_a_known_sha256_wins_over_the_first_use(tmp_path, capsys):
    release = ci_release(tmp_path / "releases", sha256="0" * 64)
    path = write_release(release.path)
    assert release_check(release, tmp_path / "r.json") == 3
    line = _one_line(capsys.readouterr().err)
    assert "expected sha256 " + "0" * 64 + " (the known sha256)" in line
    assert not sha256_sidecar(path).exists()  # nothing is recorded for a refused file
    right = ci_release(tmp_path / "releases", sha256=sha256_file(path))
    assert release_check(right, tmp_path / "r.json") == 0
    assert json.loads((tmp_path / "r.json").read_text())["sha256_source"] == "registry"


# ---------------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize(("key", "hint"), [
    ("tcm_stage2", "download it from https://drive.google.com/file/d/1M9djFtf03acsmeAlseaOu2Z2AjQDE1Uz/view "
                   "(Google Drive: in a browser)"),
    ("edm_teacher", "(or `python -m tcm_core fetch --name edm-cifar10-uncond-vp --out "),
])
def test_a_missing_release_is_one_line_saying_where_to_put_it_and_where_to_get_it(tmp_path, capsys, key, hint):
    preset = read_yaml(REPO / "config.yaml")["presets"]["cifar10"]
    release = {r.key: r for r in releases.release_entries(preset, "presets.cifar10")}[key]
    release = releases.Release.from_dict({**release.as_dict(), "folder": str(tmp_path / "drop")})
    assert release_check(release, tmp_path / "r.json") == 4
    line = _one_line(capsys.readouterr().err)
    assert f"released checkpoint '{key}'" in line and f"put it at {release.path} " in line and hint in line
    assert line == releases.missing_error(release).line()


def test_the_stand_in_release_says_it_has_no_download(tmp_path, capsys):
    assert release_check(ci_release(tmp_path), tmp_path / "r.json") == 4
    assert releases.NO_DOWNLOAD in _one_line(capsys.readouterr().err)


def test_a_dropped_folder_is_searched_for_the_file(tmp_path):
    release = ci_release(tmp_path / "releases")
    nested = write_release(tmp_path / "releases" / "TCM-drive" / "ci" / release.file)
    assert releases.locate(release) == nested
    write_release(tmp_path / "releases" / "copy" / release.file)
    with pytest.raises(ConfigError, match="2 files named ci-stage2.pkl"):
        releases.locate(release)


def test_a_release_whose_classes_disagree_with_the_config_is_refused(tmp_path, capsys):
    release = ci_release(tmp_path / "releases")
    write_release(release.path, label_dim=0)
    assert release_check(release, tmp_path / "r.json") == 3
    line = _one_line(capsys.readouterr().err)
    assert "label_dim 0" in line and "class-conditional" in line and "class_conditional: false" in line


def test_the_release_pickles_module_source_is_never_run(tmp_path):
    sentinel = tmp_path / "sentinel"
    release = ci_release(tmp_path / "releases")
    write_release(release.path, sentinel=sentinel)
    assert release_check(release, tmp_path / "r.json") == 0
    assert not sentinel.exists() and "torch_utils" not in sys.modules


def test_the_config_check_names_a_bad_release_entry():
    from tcm_core.presets import check_preset

    config = read_yaml(REPO / "config.yaml")
    config["presets"]["ci"]["releases"]["files"]["tcm_stage2"]["paper_row"] = "t9_none"
    with pytest.raises(ConfigError, match="presets.ci.releases.files.tcm_stage2.paper_row"):
        check_preset(config, "ci")


# ---------------------------------------------------------------------------------------------------------- workflow


CI_OVERLAY = """presets:
  ci:
    eval: {seeds: 2}
    releases:
      files:
        tcm_stage2: {mid_t: 0.8}
"""


def _table_rows(md: str) -> dict[tuple[str, str], list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in md.splitlines()
            if line.startswith("| tcm_stage2 ")]
    return {(r[2], r[3]): r for r in rows}


@pytest.mark.slow
def test_ci_released_tables_end_to_end(tmp_path):
    """ci: the test's pickle is pinned, evaluated by the fid/dfid rules (2 seed sets, its own middle time, a class
    per image), tracked in MLflow, tabled beside the paper; a changed file and a missing one stop the run."""
    from workflow_helpers import make_workdir, snakemake, write_overlay

    wd = make_workdir(tmp_path / "wd")
    write_overlay(wd / "overlay.yaml", CI_OVERLAY)
    sentinel = tmp_path / "sentinel"
    path = write_release(wd / "resources" / "releases" / "ci-stage2.pkl", sentinel=sentinel)
    args = ["--cores", "2", "--configfile", "config.yaml", "overlay.yaml", "--config", "preset=ci"]
    snakemake(wd, *args, "--", "released_tables", check=True, timeout=900)
    out = wd / "results" / "ci"
    assert recorded_sha256(path) == sha256_file(path) and not sentinel.exists()
    evals = {n: json.loads((out / "releases" / "tcm_stage2" / "eval" / f"fid_{n}step.json").read_text())
             for n in (1, 2)}
    assert evals[1]["steps"] == [80.0] and evals[2]["steps"] == [80.0, 0.8]  # the release's own middle time
    for record in evals.values():
        assert record["seeds"] == 2 and len(set(record["per_seed"])) == 2
        assert record["min"] == min(record["per_seed"])  # the paper's (EDM's) min over the seed sets
    md = (out / "tables" / "released.md").read_text()
    rows = _table_rows(md)
    for n, paper in ((1, "2.46"), (2, "2.05")):
        row = rows[(str(n), "FID")]
        assert row[4] == paper and row[5] == f"{evals[n]['min']:.2f}", row
        assert row[6] == "—" and row[7] == "n/a (not the paper's metric)", row  # LeNet on MNIST is not the paper's
    dfid = json.loads((out / "releases" / "tcm_stage2" / "eval" / "dfid.json").read_text())
    assert set(dfid["values"]) == {"1", "2"} and ("1", "dFID_t (t = 1)") in rows
    assert "computed by this pipeline from the dataset you provided" in md
    assert (out / "tables" / "released.csv").read_text().startswith("kind,release,role,NFE")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`tcm.grid` = 'release'")
    assert {r.data.tags["tcm.run_key"] for r in runs} == {f"{rule}:ci:releases/tcm_stage2:{s}" for rule, s in
                                                          (("fid", "1step"), ("fid", "2step"), ("dfid", "dfid"))}
    fid1 = next(r for r in runs if r.data.tags["tcm.run_key"].endswith(":1step"))
    assert fid1.data.metrics["fid_1step"] == pytest.approx(evals[1]["min"]) and fid1.info.status == "FINISHED"

    write_release(path, seed=3)  # a changed file: refused by release_check (exit 3), before any evaluation
    proc = snakemake(wd, *args, "--", "released_tables", timeout=600)
    log = (out / "logs" / "release_check" / "tcm_stage2.log").read_text()
    assert proc.returncode != 0 and "tcm: error: checksum mismatch" in log, proc.stderr[-2000:]

    path.unlink()  # a missing file: the one line, before any job runs; a dry run still plans
    proc = snakemake(wd, *args, "--", "released_tables", timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and releases.missing_error(ci_release(Path("resources/releases"))).line() in text
    assert snakemake(wd, "-n", *args, "--", "released_tables", timeout=600).returncode == 0
