"""Mid-run training state: atomic writes, keep-last-N rotation, resume from the newest valid file.

A state file ``state-<iteration:09d>.pt`` holds everything needed to continue bit-identically: the
network, its EMA, optimiser, GradScaler, CPU and CUDA RNG states, the global iteration, the data
sampler position and the non-finite counters. It is written to a temporary file in the same folder and
moved into place with ``os.replace``, so a kill leaves either the old or the new file, never half of
one; a write the disk refuses (full, read-only) removes the temporary file, keeps the older states and is a
StorageError; a file torn by other means (copied partially) fails to load and the previous one is used.
Stage 1 also writes its final state as a declared output (``train_state.pt``): the control
(``stage1_continued``) continues exactly from it.

The state folder is not a declared output of any workflow rule: Snakemake deletes a job's outputs before
it starts, and the state must survive that to resume. The workflow passes ``--state-dir`` outside the
outputs; the default ``RUN_DIR/_state`` is for hand-run jobs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from tcm_core.errors import NonFiniteTrainingError, RefusedFileError
from tcm_core.io.atomic import save_torch_atomic

log = logging.getLogger(__name__)

STATE_PATTERN = re.compile(r"^state-(\d{9})\.pt$")
REQUIRED_KEYS = ("net", "ema", "optimizer", "iteration", "sampler_position")
# keys that may change between an interrupted attempt and its resumption (observability, run length)
RESUME_FREE_KEYS = frozenset({"iterations", "log_every", "state_every", "eval_every", "eval_points", "grid_every",
                              "eval_num", "eval_mid_t", "eval_dfid_ts", "grid_num", "nonfinite", "nonfinite_patience",
                              "nonfinite_max_share"})


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
    check_finite_state(state)
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".state-*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    path = state_path(folder, int(state["iteration"]))
    save_torch_atomic(state, path)
    for _, old in list_states(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def save_final_state(path: str | Path, state: dict[str, Any]) -> None:
    """Stage 1's final training state as one file (the control's input), written atomically."""
    check_finite_state(state)
    save_torch_atomic(state, Path(path))


def check_finite_state(state: dict[str, Any]) -> None:
    for key in ("net", "ema"):
        if not tensors_finite(state[key]):
            raise NonFiniteTrainingError(f"the {key} weights are non-finite at iteration {state['iteration']}",
                                         "the training state", "lower lr or set grad_clip; nothing was written")


def discard_states(state_dir: str | Path) -> None:
    """Delete every state file in the folder (a run that must start afresh)."""
    for _, path in list_states(state_dir):
        path.unlink(missing_ok=True)


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


def load_state_file(path: str | Path) -> dict[str, Any]:
    """One state file (e.g. Stage 1's ``train_state.pt``); RefusedFileError if it is not a complete state."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in REQUIRED_KEYS if k not in state]
    except Exception as error:  # noqa: BLE001 - torch raises many types for a torn or foreign file
        raise RefusedFileError(f"not a readable training state ({type(error).__name__})", str(path),
                               "rerun the job that wrote it") from None
    if missing:
        raise RefusedFileError(f"the training state lacks {missing}", str(path), "rerun the job that wrote it")
    return state


def check_compatible(state: dict[str, Any], cfg_dict: dict[str, Any], mode: str, start_iteration: int | None,
                     where: Path, extra_free: frozenset[str] | set[str] = frozenset()) -> None:
    """The state was written by a run of ``mode`` with the same settings (except run length and logging)."""
    old = state.get("config") or {}
    free = RESUME_FREE_KEYS | set(extra_free)
    changed = sorted(k for k in cfg_dict if k not in free and k in old and old[k] != cfg_dict[k])
    if state.get("mode", mode) != mode:
        changed.insert(0, f"mode ({state.get('mode')} != {mode})")
    if start_iteration is not None and int(state.get("start_iteration", start_iteration)) != start_iteration:
        changed.insert(0, "init (start iteration)")
    if changed:
        raise RefusedFileError(f"the training state belongs to a different run (differs in {', '.join(changed)})",
                               str(where), "delete it or pass another --state-dir")


def state_of(run: Any) -> dict[str, Any]:
    """Everything needed to continue ``run`` (a :class:`tcm_core.training.setup.Run`) bit-identically."""
    cuda = run.device.type == "cuda"
    return {
        "net": run.net.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {}, "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(run.device) if cuda else None, "iteration": run.iteration,
        "sampler_position": run.sampler.position, "nonfinite_skipped": run.nonfinite_skipped,
        "consecutive_bad": run.consecutive_bad, "log_sums": dict(run.log_sums), "log_count": run.log_count,
        "config": run.cfg.to_dict(), "mode": run.mode, "start_iteration": run.start_iteration,
        "inputs": dict(run.info.get("inputs") or {}),
    }


def restore_state(run: Any, state: dict[str, Any]) -> int:
    """Load ``state`` into ``run``; return the data sampler's position."""
    run.net.load_state_dict(state["net"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if run.device.type == "cuda" and state.get("rng_cuda") is not None and run.dist.world_size == 1:
        torch.cuda.set_rng_state(state["rng_cuda"], run.device)
    run.iteration = int(state["iteration"])
    run.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
    run.consecutive_bad = int(state.get("consecutive_bad", 0))
    if run.resumed_from is not None:  # a resumed job continues its half-filled log window; a new one starts empty
        run.log_sums, run.log_count = dict(state.get("log_sums", {})), int(state.get("log_count", 0))
    return int(state["sampler_position"])
