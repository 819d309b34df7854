"""Safe loading of EDM/EDM2-format pickles, refusal of malicious ones, our own format, plain state dicts, inspect."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from checkpoint_helpers import (
    SENTINEL_SOURCE,
    Persistent,
    easydict,
    module_state,
    persistent_tree,
    stand_in_modules,
    write_edm_snapshot,
    write_pickle,
)

from tcm_core.io.foreign_checkpoints import CheckpointError
from tcm_core.io.hashing import sha256_file, sha256_sidecar
from tcm_core.io.network_files import inspect_checkpoint, load_network, save_network
from tcm_core.io.safe_pickle import UnsafePickleError, safe_load
from tcm_core.networks import arch_preset, build_precond, count_parameters

TINY_EDM2 = dict(
    img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[8], channels_per_head=16, dropout=0.0,
)


def make_edm_pickle(path, module_src: str = "# EDM networks source\n", extra=None):
    """An EDM training snapshot {ema, loss_fn, augment_pipe, dataset_kwargs} built from our tiny SongUNet."""
    net = build_precond(arch_preset("tiny", augment_dim=9)).eval()
    return net, write_edm_snapshot(net, path, augment_dim=9, module_src=module_src, extra=extra)


def make_edm2_pickle(path):
    """An EDM2 snapshot (EasyDict) with ``unet.`` names, the logvar head and fp16 tensors."""
    net = build_precond(arch_preset("edm2_s", **TINY_EDM2)).eval()
    with torch.no_grad():  # the pickle stores fp16: make the source exactly representable
        for t in [*net.parameters(), *net.buffers()]:
            t.copy_(t.half().float())
    unet_kwargs = {k: v for k, v in TINY_EDM2.items()}
    outer = {**unet_kwargs, "use_fp16": True, "sigma_data": 0.5, "logvar_channels": 128}
    logvar_fourier = Persistent("MPFourier", module_state(torch.nn.Module(), OrderedDict(), {"num_channels": 128}))
    logvar_fourier.meta["state"]["_buffers"] = OrderedDict(freqs=torch.randn(128).half(), phases=torch.rand(128).half())
    logvar_linear = Persistent("MPConv", module_state(torch.nn.Module(), OrderedDict(), {}))
    logvar_linear.meta["state"]["_parameters"] = OrderedDict(weight=torch.nn.Parameter(torch.randn(1, 128).half()))
    children = OrderedDict(
        unet=persistent_tree(net.model, "UNet", unet_kwargs, dtype=torch.float16),
        logvar_fourier=logvar_fourier,
        logvar_linear=logvar_linear,
    )
    ema = Persistent("Precond", module_state(net, children, outer))
    snapshot = easydict(
        encoder=Persistent("StandardRGBEncoder", {"_init_kwargs": {}}),
        dataset_kwargs=easydict(path="img64.zip"),
        loss_fn=Persistent("EDM2Loss", {"P_mean": -0.4, "_init_kwargs": {}}),
        ema=ema,
    )
    return net, write_pickle(snapshot, path)


def _outputs(net, labels=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.tensor([0.02, 1.0, 80.0])
    cls = torch.tensor([1, 4, 7]) if labels else None
    with torch.no_grad():
        return net(x, sigma, cls)


def _assert_same_weights(source, loaded, drop=()):
    want = {k: v for k, v in source.state_dict().items() if not k.startswith(drop)}
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k


def test_edm_pickle_loads_weights_and_outputs_exactly(tmp_path):
    source, path = make_edm_pickle(tmp_path / "edm.pkl")
    assert "model.map_augment.weight" in source.state_dict()
    net, meta = load_network(path)
    _assert_same_weights(source, net, drop=("model.map_augment.",))
    assert torch.equal(_outputs(net), _outputs(source))  # map_augment is unused without augment labels
    assert meta["format"] == "pickle" and meta["class_name"] == "EDMPrecond" and meta["iteration"] is None
    assert meta["arch"]["augment_dim"] == 0 and meta["arch"]["model_type"] == "SongUNet"
    assert meta["arch"]["dropout"] == pytest.approx(0.13)
    assert set(meta["ignored_kwargs"]) == {"use_fp16", "sigma_min", "sigma_max"}
    assert meta["sha256"] == sha256_file(path) and meta["provenance"]["sha256"] == meta["sha256"]
    json.dumps(meta["arch"])  # numpy scalars from the pickle became plain numbers
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    # Overrides: TCM fine-tunes with dropout 0.2; keeping augment_dim keeps map_augment.
    net2, meta2 = load_network(path, arch_overrides={"dropout": 0.2, "augment_dim": 9})
    assert meta2["arch"]["dropout"] == 0.2 and net2.arch["dropout"] == 0.2
    _assert_same_weights(source, net2)


def test_edm2_pickle_renames_drops_logvar_and_casts(tmp_path):
    source, path = make_edm2_pickle(tmp_path / "edm2.pkl")
    raw = safe_load(path)
    assert isinstance(raw, dict) and set(raw) == {"encoder", "dataset_kwargs", "loss_fn", "ema"}
    unet = raw["ema"].state["_modules"]["unet"]
    assert all(p.dtype == torch.float16 for p in unet.state["_parameters"].values())
    net, meta = load_network(path)
    assert meta["flavour"] == "edm2" and meta["class_name"] == "Precond"
    assert meta["arch"]["model_type"] == "EDM2UNet" and meta["arch"]["channels_per_head"] == 16
    _assert_same_weights(source, net)
    assert not any(k.startswith(("unet.", "logvar")) for k in net.state_dict())
    assert torch.equal(_outputs(net, labels=True), _outputs(source, labels=True))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_global_is_refused_without_side_effects(tmp_path, kind):
    sentinel = tmp_path / "sentinel"

    class Evil:
        def __reduce__(self):
            if kind == "os.system":
                return os.system, (f"touch {sentinel}",)
            if kind == "builtins.eval":
                return builtins.eval, (f"open({str(sentinel)!r}, 'w').close()",)
            return subprocess.Popen, (["touch", str(sentinel)],)

    # Hidden in the persistent state of a network, as an attacker would place it.
    _, path = make_edm_pickle(tmp_path / "evil.pkl", extra={"dataset_kwargs": {"hook": Evil()}})
    expected_global = {"os.system": f"{os.system.__module__}.system"}.get(kind, kind)
    for load in (load_network, inspect_checkpoint):
        with pytest.raises(UnsafePickleError) as err:
            load(path)
        assert err.value.global_name == expected_global and expected_global in str(err.value)
    assert not sentinel.exists()
    if kind == "builtins.eval":  # control: the payload is live under a plain unpickler
        pickle.loads(pickle.dumps(Evil()))
        assert sentinel.exists()


def test_embedded_module_source_is_never_executed(tmp_path):
    sentinel = tmp_path / "sentinel"
    src = SENTINEL_SOURCE.format(path=str(sentinel))
    source, path = make_edm_pickle(tmp_path / "src.pkl", module_src=src)
    net, _ = load_network(path)
    inspect_checkpoint(path)
    assert not sentinel.exists()
    assert "torch_utils" not in sys.modules and not any(m.startswith("_imported_module_") for m in sys.modules)
    _assert_same_weights(source, net, drop=("model.map_augment.",))
    exec(compile(src, "<control>", "exec"), {})  # control: this source would have created the sentinel
    assert sentinel.exists()


def test_own_format_round_trip(tmp_path):
    net = build_precond(arch_preset("tiny"))
    path = tmp_path / "run" / "network.safetensors"
    save_network(net, path, iteration=1234, provenance={"source_url": "file:///x.pkl", "sha256": "ab" * 32,
                                                        "config": {"lr": 1e-4}})
    assert sorted(p.name for p in path.parent.iterdir()) == ["network.json", "network.safetensors"]
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["iteration"] == 1234 and record["arch"] == net.arch
    loaded, meta = load_network(path, arch_overrides={"dropout": 0.2})
    assert meta["format"] == "safetensors" and meta["iteration"] == 1234
    assert meta["provenance"]["config"] == {"lr": 1e-4} and meta["sha256"] == sha256_file(path)
    assert meta["arch"]["dropout"] == 0.2 and net.arch["dropout"] == 0.1
    _assert_same_weights(net, loaded)
    assert torch.equal(_outputs(loaded), _outputs(net.eval()))
    with pytest.raises(ValueError, match="iteration"):
        save_network(net, tmp_path / "bad.safetensors", iteration=-1, provenance={})
    # A recorded hash beside the file is enforced.
    sha256_sidecar(path).write_text("0" * 64 + "  network.safetensors\n")
    with pytest.raises(CheckpointError, match="mismatch"):
        load_network(path)


def test_plain_state_dicts_need_an_arch(tmp_path):
    source = build_precond(arch_preset("edm2_s", **TINY_EDM2)).eval()
    # A TCM-style converted EDM2 checkpoint: fp16, `unet.` names, logvar head included.
    state = {k.replace("model.", "unet.", 1): v.half() for k, v in source.state_dict().items()}
    state["logvar_linear.weight"] = torch.zeros(1, 128, dtype=torch.float16)
    path = tmp_path / "edm2-imgnet64-s.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="architecture"):
        load_network(path)
    net, meta = load_network(path, arch=source.arch)
    assert meta["format"] == "state_dict"
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v.half().float()), k
    path.with_suffix(".json").write_text(json.dumps({"arch": source.arch}))
    net2, _ = load_network(path)
    assert count_parameters(net2) == count_parameters(source)
    # Weights that do not fit the architecture fail strictly, naming the keys.
    del state["unet.out_gain"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="model.out_gain"):
        load_network(path)


@pytest.mark.slow
def test_inspect_cli(tmp_path):
    net = build_precond(arch_preset("tiny"))
    own = tmp_path / "net.safetensors"
    save_network(net, own, iteration=7, provenance={"source_url": None})
    edm_source, pkl = make_edm_pickle(tmp_path / "edm.pkl")
    _, evil = make_edm_pickle(tmp_path / "evil.pkl", extra={"x": _PosixSystem(tmp_path / "sentinel")})
    cmd = [sys.executable, "-m", "tcm_core", "inspect"]
    runs = {p: subprocess.run([*cmd, str(p)], capture_output=True, text=True, timeout=120) for p in (own, pkl, evil)}
    info = json.loads(runs[own].stdout)
    assert info["format"] == "safetensors" and info["iteration"] == 7 and info["sha256"] == sha256_file(own)
    assert info["parameter_count"] == count_parameters(net) and info["arch"] == net.arch
    info = json.loads(runs[pkl].stdout)
    assert info["format"] == "pickle" and info["class_name"] == "EDMPrecond"
    assert info["init_kwargs"]["augment_dim"] == 9 and info["arch"]["augment_dim"] == 0
    assert info["parameter_count"] == count_parameters(net)  # mapped: map_augment dropped
    assert info["parameter_count_in_file"] == count_parameters(edm_source)  # map_augment included
    assert info["sha256"] == sha256_file(pkl)
    bad = runs[evil]
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "system" in bad.stderr
    assert bad.stdout == "" and not (tmp_path / "sentinel").exists()


class _PosixSystem:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_stand_in_modules_are_removed():
    with stand_in_modules():
        assert "torch_utils.persistence" in sys.modules
    assert "torch_utils" not in sys.modules and "dnnlib.util" not in sys.modules


def test_corrupt_or_foreign_pickles_are_clear_errors(tmp_path):
    _, path = make_edm_pickle(tmp_path / "edm.pkl")
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(path.read_bytes()[: 5000])
    with pytest.raises(CheckpointError, match="not a readable network pickle"):
        load_network(cut)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="no network in the pickle"):
        load_network(plain)
