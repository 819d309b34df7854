"""Fault classes 1, 2 and 4 of the fault suite: hostile configs, a storage that refuses writes, non-finite
training. Every case ends with one line ``tcm: error: <what>, <where>, <todo>`` and its exit code (or is refused
before work starts), leaves no temporary file, and leaves the last good output as it was.

* Storage (class 2) runs the real CLI in a child (``tests/child_limits.py``): "disk full" is RLIMIT_FSIZE (writes
  past it fail with EFBIG, as ENOSPC on a full disk; a real full tmpfs where mount namespaces are allowed), and
  read-only files and folders bind even root because the child drops CAP_DAC_OVERRIDE. All children run in
  parallel, two at a time, from one fixture.
* Config (class 1) and the error path of each command call ``tcm_core.cli.main`` in this process (the real entry
  point; nothing is mocked), so they cost no interpreter start.
* Non-finite training (class 4) runs the CLI in this process too, on micro settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import fault_helpers as fh
import pytest
from training_helpers import MICRO_ARCH, load_weights, make_small_mnist, train_args

from tcm_core import cli
from tcm_core.training.config import build_config
from tcm_core.training.loop import train
from tcm_core.training.state import list_states, load_latest_state, load_state_file, tensors_finite

# the settings of the good run every storage case resumes (equal settings: the state is compatible)
KEYS = {"iterations": 2, "batch": 4, "log_every": 1, "state_every": 2}
STATE_BYTES_AT_LEAST = 1_000_000  # a micro-network state is ~3 MB, its network ~0.7 MB (checked below)


def _overrides(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**KEYS, **extra}.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, an init checkpoint and the state folder of a finished good Stage-1 run (state-000000002.pt)."""
    root = tmp_path_factory.mktemp("faults")
    data = make_small_mnist(root / "d.zip", count=16)
    init = fh.own_checkpoint(root / "init.safetensors")
    state = root / "good_state"
    train(build_config(dict(KEYS), "stage1"), mode="stage1", data=data, out=root / "good", init=init,
          state_dir=state, device="cpu", progress=False)
    assert [it for it, _ in list_states(state)] == [2]
    assert list_states(state)[0][1].stat().st_size > 2 * STATE_BYTES_AT_LEAST
    assert (root / "good" / "network.safetensors").stat().st_size < STATE_BYTES_AT_LEAST
    return SimpleNamespace(root=root, data=data, init=init, state=state)


def _copy_state(world, name: str) -> Path:
    dest = world.root / name
    shutil.copytree(world.state, dest)
    return dest


def _read_only(*paths: Path) -> None:
    for path in paths:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP if path.is_dir() else stat.S_IRUSR)


def _writable(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            path.chmod(0o755 if path.is_dir() else 0o644)


# --------------------------------------------------------------------------------------------------------------
# Class 2: the storage refuses (disk full, read-only folder, read-only MLflow database)


def _train(world, out: Path, state_dir: Path, **extra) -> list[str]:
    return train_args("stage1", world.data, out, *_overrides(**extra), init=world.init,
                      extra=["--state-dir", str(state_dir)])


def _tmpfs_full_disk(world, case: Path) -> tuple[list[str], Path] | None:
    """``unshare -m`` + a 4 MiB tmpfs holding the good state (3 MB): the next state cannot fit (ENOSPC). The
    folder is copied out after the run (the mount namespace ends with it). None where mounting is not allowed."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return None
    q = shlex.quote
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {q(str(case))}"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    mount, after, out = case / "mnt", case / "after", case / "run"
    mount.mkdir()
    after.mkdir()
    inner = shlex.join(map(str, [sys.executable, fh._CHILD, fh.MEMORY_LIMIT, 0, 0, "--",
                                 *_train(world, out, mount, iterations=4)]))
    script = (f"mount -t tmpfs -o size=4m tmpfs {q(str(mount))} && cp -a {q(f'{world.state}/.')} {q(str(mount))}/ "
              f"&& {inner}; rc=$?; cp -a {q(f'{mount}/.')} {q(str(after))}/; exit $rc")
    return ["unshare", "-m", "sh", "-c", script], after


def _storage_cases(world) -> dict[str, dict]:
    """name -> {args (CLI, or a whole command), limits, what the line must name, folders that must not change}."""
    base = world.root / "storage"
    cases: dict[str, dict] = {}

    def case(name: str, **spec) -> Path:
        folder = base / name.replace(" ", "_")
        folder.mkdir(parents=True)
        cases[name] = {"folder": folder, "file_size": 0, "drop_dac": False, "intact": [], **spec}
        return folder

    folder = case("disk full writing a state", fragment="file too large")
    state = _copy_state(world, "s_full")
    cases["disk full writing a state"].update(
        args=_train(world, folder / "run", state, iterations=4), file_size=STATE_BYTES_AT_LEAST,
        names=state / "state-000000004.pt", intact=[state])

    folder = case("disk full writing the network", fragment="file too large")
    state = _copy_state(world, "s_net")  # a job killed after its final state: the rerun only writes the network
    cases["disk full writing the network"].update(
        args=_train(world, folder / "run", state), file_size=500_000, names=folder / "run" / "network.safetensors",
        intact=[state])

    folder = case("read-only output folder", fragment="permission denied", drop_dac=True)
    (folder / "run").mkdir()
    cases["read-only output folder"].update(args=_train(world, folder / "run", folder / "state"),
                                            names=folder / "run" / "config.json", read_only=[folder / "run"])

    folder = case("read-only state folder", fragment="permission denied", drop_dac=True)
    state = _copy_state(world, "s_ro")
    cases["read-only state folder"].update(args=_train(world, folder / "run", state, iterations=4),
                                           names=state / "state-000000004.pt", intact=[state], read_only=[state])

    folder = case("read-only MLflow database", fragment="readonly database", drop_dac=True)
    db, parent = _mlflow_store(folder / "ml")
    cases["read-only MLflow database"].update(
        args=_train(world, folder / "run", folder / "state") + ["--mlflow-uri", f"sqlite:///{db}", "--mlflow-parent",
                                                                 str(parent), "--run-key", "stage1:faults"],
        names=db, intact=[db], read_only=[db], lock=True)  # init_study above left the store's lock file

    folder = case("mlflow-init on a read-only database", fragment="readonly database", drop_dac=True)
    db, _ = _mlflow_store(folder / "ml")
    cases["mlflow-init on a read-only database"].update(
        args=["mlflow-init", "--tracking-uri", f"sqlite:///{db}", "--experiment", "tcm-faults", "--study", "another",
              "--out", str(folder / "out" / "mlflow.json")], names=db, intact=[db], read_only=[db],
        lock=True)  # the store's lock file (mlflow_store.store_lock) stays by design: a concurrent init waits on it

    folder = case("evaluate grid into a read-only folder", fragment="permission denied", drop_dac=True)
    (folder / "out").mkdir()
    cases["evaluate grid into a read-only folder"].update(
        args=["evaluate", "grid", "--ckpt", str(world.init), "--num", "4", "--device", "cpu", "--out",
              str(folder / "out" / "grid.png")], names=folder / "out" / "grid.png", read_only=[folder / "out"])

    folder = case("prepare-dataset on a full disk", fragment="file too large", file_size=200_000)
    cases["prepare-dataset on a full disk"].update(
        args=["prepare-dataset", "--name", "mnist5k", "--out", str(folder / "d.zip")], names=folder / "d.zip")

    folder = case("train-feature-net on a full disk", fragment="file too large", file_size=100_000)
    cases["train-feature-net on a full disk"].update(
        args=["train-feature-net", "--data", str(world.data), "--epochs", "1", "--out", str(folder / "lenet.pt")],
        names=folder / "lenet.pt")

    folder = case("tables into a read-only folder", fragment="permission denied", drop_dac=True)
    (folder / "out").mkdir()
    cases["tables into a read-only folder"].update(
        args=["tables", "--preset", "ci", "--results", str(folder / "none"), "--tracking-uri", "none",
              "--no-figures", "--out", str(folder / "out")], names=folder / "out" / "tables",
        read_only=[folder / "out"])

    folder = case("a real full disk (tmpfs) writing a state", fragment="no space left")
    full = _tmpfs_full_disk(world, folder)
    if full is None:
        del cases["a real full disk (tmpfs) writing a state"]
    else:
        cases["a real full disk (tmpfs) writing a state"].update(
            command=full[0], after=full[1], good_state=world.state, names=folder / "mnt" / "state-000000004.pt")
    return cases


def _mlflow_store(folder: Path) -> tuple[Path, Path]:
    from tcm_core.tracking.mlflow_store import init_study

    folder.mkdir(parents=True)
    db = folder / "mlflow.db"
    record = init_study(f"sqlite:///{db}", "tcm-faults", "faults-study")
    parent = folder / "mlflow.json"
    parent.write_text(json.dumps(record))
    return db, parent


def _digest(path: Path) -> dict[str, str]:
    return fh.digests(path) if path.is_dir() else {path.name: fh.digests(path.parent)[path.name]}


def _run_case(spec: dict) -> subprocess.CompletedProcess:
    if "command" in spec:
        return subprocess.run(spec["command"], cwd=fh.REPO, env=fh._env(), capture_output=True, text=True,
                              timeout=300)
    return fh.run_restricted(spec["args"], file_size=spec["file_size"], drop_dac=spec["drop_dac"])


@pytest.fixture(scope="module")
def storage_runs(world):
    cases = _storage_cases(world)
    before = {name: {str(p): _digest(p) for p in spec["intact"]} for name, spec in cases.items()}
    for spec in cases.values():
        _read_only(*spec.get("read_only", []))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            procs = dict(zip(cases, pool.map(_run_case, cases.values())))
    finally:
        for spec in cases.values():
            _writable(*spec.get("read_only", []))
    return cases, before, procs


STORAGE_CASES = ["disk full writing a state", "disk full writing the network", "read-only output folder",
                 "read-only state folder", "read-only MLflow database", "mlflow-init on a read-only database",
                 "evaluate grid into a read-only folder", "prepare-dataset on a full disk",
                 "train-feature-net on a full disk", "tables into a read-only folder",
                 "a real full disk (tmpfs) writing a state"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STORAGE_CASES)
def test_storage_refusal_is_one_line_exit_5_and_loses_nothing(storage_runs, name):
    cases, before, procs = storage_runs
    if name not in cases:
        pytest.skip("mount namespaces (unshare -m, tmpfs) are not allowed here")
    spec, proc = cases[name], procs[name]
    line = fh.one_error_line(proc.stderr)
    assert proc.returncode == 5, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    assert spec["fragment"] in line and str(spec["names"]) in line, line
    for path in spec["intact"]:
        assert _digest(path) == before[name][str(path)], f"{path} changed"
    checked = spec.get("after", spec["folder"])
    left = [p for p in fh.leftovers(checked) if not (spec.get("lock") and p.endswith("mlflow.db.lock"))]
    assert left == [] and not list(checked.rglob("network.safetensors")), sorted(checked.rglob("*"))
    for path in spec["intact"]:
        if path.is_dir() and list_states(path):
            state = load_latest_state(path)  # the last good state still loads and resumes
            assert state is not None and state["iteration"] == 2
    if "after" in spec:  # the tmpfs, copied out after the run: the good state is there, whole, and nothing else
        assert fh.digests(spec["after"]) == fh.digests(spec["good_state"])


# --------------------------------------------------------------------------------------------------------------
# helpers of the in-process CLI tests


def run_main(capsys, *args: str) -> tuple[int, str]:
    """``tcm_core.cli.main(args)`` in this process: the exit code and its stderr."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def expect_error(capsys, code: int, fragments: tuple[str, ...], *args: str) -> str:
    rc, err = run_main(capsys, *args)
    line = fh.one_error_line(err)
    assert rc == code, f"rc {rc}: {err[-2000:]}"
    assert all(f in line for f in fragments), line
    return line


@contextlib.contextmanager
def no_leftovers(folder: Path):
    yield
    assert fh.leftovers(folder) == []


# --------------------------------------------------------------------------------------------------------------
# Class 1: configs the job would refuse (or run wrongly) are refused before work starts, naming file and line/key


CHECK_CONFIG_CASES = {
    # overlay text -> (exit code, fragments of the one line)
    "a YAML syntax error": ("presets:\n  ci:\n    stage2: {rho: 0.5\n", 2, ("YAML syntax error", "line 4")),
    "a tab in the indentation": ("presets:\n\tci: {}\n", 2, ("YAML syntax error", "line 2")),
    "a key given twice": ("presets:\n  ci:\n    stage2: {lr: 1e-4, lr: 2e-4}\n", 2, ("duplicate key 'lr'", "line 3")),
    "not UTF-8": (b"presets: \xff\xfe\n", 2, ("not UTF-8",)),
    "a list at the top level": ("- preset: ci\n", 2, ("not a mapping",)),
    "nested aliases (a billion laughs)": (
        "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else 'x'] * 10)}]\n" for i in range(9)), 2,
        ("expands to more than",)),
    "an unknown key": ("presets:\n  ci:\n    stage2: {lrr: 1}\n", 2, ("'lrr' was unexpected", "presets.ci.stage2")),
    "a string for a number": ("presets:\n  ci:\n    stage1: {lr: fast}\n", 2, ("presets.ci.stage1.lr",)),
    "a rho without a boundary sample": ("presets:\n  ci:\n    stage2: {rho: 0.05}\n", 2, ("'rho'", "floor(batch")),
    "a time distribution without mass": ("presets:\n  ci:\n    stage1: {p_mean: 700}\n", 2, ("no probability mass",)),
    "a t_max whose square overflows": ("presets:\n  ci:\n    stage2: {t_max: 1.0e+30}\n", 2, ("'t_max'", "float32")),
    "a batch of 1e8": ("presets:\n  ci:\n    stage1: {batch: 100000000}\n", 2, ("'batch'",)),
    "an absurd architecture": ("presets:\n  ci:\n    arch: {preset: tiny, num_blocks: 100000}\n", 2,
                               ("presets.ci.arch", "parameters")),
}


@pytest.mark.parametrize("name", sorted(CHECK_CONFIG_CASES))
def test_check_config_names_the_file_and_line_of_each_problem(tmp_path, capsys, name):
    text, code, fragments = CHECK_CONFIG_CASES[name]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, err = run_main(capsys, "check-config", fh.REPO / "config.yaml", overlay, "--preset", "ci")
    lines = err.strip().splitlines()
    assert rc == code and lines and all(line.startswith(fh.ERROR_PREFIX) for line in lines), err
    assert all(f in lines[0] for f in fragments), lines[0]
    if "YAML" in lines[0] or "duplicate" in lines[0] or "UTF-8" in lines[0]:
        assert str(overlay) in lines[0]


def test_check_config_passes_every_preset_and_reports_each_file(tmp_path, capsys):
    for preset in ("tiny", "ci"):
        rc, err = run_main(capsys, "check-config", fh.REPO / "config.yaml", "--preset", preset)
        assert rc == 0 and err == "", err
    bad = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    bad[0].write_text("presets: [\n")
    bad[1].write_text("x: 1\nx: 2\n")
    rc, err = run_main(capsys, "check-config", fh.REPO / "config.yaml", *bad, tmp_path / "missing.yaml")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 3, err  # one line per problem, each naming its file
    assert all(str(path) in line for path, line in zip([*bad, tmp_path / "missing.yaml"], lines))


TRAIN_CONFIG_CASES = {
    # key=value overrides of `train` -> fragments; all refused before the dataset is opened
    "lr=nan": ("'lr'", "finite"), "lr=.inf": ("'lr'", "finite"), "lr=-1": ("'lr'", "> 0"),
    "batch=100000000": ("'batch'",), "batch=0": ("'batch'",), "iterations=1.5": ("'iterations'",),
    "batch_gpu=3": ("'batch_gpu'", "divisor"), "grid_num=100000000": ("'grid_num'",),
    "eval_num=1": ("'eval_num'",), "c=1e300": ("'c'", "float32"), "t_max=1e300": ("'t_max'",),
    "p_mean=700": ("p_mean, p_std", "no probability mass"), "p_std=1e300": ("no probability mass",),
    "nonfinite=maybe": ("'nonfinite'",), "nonfinite_max_share=1.5": ("'nonfinite_max_share'",),
    "lrr=1": ("unknown key", "'lrr'"), "lr=[1, 2]": ("'lr'",), "seed": ("not key=value",),
    "arch={preset: tiny, model_channels: 1000000}": ("config key 'arch'", "parameters"),
}


@pytest.mark.parametrize("override", sorted(TRAIN_CONFIG_CASES))
def test_train_refuses_a_bad_setting_before_any_work(world, tmp_path, capsys, override):
    out = tmp_path / "run"
    mode = "pretrain" if override.startswith("arch=") else "stage1"
    args = train_args(mode, tmp_path / "no-data-read.zip", out, override,
                      init=None if mode == "pretrain" else world.init)
    expect_error(capsys, 2, TRAIN_CONFIG_CASES[override], *args)
    assert not out.exists()


@pytest.mark.parametrize("text, fragments", [
    ("iterations: 2\nbatch: [4\n", ("YAML syntax error", "line 3")),
    ("iterations: 2\niterations: 3\n", ("duplicate key 'iterations'", "line 2")),
    ("- 1\n", ("not a mapping",)),
])
def test_train_config_file_errors_name_the_file_and_line(world, tmp_path, capsys, text, fragments):
    config = tmp_path / "flat.yaml"
    config.write_text(text)
    args = train_args("stage1", world.data, tmp_path / "run", init=world.init, extra=["--config", str(config)])
    line = expect_error(capsys, 2, fragments, *args)
    assert str(config) in line and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_snakefile_names_the_line_of_a_broken_config_yaml(tmp_path):
    from workflow_helpers import make_workdir, snakemake

    wd = make_workdir(tmp_path / "wf")
    (wd / "config.yaml").write_text((wd / "config.yaml").read_text() + "oops: [1, 2\n")
    proc = snakemake(wd, "-n")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "tcm: error: YAML syntax error" in text, text[-2000:]
    lines = (fh.REPO / "config.yaml").read_text().count("\n")
    assert f"config.yaml line {lines + 2}" in text and not (wd / "results").exists(), text[-2000:]


# --------------------------------------------------------------------------------------------------------------
# Class 2 (files): hostile datasets are one RefusedFileError naming the dataset, before anything is allocated


@pytest.mark.parametrize("kind", sorted(fh.DATASET_KINDS))
def test_hostile_dataset_is_refused_naming_it(tmp_path, kind):
    from tcm_core.data import open_dataset
    from tcm_core.errors import RefusedFileError

    path = fh.hostile_dataset(tmp_path / "d.zip", kind)
    with pytest.raises(RefusedFileError) as error:
        open_dataset(path)
    line = error.value.line()
    assert fh.DATASET_KINDS[kind] in line and str(path) in line and "\n" not in line, line


@pytest.mark.parametrize("kind", ["random bytes", "a PNG claiming 100000x100000 pixels", "a label of 1e9"])
def test_train_on_a_hostile_dataset_is_one_line_and_writes_nothing(world, tmp_path, capsys, kind):
    data = fh.hostile_dataset(tmp_path / "d.zip", kind)
    out = tmp_path / "run"
    line = expect_error(capsys, 3, (fh.DATASET_KINDS[kind], str(data)),
                        *train_args("stage1", data, out, *_overrides(), init=world.init))
    assert line and not (out / "network.safetensors").exists() and fh.leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------
# One error path for every command: expected failures end in one line and their exit code


@pytest.fixture(scope="module")
def eval_world(world):
    """A LeNet feature net and reference statistics of the test dataset (the evaluation commands' inputs)."""
    from tcm_core.evaluation.commands import compute_reference_stats, save_ref_stats
    from tcm_core.evaluation.features import load_extractor, train_feature_net

    root = world.root / "eval"
    lenet = root / "lenet.pt"
    train_feature_net(world.data, lenet, epochs=1, batch=16, log=None)
    stats = root / "stats.npz"
    save_ref_stats(stats, compute_reference_stats(world.data, load_extractor("lenet", lenet), progress=False))
    other = root / "other.npz"
    import numpy as np

    np.savez(other, mu=np.zeros(7), sigma=np.eye(7))
    corrupt = root / "corrupt.npz"
    corrupt.write_bytes(stats.read_bytes()[:200])
    bad_lenet = root / "bad-lenet.pt"
    bad_lenet.write_bytes(b"\x00" * 64)
    unlabelled = fh.dataset_zip(root / "unlabelled.zip", fh.images(8))
    return SimpleNamespace(lenet=lenet, stats=stats, other=other, corrupt=corrupt, bad_lenet=bad_lenet,
                           unlabelled=unlabelled)


def _command_cases(world, ev, tmp: Path) -> dict[str, tuple[list, int, tuple[str, ...]]]:
    """name -> (arguments, exit code, fragments of the line); built lazily from the fixtures."""
    fid = ["evaluate", "fid", "--ckpt", world.init, "--num", "8", "--extractor", "lenet", "--feature-net", ev.lenet,
           "--ref-stats", ev.stats, "--device", "cpu", "--no-progress", "--out", tmp / "fid.json"]
    dfid = ["evaluate", "dfid", "--ckpt", world.init, "--data", world.data, "--num", "8", "--extractor", "lenet",
            "--feature-net", ev.lenet, "--ref-stats", ev.stats, "--device", "cpu", "--no-progress",
            "--out", tmp / "dfid.json"]

    def swap(args: list, flag: str, value: object) -> list:
        out = list(args)
        out[out.index(flag) + 1] = value
        return out

    random_zip = fh.hostile_dataset(tmp / "random.zip", "random bytes")
    random_tar = tmp / "cifar-10-python.tar.gz"
    random_tar.write_bytes(os.urandom(512))
    return {
        "fid: no checkpoint": (swap(fid, "--ckpt", tmp / "none.safetensors"), 4, ("no such checkpoint",)),
        "fid: --num 1": (swap(fid, "--num", 1), 2, ("--num",)),
        "fid: --steps 80,x": (fid + ["--steps", "80,x"], 2, ("--steps",)),
        "fid: --batch 0": (fid + ["--batch", "0"], 2, ("--batch",)),
        "fid: a feature net of zeros": (swap(fid, "--feature-net", ev.bad_lenet), 3, (str(ev.bad_lenet),)),
        "fid: no feature net": (swap(fid, "--feature-net", tmp / "none.pt"), 4, ("feature net not found",)),
        "fid: torn reference statistics": (swap(fid, "--ref-stats", ev.corrupt), 3, (str(ev.corrupt),)),
        "fid: statistics of another extractor": (swap(fid, "--ref-stats", ev.other), 3, ("7 dims", str(ev.other))),
        "fid: no statistics": (swap(fid, "--ref-stats", tmp / "none.npz"), 4, ("reference statistics not found",)),
        "dfid: --num above the dataset": (swap(dfid, "--num", 1000), 2, ("--num", "dataset size")),
        "dfid: statistics of another dataset": (swap(dfid, "--data", fh.dataset_zip(tmp / "o.zip", fh.images(16, 16,
                                                16))), 3, ("another dataset",)),
        "dfid: --ts 0": (dfid + ["--ts", "0"], 2, ("--ts",)),
        "grid: --steps -1": (["evaluate", "grid", "--ckpt", world.init, "--steps", "-1", "--out", tmp / "g.png"], 2,
                             ("--steps",)),
        "reference-stats: a dataset of random bytes": (
            ["reference-stats", "--data", random_zip, "--extractor", "lenet", "--feature-net", ev.lenet, "--no-cache",
             "--out", tmp / "s.npz"], 3, ("not a readable dataset", str(random_zip))),
        "reference-stats: no dataset": (["reference-stats", "--data", tmp / "none.zip", "--extractor", "lenet",
                                         "--feature-net", ev.lenet, "--out", tmp / "s.npz"], 4, ("dataset not found",)),
        "prepare-dataset: cifar10 without --source": (["prepare-dataset", "--name", "cifar10", "--out", tmp / "c.zip"],
                                                      2, ("--source",)),
        "prepare-dataset: --resolution 2": (["prepare-dataset", "--name", "mnist5k", "--resolution", "2", "--out",
                                             tmp / "m.zip"], 2, ("--resolution",)),
        "prepare-dataset: no tarball": (["prepare-dataset", "--name", "cifar10", "--source", tmp / "none.tar.gz",
                                         "--out", tmp / "c.zip"], 4, ("not found",)),
        "prepare-dataset: a tarball of random bytes": (["prepare-dataset", "--name", "cifar10", "--source", random_tar,
                                                        "--out", tmp / "c.zip"], 3, ("md5",)),
        "prepare-dataset: random bytes, --no-verify": (["prepare-dataset", "--name", "cifar10", "--source", random_tar,
                                                        "--no-verify", "--out", tmp / "c.zip"], 3,
                                                       ("not a readable CIFAR-10 tarball",)),
        "train-feature-net: an unlabelled dataset": (["train-feature-net", "--data", ev.unlabelled, "--out",
                                                      tmp / "l.pt"], 3, ("labelled dataset",)),
        "train-feature-net: --epochs 0": (["train-feature-net", "--data", world.data, "--epochs", "0", "--out",
                                           tmp / "l.pt"], 2, ("--epochs",)),
        "train: a study record that is not JSON": (
            train_args("stage1", world.data, tmp / "run", *_overrides(), init=world.init,
                       extra=["--mlflow-uri", f"sqlite:///{tmp}/m.db", "--mlflow-parent", _text(tmp / "p.json", "{"),
                              "--run-key", "k"]), 3, ("not a study record",)),
        "train: --init-state for stage1": (train_args("stage1", world.data, tmp / "run", *_overrides(), init=world.init,
                                                      extra=["--init-state", world.init]), 2, ("--init-state",)),
        "tables: no paper values": (["tables", "--preset", "ci", "--results", tmp / "none", "--tracking-uri", "none",
                                     "--no-figures", "--paper-values", tmp / "none.csv", "--out", tmp / "t"], 4,
                                    ("none.csv",)),
    }


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


COMMAND_CASES = ["fid: no checkpoint", "fid: --num 1", "fid: --steps 80,x", "fid: --batch 0",
                 "fid: a feature net of zeros", "fid: no feature net", "fid: torn reference statistics",
                 "fid: statistics of another extractor", "fid: no statistics", "dfid: --num above the dataset",
                 "dfid: statistics of another dataset", "dfid: --ts 0", "grid: --steps -1",
                 "reference-stats: a dataset of random bytes", "reference-stats: no dataset",
                 "prepare-dataset: cifar10 without --source", "prepare-dataset: --resolution 2",
                 "prepare-dataset: no tarball", "prepare-dataset: a tarball of random bytes",
                 "prepare-dataset: random bytes, --no-verify", "train-feature-net: an unlabelled dataset",
                 "train-feature-net: --epochs 0", "train: a study record that is not JSON",
                 "train: --init-state for stage1", "tables: no paper values"]


@pytest.mark.parametrize("name", COMMAND_CASES)
def test_every_command_fails_with_one_line_and_its_exit_code(world, eval_world, tmp_path, capsys, name):
    args, code, fragments = _command_cases(world, eval_world, tmp_path)[name]
    expect_error(capsys, code, fragments, *args)
    outputs = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".png", ".npz", ".pt", ".safetensors")
               and p.name not in ("p.json", "config.json")]  # train writes its resolved config.json first
    assert outputs == [] and fh.leftovers(tmp_path) == [], outputs


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    """Unexpected exceptions are not turned into lines: the error path must not hide bugs."""
    import tcm_core.presets as presets

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(presets, "run_check_config", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["check-config", "config.yaml"])


# --------------------------------------------------------------------------------------------------------------
# Class 4: non-finite training ends with one line and exit 6, writes no network, keeps the last good state


NONFINITE_CLI = {
    # name -> (mode, overrides, fragment of the line)
    "lr=1e6": ("stage1", ["lr=1e6", "iterations=20", "state_every=2"], "consecutive"),
    "lr=1e38": ("stage1", ["lr=1e38", "iterations=5"], "weights became non-finite"),
    "lr=1e38 after a good step": ("stage1", ["lr=1e38", "lr_rampup_iters=2", "iterations=5", "state_every=1"],
                                  "weights became non-finite in the optimiser step of global iteration 2"),
    "lr=1e6 nonfinite=skip": ("stage1", ["lr=1e6", "nonfinite=skip", "iterations=30", "state_every=2"], "%)"),
    "lr=1e6, skip, a patience longer than the run": (
        "stage1", ["lr=1e6", "nonfinite=skip", "nonfinite_patience=1000", "iterations=8", "state_every=4"],
        "of 8 ("),
    "lr=1e38 with adam and grad_clip": ("stage1", ["lr=1e38", "optimizer=adam", "grad_clip=0.001", "iterations=5"],
                                        "overflowed"),
    "w_b=1e300 (every Stage-2 loss overflows)": ("stage2", ["w_b=1e300", "iterations=3", "state_every=1"],
                                                 "3 of 3 (100%)"),
    "lr=1e38 pretrain": ("pretrain", ["lr=1e38", "iterations=3"], "weights became non-finite"),
}


@pytest.mark.parametrize("name", sorted(NONFINITE_CLI))
def test_nonfinite_training_is_one_line_exit_6_and_keeps_the_last_good_state(world, tmp_path, capsys, name):
    mode, overrides, fragment = NONFINITE_CLI[name]
    out, states = tmp_path / "run", tmp_path / "state"
    init = None if mode == "pretrain" else world.init
    extra = ["--state-dir", str(states)] + ([f"arch={json.dumps(MICRO_ARCH)}"] if mode == "pretrain" else [])
    args = train_args(mode, world.data, out, "batch=4", "log_every=1", *overrides, init=init,
                      boundary=world.init if mode == "stage2" else None, extra=extra)
    expect_error(capsys, 6, (fragment,), *args)
    assert not (out / "network.safetensors").exists() and not (out / "network.json").exists()
    assert fh.leftovers(tmp_path) == []
    files = list_states(states)
    for _, path in files:  # every state kept is whole, loads, and holds finite weights
        state = load_state_file(path)
        assert tensors_finite(state["net"]) and tensors_finite(state["ema"]), path
    if name == "lr=1e38 after a good step":
        assert [it for it, _ in files] == [1]


def _poisoned_at(iterations: set[int]):
    """A real hook of the training loop (``train(after_backward=...)``): NaN gradients at those iterations."""
    def hook(run):
        if run.iteration in iterations:
            next(run.net.parameters()).grad.fill_(float("nan"))
    return hook


def _micro_run(world, tmp_path, keys: dict, bad: set[int]):
    cfg = build_config({"batch": 4, "log_every": 1, "state_every": 2, **keys}, "stage1")
    return train(cfg, mode="stage1", data=world.data, out=tmp_path / "run", init=world.init,
                 state_dir=tmp_path / "state", device="cpu", after_backward=_poisoned_at(bad), progress=False)


def test_a_single_bad_step_is_dropped_and_the_run_finishes(world, tmp_path):
    result = _micro_run(world, tmp_path, {"iterations": 6, "nonfinite_max_share": 0.2}, {3})  # 1 of 6 < 20%
    assert result.nonfinite_skipped == 1 and result.end_iteration == 6
    assert tensors_finite(load_weights(tmp_path / "run" / "network.safetensors"))


@pytest.mark.parametrize("keys, bad, fragment, last_state", [
    # skip never aborts on the consecutive count, but the share: the 3rd drop of 6 iterations (50% > 5%)
    ({"iterations": 8, "nonfinite": "skip", "nonfinite_patience": 3}, {1, 3, 5, 7}, "3 of 6 (50%)", 4),
    # 2 of 5 dropped, never 5 (the patience) in flight: the share decides at the end (40% > 5%)
    ({"iterations": 5, "nonfinite": "skip"}, {1, 3}, "2 of 5 (40%)", 4),
    # the same with the default policy: 2 non-consecutive drops never reach the consecutive patience
    ({"iterations": 5}, {1, 3}, "2 of 5 (40%)", 4),
])
def test_dropped_share_above_the_bound_aborts(world, tmp_path, keys, bad, fragment, last_state):
    from tcm_core.errors import NonFiniteTrainingError

    with pytest.raises(NonFiniteTrainingError, match=re.escape(fragment)):
        _micro_run(world, tmp_path, keys, bad)
    assert not (tmp_path / "run" / "network.safetensors").exists()
    newest = load_latest_state(tmp_path / "state")
    assert newest["iteration"] == last_state and tensors_finite(newest["net"])


# --------------------------------------------------------------------------------------------------------------
# Class 6: documented command lines


def _snakemake_lines() -> list[tuple[str, str]]:
    """(file:line, the command from ``snakemake`` on) of every snakemake command written in the docs and files."""
    files = [fh.REPO / "README.md", fh.REPO / "Snakefile", *sorted((fh.REPO / "docs").glob("*.md")),
             *sorted((fh.REPO / "profiles").glob("*/config.yaml")), *sorted((fh.REPO / "workflow").rglob("*.smk")),
             *sorted((fh.REPO / "scripts").glob("*.sh"))]
    found = []
    for path in files:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            text = line
            while text.rstrip().endswith("\\") and number < len(lines):
                text = text.rstrip()[:-1] + " " + lines[number]
                number += 1
            for match in re.finditer(r"(?:^|[\s`(])snakemake\s+(-[^`#|;&]*)", text):
                found.append((f"{path.relative_to(fh.REPO)}:{number}", match.group(1)))
    return found


def test_documented_snakemake_commands_put_targets_before_config():
    """``--config`` and ``--configfile`` take every following word: a target after them is read as a value
    (``Unparsable value: 'all'``) or as a config file."""
    lines = _snakemake_lines()
    assert len(lines) >= 8, lines  # the README, the Snakefile, CLUSTER.md and MLFLOW.md hold several
    wrong = []
    for where, command in lines:
        try:
            words = shlex.split(command)
        except ValueError:
            continue  # prose with an unbalanced quote
        for index, word in enumerate(words):
            if word not in ("--config", "--configfile"):
                continue
            for value in words[index + 1:]:
                if value.startswith("-"):
                    break
                ok = "=" in value if word == "--config" else value.endswith((".yaml", ".yml", ".json"))
                if not ok:
                    wrong.append(f"{where}: {word} ... {value!r} in `snakemake {command.strip()}`")
    assert not wrong, "\n".join(wrong)
