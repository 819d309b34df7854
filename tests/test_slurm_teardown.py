"""scripts/slurm-down.sh leaves /etc/slurm as scripts/slurm-up.sh found it (runs after tests/test_slurm.py).

A slurm.conf left behind that names a stopped slurmctld makes every `scontrol` wait for it (about 10 s), and
the Snakemake SLURM plugin runs `scontrol show config` whenever Snakemake starts, with or without the slurm
executor: every later `snakemake` call on the machine, each test's included, paid it.
"""

from pathlib import Path

import pytest
from slurm_helpers import SlurmCluster, skip_reason

pytestmark = pytest.mark.slow

ETC = Path("/etc/slurm")
FILES = ("slurm.conf", "gres.conf", "slurmdbd.conf")


def _contents() -> dict[str, bytes | None]:
    return {name: (ETC / name).read_bytes() if (ETC / name).exists() else None for name in FILES}


def test_down_puts_back_the_files_up_replaced_and_removes_the_ones_it_created(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    original = _contents()
    ETC.mkdir(parents=True, exist_ok=True)
    sentinel = b"# a site's own gres.conf: slurm-up.sh replaces it, slurm-down.sh puts it back\n"
    (ETC / "gres.conf").write_bytes(sentinel)
    moved = None
    if original["slurm.conf"] is not None:  # test the remove branch: up creates slurm.conf, down removes it
        moved = tmp_path / "slurm.conf.original"
        (ETC / "slurm.conf").rename(moved)
    try:
        before = _contents()
        cluster = SlurmCluster(tmp_path / "cluster", nodes=1, fake_gpus=1)
        try:
            cluster.up()
            assert b"written by tcm-pipeline" in (ETC / "slurm.conf").read_bytes()
            assert (ETC / "gres.conf").read_bytes() != sentinel
            cluster.up()  # idempotent: a second up keeps the originals it saved first
        finally:
            cluster.down()
        assert _contents() == before
        assert before["slurm.conf"] is None and before["gres.conf"] == sentinel
    finally:
        for name, data in original.items():
            if name == "slurm.conf" and moved is not None:
                moved.rename(ETC / name)
            elif data is None:
                (ETC / name).unlink(missing_ok=True)
            else:
                (ETC / name).write_bytes(data)
