"""The 2-step sampler's middle time, swept: ``evaluate mid-t-sweep`` (issue 28; the paper tuned it per model).

Two-step generation denoises x_T = T·z in one step, re-noises the result to the middle time t_mid and denoises
again (``sampling``). The paper picks t_mid per model (1.0 on CIFAR-10, 1.526 on ImageNet-64, App. C.3): this
command computes the 2-step FID at every middle time of a grid with the protocol of ``evaluate fid`` (``num``
images per seed set, the minimum over ``seeds`` sets), the same seed sets at every t_mid, so the values differ
by the middle time alone. A truncated network (Stage 2 or 3: the ``t_prime`` of its training config) was never
trained below its t', so middle times below it are skipped and recorded as such. The JSON names the best middle
time and its FID: what a table reports as "2 steps, t_mid tuned". Choosing the best of a grid on the same
samples favours it slightly (the paper does the same); the per-point values are all in the file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from tcm_core.errors import ConfigError
from tcm_core.schedules import T_MAX

SWEEP_METRIC = "fid_2step_sweep"  # the ``metric`` of the sweep's JSON
TRUNCATED_MODES = ("stage2", "stage3")  # modes whose network is trained on [t', T] only


def mid_t_metric(mid_t: float) -> str:
    """The MLflow metric of one point of the sweep, e.g. ``fid_2step_mid1.5``."""
    return f"fid_2step_mid{mid_t:g}"


def usable_mid_ts(mid_ts: list[float], t_prime: float | None) -> tuple[list[float], list[float]]:
    """(middle times swept, middle times skipped because they are below the network's t')."""
    if t_prime is None:
        return list(mid_ts), []
    return [m for m in mid_ts if m >= t_prime], [m for m in mid_ts if m < t_prime]


def truncation_of(meta: dict) -> float | None:
    """The t' below which the network was not trained: its ``t_prime`` if its mode truncates, else None."""
    from tcm_core.evaluation.commands import compared_params

    params = compared_params(meta)
    mode = params.get("mode") or (meta.get("provenance") or {}).get("mode")
    t_prime = params.get("t_prime")
    return float(t_prime) if mode in TRUNCATED_MODES and t_prime is not None else None


def add_arguments(sub: argparse._SubParsersAction, common, extractor_arguments) -> None:
    sweep = sub.add_parser("mid-t-sweep", help="2-step FID at each middle time of a grid, and the best")
    sweep.add_argument("--ckpt", required=True, type=Path)
    sweep.add_argument("--mid-ts", required=True, help="middle times, comma-separated, e.g. 0.5,1,2,5")
    sweep.add_argument("--num", type=int, required=True, help="images per seed set")
    sweep.add_argument("--seeds", type=int, default=1, help="seed sets k = 0..K-1 (the min is reported)")
    extractor_arguments(sweep)
    sweep.add_argument("--ref-stats", required=True, type=Path)
    sweep.add_argument("--out", required=True, type=Path, help="output JSON")
    common(sweep)


def _checked_mid_ts(text: str) -> list[float]:
    from tcm_core.evaluation.commands import parse_floats

    mid_ts = parse_floats(text, "--mid-ts")
    bad = [m for m in mid_ts if not 0 < m < T_MAX]
    if not mid_ts or bad or len(set(mid_ts)) != len(mid_ts):
        raise ConfigError(f"invalid middle times {text!r}", "--mid-ts",
                          f"give distinct values in (0, {T_MAX:g}), comma-separated")
    return sorted(mid_ts)


def run_mid_t_sweep(args: argparse.Namespace) -> int:
    from tcm_core.evaluation import commands as c
    from tcm_core.evaluation import metrics

    mid_ts = _checked_mid_ts(args.mid_ts)
    if args.num < 2 or args.seeds < 1:
        raise ConfigError(f"invalid --num {args.num} / --seeds {args.seeds}", "--num/--seeds",
                          "give num >= 2 and seeds >= 1")
    device = c.resolve_device(args.device)
    net, meta = c._load_net(args, device)
    extractor = c._load_extractor(args, device)
    ref = c.load_ref_stats(args.ref_stats)
    c.check_compatible(ref, extractor, args.ref_stats)
    t_prime = truncation_of(meta)
    swept, skipped = usable_mid_ts(mid_ts, t_prime)
    if not swept:
        raise ConfigError(f"every middle time of {mid_ts} is below the network's t' = {t_prime:g}", "--mid-ts",
                          "add middle times at or above t'")
    start = time.perf_counter()
    per_seed = [[metrics.fid_of_generator(net, extractor=extractor, ref_stats=ref.as_tuple(), num=args.num, seed=k,
                                          steps=[T_MAX, m], batch_size=args.batch, device=device,
                                          method=args.fid_method)[0] for k in range(args.seeds)] for m in swept]
    fids = [min(values) for values in per_seed]
    best = min(range(len(swept)), key=lambda i: fids[i] if math.isfinite(fids[i]) else math.inf)
    record = {
        "metric": SWEEP_METRIC, "label": c.fid_label(extractor, args.num, args.seeds), "extractor": extractor.name,
        "num": args.num, "seeds": args.seeds, "mid_ts": swept, "fids": fids, "per_seed": per_seed,
        "skipped_below_t_prime": skipped, "t_prime": t_prime, "best_mid_t": swept[best], "best": fids[best],
        "ckpt": str(args.ckpt), "ckpt_sha256": meta.get("sha256"), "iteration": int(meta.get("iteration", 0)),
        "ref_stats_key": ref.meta.get("key"), "fid_method": args.fid_method, "device": str(device),
        "seconds": time.perf_counter() - start,
    }
    c.write_json(args.out, record)
    params = {**c.compared_params(meta), "ckpt": str(args.ckpt), "mid_ts": swept, "num": args.num,
              "seeds": args.seeds, "extractor": extractor.name, "label": record["label"],
              "best_mid_t": swept[best], **c.checkpoint_method(meta)}
    values = {mid_t_metric(m): f for m, f in zip(swept, fids)} | {"fid_2step_best": fids[best]}
    c._track(args, args.out, params, values, record["iteration"], [args.out])
    print(json.dumps({k: record[k] for k in ("metric", "label", "mid_ts", "fids", "best_mid_t", "best")}))
    return 0
