"""Mid-run training state: atomic writes, keep-last-N rotation, resume from the newest valid file.

A state file ``state-<iteration:09d>.pt`` holds everything needed to continue bit-identically: the
network, its EMA, optimiser, GradScaler, CPU and CUDA RNG states, the global iteration, the data
sampler position and the non-finite counters. It is written to a temporary file in the same folder and
moved into place with ``os.replace``, so a kill leaves either the old or the new file, never half of
one; a file torn by other means (disk full, copied partially) fails to load and the previous one is used.

The state folder is not a declared output of any workflow rule: Snakemake deletes a job's outputs before
it starts, and the state must survive that to resume. The workflow passes ``--state-dir`` outside the
outputs; the default ``RUN_DIR/_state`` is for hand-run jobs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE_PATTERN = re.compile(r"^state-(\d{9})\.pt$")
REQUIRED_KEYS = ("net", "ema", "optimizer", "iteration", "sampler_position")


def state_path(state_dir: str | Path, iteration: int) -> Path:
    return Path(state_dir) / f"state-{iteration:09d}.pt"


def list_states(state_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every state file in the folder, newest first."""
    folder = Path(state_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STATE_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def tensors_finite(state_dict: dict[str, Any]) -> bool:
    return all(torch.isfinite(v).all().item() for v in state_dict.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def save_state(state_dir: str | Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` atomically and delete all but the newest ``keep`` state files."""
    for key in ("net", "ema"):
        if not tensors_finite(state[key]):
            raise RuntimeError(f"refusing to write a training state with non-finite {key} weights "
                               f"(iteration {state['iteration']})")
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".state-*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    path = state_path(folder, int(state["iteration"]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    for _, old in list_states(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_state(state_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest state file that loads and is complete; corrupt or torn files are skipped with a warning."""
    for iteration, path in list_states(state_dir):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
            missing = [k for k in REQUIRED_KEYS if k not in state]
            if missing:
                raise ValueError(f"missing {missing}")
            if int(state["iteration"]) != iteration:
                raise ValueError(f"holds iteration {state['iteration']}, name says {iteration}")
        except Exception as error:  # noqa: BLE001 - any unreadable file is skipped, the next one is tried
            log.warning("skipping unreadable training state %s: %s", path, error)
            continue
        return state
    return None
