"""Datasets in EDM layout, the mnist5k and CIFAR-10 builders, and the resumable sampler."""

import hashlib
import io
import json
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from tcm_core import data
from tcm_core.data import InfiniteSampler, iterate_batches, open_dataset, write_dataset_zip
from tcm_core.errors import RefusedFileError


def _random_images(n, c=3, r=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, r, r), dtype=np.uint8)


def test_zip_round_trip_and_folder_equivalence(tmp_path):
    images = _random_images(23)
    labels = np.arange(23) % 4
    path = tmp_path / "d.zip"
    assert write_dataset_zip(path, images, labels) == 23
    ds = open_dataset(path)
    assert (len(ds), ds.channels, ds.resolution, ds.label_dim, ds.name) == (23, 3, 8, 4, "d")
    for i in (0, 7, 22):
        img, lab = ds[i]
        assert img.dtype == np.uint8 and np.array_equal(img, images[i]) and lab == labels[i]
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        assert names[0] == "00000/img00000000.png" and names[-1] == "00000/img00000022.png"
        z.extractall(tmp_path / "folder")
    folder = open_dataset(tmp_path / "folder")
    assert np.array_equal(folder.get_batch(range(23))[0], images)
    assert np.array_equal(folder.labels, labels)
    lazy = data.ImageDataset(path, in_memory=False)
    assert np.array_equal(lazy.get_batch([3, 1])[0], images[[3, 1]])
    # Deterministic bytes: writing the same images again gives the same sha256.
    write_dataset_zip(tmp_path / "again.zip", images, labels)
    assert open_dataset(tmp_path / "again.zip").sha256 == ds.sha256


def test_unlabelled_grey_dataset(tmp_path):
    images = _random_images(5, c=1, r=6)
    write_dataset_zip(tmp_path / "g.zip", images)
    ds = open_dataset(tmp_path / "g.zip")
    assert (ds.channels, ds.label_dim, ds[2][1]) == (1, 0, -1)
    x, y = next(iterate_batches(ds, InfiniteSampler(len(ds), 0), 4))
    assert y is None and x.shape == (4, 1, 6, 6)


# ------------------------------------------------------------------------------------- the decoded-array cache


def _counting_decoder(monkeypatch):
    calls = []
    real = data._decode_png
    monkeypatch.setattr(data, "_decode_png", lambda raw: calls.append(1) or real(raw))
    return calls


def test_decoded_cache_serves_a_second_open_bit_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("TCM_CACHE_DIR", str(tmp_path / "cache"))
    images, labels = _random_images(12), np.arange(12) % 3
    write_dataset_zip(tmp_path / "d.zip", images, labels)
    calls = _counting_decoder(monkeypatch)
    first = open_dataset(tmp_path / "d.zip")
    assert len(calls) == 13  # the first image (shape check), then every image
    cache = data.decoded_cache_path(first.sha256)
    assert cache.parent == tmp_path / "cache" / "decoded" and np.array_equal(np.load(cache), images)
    calls.clear()
    second = open_dataset(tmp_path / "d.zip")
    assert len(calls) == 1  # only the first image: the array came from the cache
    assert np.array_equal(second.images, images) and np.array_equal(second.labels, labels)
    second.images[0, 0, 0, 0] ^= 1  # a private, writable copy: the cache file is not changed through it
    assert np.array_equal(np.load(cache), images)
    # the same images at another path hit the same entry; other images (another sha256) miss it
    write_dataset_zip(tmp_path / "copy.zip", images, labels)
    calls.clear()
    assert np.array_equal(open_dataset(tmp_path / "copy.zip").images, images) and len(calls) == 1
    others = _random_images(12, seed=1)
    write_dataset_zip(tmp_path / "d.zip", others, labels)
    assert np.array_equal(open_dataset(tmp_path / "d.zip").images, others)


def test_decoded_cache_never_hides_a_corrupt_image(tmp_path, monkeypatch):
    monkeypatch.setenv("TCM_CACHE_DIR", str(tmp_path / "cache"))
    write_dataset_zip(tmp_path / "d.zip", _random_images(6))
    open_dataset(tmp_path / "d.zip")  # cached
    with zipfile.ZipFile(tmp_path / "d.zip") as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["00000/img00000004.png"] = members["00000/img00000004.png"][:40]  # torn image, same names
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    with pytest.raises(RefusedFileError, match="not a readable dataset"):
        open_dataset(tmp_path / "d.zip")


def _npy_header(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("content", ["wrong shape", "wrong dtype", "truncated", "huge claim", "not npy", "pickle"])
def test_a_bad_cache_entry_is_decoded_again_and_replaced(tmp_path, monkeypatch, content):
    monkeypatch.setenv("TCM_CACHE_DIR", str(tmp_path / "cache"))
    images = _random_images(7)
    write_dataset_zip(tmp_path / "d.zip", images)
    cache = data.decoded_cache_path(data.sha256_file(tmp_path / "d.zip"))
    cache.parent.mkdir(parents=True)
    if content == "wrong shape":
        np.save(cache, images[:6])
    elif content == "wrong dtype":
        np.save(cache, images.astype(np.int16))
    elif content == "truncated":  # the right header, a torn body
        cache.write_bytes(_npy_header(images.shape) + images.tobytes()[:100])
    elif content == "huge claim":  # a header asking for a terabyte must not allocate it
        cache.write_bytes(_npy_header((1 << 40,)) + b"\0" * 64)
    elif content == "not npy":
        cache.write_bytes(b"garbage" * 10)
    else:
        np.save(cache, np.array([{"code": 1}], dtype=object), allow_pickle=True)
    calls = _counting_decoder(monkeypatch)
    assert np.array_equal(open_dataset(tmp_path / "d.zip").images, images) and len(calls) == 8
    assert np.array_equal(np.load(cache), images)  # replaced by the good array


def test_an_unwritable_cache_costs_a_decode_not_the_run(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TCM_CACHE_DIR", str(tmp_path / "cache"))
    images = _random_images(4)
    write_dataset_zip(tmp_path / "d.zip", images)
    for _ in range(2):
        assert np.array_equal(open_dataset(tmp_path / "d.zip").images, images)


def test_mnist5k_resolutions():
    digits, labels = data.load_mnist5k()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), np.full(10, 500))
    small = data.mnist_to_resolution(digits[0], 16)
    assert small.shape == (1, 16, 16) and small.max() > 200
    padded = data.mnist_to_resolution(digits[0], 32)
    assert padded.shape == (1, 32, 32) and np.array_equal(padded[0, 2:30, 2:30], digits[0])
    assert padded[0, :2].max() == 0 and padded[0, 30:].max() == 0
    with pytest.raises(ValueError, match="resolution"):
        data.mnist_to_resolution(digits[0], 2)


def test_batches_in_range_with_one_hot_labels(tmp_path):
    images = _random_images(10, c=1, r=4)
    images[0] = 0
    images[1] = 255
    write_dataset_zip(tmp_path / "d.zip", images, [0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    ds = open_dataset(tmp_path / "d.zip")
    sampler = InfiniteSampler(len(ds), seed=3)
    x, y = next(iterate_batches(ds, sampler, 10))  # one full epoch: a permutation of all images
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert y.shape == (10, 3) and torch.equal(y.sum(1), torch.ones(10))
    order = [sampler.index_at(p) for p in range(10)]
    expected = torch.from_numpy(images[order]).float() / 127.5 - 1
    assert torch.allclose(x, expected)
    assert torch.equal(y.argmax(1), torch.as_tensor(ds.labels[order]))


def test_sampler_is_seeded_epoch_reshuffled_and_covers_each_epoch():
    a = InfiniteSampler(7, seed=1).take(21)
    b = InfiniteSampler(7, seed=1).take(21)
    c = InfiniteSampler(7, seed=2).take(21)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    epochs = a.reshape(3, 7)
    for e in epochs:
        assert sorted(e) == list(range(7))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_sampler_exact_resume_and_rank_split():
    full = InfiniteSampler(11, seed=5).take(40)
    first = InfiniteSampler(11, seed=5)
    head = first.take(13)
    assert first.position == 13
    tail = InfiniteSampler(11, seed=5, start=first.position).take(27)
    assert np.array_equal(np.concatenate([head, tail]), full)
    # Three ranks in lockstep interleave back into the single-process stream, and resume too.
    ranks = [InfiniteSampler(11, seed=5, rank=r, num_replicas=3) for r in range(3)]
    takes = [s.take(8) for s in ranks]
    assert all(s.position == 24 for s in ranks)
    assert np.array_equal(np.stack(takes, 1).reshape(-1), full[:24])
    resumed = [InfiniteSampler(11, seed=5, rank=r, num_replicas=3, start=24).take(5) for r in range(3)]
    assert np.array_equal(np.stack(resumed, 1).reshape(-1), full[24:39])
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(11, seed=0, rank=3, num_replicas=3)


def _synthetic_cifar_tarball(path, per_batch=4):
    rng = np.random.default_rng(0)
    batches = []
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            entry = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                     b"labels": [int(v) for v in rng.integers(0, 10, per_batch)], b"batch_label": b"x"}
            batches.append(entry)
            raw = pickle.dumps(entry, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{b}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        test = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(test)
        tar.addfile(info, io.BytesIO(test))
    return batches


def test_cifar10_converter_on_synthetic_tarball(tmp_path):
    src = tmp_path / "cifar-10-python.tar.gz"
    batches = _synthetic_cifar_tarball(src)
    with pytest.raises(RefusedFileError, match="md5"):
        data.prepare_cifar10(src, tmp_path / "c.zip")
    assert hashlib.md5(src.read_bytes()).hexdigest() != data.CIFAR10_MD5
    assert data.prepare_cifar10(src, tmp_path / "c.zip", verify_md5=False) == 20
    ds = open_dataset(tmp_path / "c.zip")
    assert (len(ds), ds.channels, ds.resolution) == (20, 3, 32)
    # Image 6 is batch 2's second row: CIFAR rows are the R plane, then G, then B, each row-major.
    row = batches[1][b"data"][1]
    assert np.array_equal(ds[5][0], row.reshape(3, 32, 32))
    assert ds[5][1] == batches[1][b"labels"][1]
    with zipfile.ZipFile(tmp_path / "c.zip") as z:
        assert len(json.loads(z.read("dataset.json"))["labels"]) == 20


def test_cifar10_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        raw = pickle.dumps({b"data": Evil()})
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(RefusedFileError, match="UnpicklingError.*not allowed"):
        data.load_cifar10_tarball(path, verify_md5=False)
