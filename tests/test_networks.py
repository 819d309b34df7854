"""Networks: exact parameter counts, EDM names, forward shapes, dropout record/replay, EDM2 forced WN."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from tcm_core.networks import (
    MaskDropout,
    arch_preset,
    build_precond,
    count_parameters,
    no_forced_weight_norm,
    record_dropout_masks,
    replay_dropout_masks,
)
from tcm_core.networks.edm2 import MPConv, mp_cat, mp_silu, mp_sum, normalize
from tcm_core.networks.songunet import PositionalEmbedding, UNetBlock

# Small EDM2 net for CPU tests: 16x16 and 8x8 levels, attention (one 64-channel head) at 8x8.
TINY_EDM2 = dict(
    img_resolution=16, img_channels=1, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[8],
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _meta_build(arch):
    with torch.device("meta"):
        return build_precond(arch)


# ---------------------------------------------------------------- parameter counts and names


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("ddpmpp", {}, 55_732_739),
        ("ddpmpp", {"augment_dim": 9}, 55_733_891),
        ("edm2_s", {}, 280_209_253),
        ("edm2_xl", {}, 1_119_276_709),
    ],
)
def test_exact_parameter_counts_on_meta(name, overrides, expected):
    net = _meta_build(arch_preset(name, **overrides))
    assert all(p.device.type == "meta" for p in net.parameters())
    assert count_parameters(net) == expected


def test_tiny_preset_size():
    assert 1_000_000 <= count_parameters(_meta_build(arch_preset("tiny"))) <= 2_000_000


def test_ddpmpp_names_match_edm():
    net = _meta_build(arch_preset("ddpmpp", augment_dim=9))
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    assert len(params) == 417  # EDM CIFAR pickle: 417 parameter tensors incl. map_augment
    for name, shape in [
        ("model.map_layer0.weight", (512, 128)),
        ("model.map_layer1.bias", (512,)),
        ("model.map_augment.weight", (128, 9)),
        ("model.enc.32x32_conv.weight", (128, 3, 3, 3)),
        ("model.enc.32x32_block0.skip.weight", (256, 128, 1, 1)),
        ("model.enc.16x16_block0.qkv.weight", (768, 256, 1, 1)),
        ("model.enc.16x16_block0.norm2.weight", (256,)),
        ("model.enc.16x16_down.affine.weight", (256, 512)),
        ("model.dec.8x8_in0.proj.weight", (256, 256, 1, 1)),
        ("model.dec.16x16_block4.qkv.bias", (768,)),
        ("model.dec.32x32_block0.conv0.weight", (256, 512, 3, 3)),
        ("model.dec.32x32_aux_norm.weight", (256,)),
        ("model.dec.32x32_aux_conv.weight", (3, 256, 3, 3)),
        ("model.dec.32x32_aux_conv.bias", (3,)),
    ]:
        assert tuple(params[name].shape) == shape, name
    assert "model.dec.16x16_block3.qkv.weight" not in params  # decoder attention only in the last block
    assert "model.enc.8x8_block0.qkv.weight" not in params
    assert sorted(buffers) == sorted(
        f"model.{side}.{res}x{res}_{kind}.{layer}.resample_filter"
        for side, kind, resolutions in [("enc", "down", (16, 8)), ("dec", "up", (16, 32))]
        for res in resolutions
        for layer in ("conv0", "skip")
    )
    assert sum(b.numel() for b in buffers.values()) == 32


def test_edm_augment_state_dict_loads_strict_after_dropping_map_augment():
    arch = arch_preset("tiny")
    with_augment = build_precond({**arch, "augment_dim": 9}).state_dict()
    target = build_precond(arch)
    del with_augment["model.map_augment.weight"]
    target.load_state_dict(with_augment, strict=True)
    torch.testing.assert_close(target.state_dict()["model.map_layer0.weight"], with_augment["model.map_layer0.weight"])


def test_edm2_names_match_edm2():
    net = _meta_build(arch_preset("edm2_s"))
    params = dict(net.named_parameters())
    for name, shape in [
        ("model.out_gain", ()),
        ("model.emb_noise.weight", (768, 192)),
        ("model.emb_label.weight", (768, 1000)),
        ("model.enc.64x64_conv.weight", (192, 4, 3, 3)),
        ("model.enc.32x32_down.emb_gain", ()),
        ("model.enc.16x16_block0.attn_qkv.weight", (1728, 576, 1, 1)),
        ("model.enc.16x16_block0.conv_skip.weight", (576, 384, 1, 1)),
        ("model.dec.8x8_in0.attn_proj.weight", (768, 768, 1, 1)),
        ("model.dec.64x64_block3.conv_res0.weight", (192, 384, 3, 3)),
        ("model.out_conv.weight", (3, 192, 3, 3)),
    ]:
        assert tuple(params[name].shape) == shape, name
    assert "model.enc.32x32_block0.attn_qkv.weight" not in params
    assert sorted(n for n, _ in net.named_buffers()) == ["model.emb_fourier.freqs", "model.emb_fourier.phases"]
    assert not any("logvar" in n for n in params)


# ---------------------------------------------------------------- SongUNet pieces


def test_positional_embedding_matches_numpy():
    x = torch.tensor([-2.0, 0.0, 0.3, 7.5], dtype=torch.float64)
    emb = PositionalEmbedding(8, endpoint=True)(x).numpy()
    freqs = (1 / 1e4) ** (np.arange(4) / 3)  # endpoint: last frequency is exactly 1/max_positions
    angles = np.outer(x.numpy(), freqs)
    np.testing.assert_allclose(emb, np.concatenate([np.cos(angles), np.sin(angles)], axis=1), atol=1e-6)


def test_songunet_init_follows_xavier_rules():
    model = build_precond(arch_preset("tiny")).model
    bound = math.sqrt(6 / (32 + 128))  # map_layer0: 32 -> 128
    w = model.map_layer0.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    conv = model.enc["16x16_block0"].conv0.weight  # 32 -> 32, 3x3: fans 288 and 288
    assert conv.abs().max() <= math.sqrt(6 / 576) and conv.abs().max() > 0.95 * math.sqrt(6 / 576)
    zero = model.enc["16x16_block0"].conv1.weight
    assert zero.abs().max() <= 1e-5 * math.sqrt(6 / 576)
    qkv = model.enc["8x8_block0"].qkv.weight  # 64 -> 192, 1x1, attention gain √0.2
    attn_bound = math.sqrt(0.2) * math.sqrt(6 / (64 + 192))
    assert qkv.abs().max() <= attn_bound and qkv.abs().max() > 0.95 * attn_bound
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith("bias"))
    assert model.enc["16x16_block0"].norm0.num_groups == 8 and model.enc["16x16_block0"].norm0.eps == 1e-6


def test_songunet_attention_is_softmax_qk():
    block = UNetBlock(16, 16, 8, attention=True)
    with torch.no_grad():
        block.proj.weight.normal_()
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    # Reference: the residual part, then single-head softmax(qᵀk/√C) attention written with einsum.
    h = block.conv1(
        torch.nn.functional.silu(
            block.norm1(block.conv0(torch.nn.functional.silu(block.norm0(x))) + block.affine(emb)[:, :, None, None])
        )
    )
    h = (h + x) * math.sqrt(0.5)
    q, k, v = block.qkv(block.norm2(h)).reshape(2, 16, 3, 16).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / 4).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 16, 4, 4)
    expected = (block.proj(a) + h) * math.sqrt(0.5)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- EDM2 pieces


def test_mp_primitives_preserve_magnitude():
    a, b = torch.randn(4096, 64, dtype=torch.float64), torch.randn(4096, 32, dtype=torch.float64)
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    assert rms(mp_sum(a[:, :32], b, t=0.3)) == pytest.approx(1.0, abs=0.03)
    assert rms(mp_cat(a, b, t=0.3)) == pytest.approx(1.0, abs=0.03)
    assert rms(mp_silu(a)) == pytest.approx(1.0, abs=0.03)
    torch.testing.assert_close(mp_sum(a[:, :32], b, t=0.3), (0.7 * a[:, :32] + 0.3 * b) / math.sqrt(0.49 + 0.09))
    # mp_cat weights: C/√N·(1-t) on a and C/√N·t on b with C = √((Na+Nb)/((1-t)²+t²)).
    c = math.sqrt(96 / 0.58)
    torch.testing.assert_close(mp_cat(a, b, t=0.3)[:, :64], a * c / 8 * 0.7)
    x = torch.randn(3, 5, 7) * 9
    n = normalize(x)
    np.testing.assert_allclose(n.square().mean(dim=(1, 2)).sqrt().numpy(), 1.0, rtol=1e-3)


def test_edm2_forced_weight_norm():
    conv = MPConv(8, 4, kernel=(3, 3))
    with torch.no_grad():
        conv.weight.mul_(3.0)
    x = torch.randn(2, 8, 5, 5)
    conv.eval()
    before = conv.weight.detach().clone()
    y_eval = conv(x)
    assert torch.equal(conv.weight, before)  # eval: never rewritten
    conv.train()
    with no_forced_weight_norm():
        y_off = conv(x)
    assert torch.equal(conv.weight, before)  # switched off: not rewritten
    y_train = conv(x)
    assert not torch.allclose(conv.weight, before)  # train: rewritten in place to unit RMS per output row
    rms = conv.weight.detach().reshape(4, -1).square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones(4), rtol=1e-3, atol=0)
    # The effective weight is scale invariant, so all three outputs agree.
    torch.testing.assert_close(y_eval, y_off)
    torch.testing.assert_close(y_train, y_off, rtol=1e-4, atol=1e-5)


def test_edm2_forced_weight_norm_in_full_net():
    net = build_precond({"model_type": "EDM2UNet", **TINY_EDM2})
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([1, 7])
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.mul_(2.0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    with no_forced_weight_norm():
        net(x, 1.0, labels)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    net(x, 1.0, labels)
    assert all(not torch.equal(p, before[n]) for n, p in net.named_parameters() if p.ndim >= 2)


# ---------------------------------------------------------------- whole nets


@pytest.mark.parametrize("model_type", ["SongUNet", "EDM2UNet"])
def test_tiny_forward_backward_shapes(model_type):
    arch = arch_preset("tiny") if model_type == "SongUNet" else {"model_type": "EDM2UNet", **TINY_EDM2}
    net = build_precond(arch)
    labels = torch.tensor([3, 9]) if net.label_dim else None
    x = torch.randn(2, 1, 16, 16)
    out = net(x, torch.tensor([0.5, 20.0]), labels)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def _scrambled(net):
    """Random weights everywhere (zero-init layers would hide mistakes)."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net


@pytest.mark.parametrize("model_type", ["SongUNet", "EDM2UNet"])
def test_boundary_condition_with_random_weights(model_type):
    arch = arch_preset("tiny") if model_type == "SongUNet" else {"model_type": "EDM2UNet", **TINY_EDM2}
    net = _scrambled(build_precond(arch)).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert (net(x, 1e-6) - x).abs().max().item() < 1e-3
        assert (net(x, 5.0) - x).abs().max().item() > 0.1


@pytest.mark.parametrize("model_type", ["SongUNet", "EDM2UNet"])
def test_dropout_record_replay_per_sample(model_type):
    if model_type == "SongUNet":
        arch = arch_preset("tiny", dropout=0.3)
    else:
        arch = {"model_type": "EDM2UNet", **TINY_EDM2, "dropout": 0.3}
    net = _scrambled(build_precond(arch)).train()
    drops = [m for m in net.modules() if isinstance(m, MaskDropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    x, sigma = torch.randn(4, 1, 16, 16), torch.tensor([0.1, 1.0, 3.0, 30.0])
    labels = torch.tensor([0, 1, 2, 3]) if net.label_dim else None
    with no_forced_weight_norm():
        with record_dropout_masks() as record:
            full = net(x, sigma, labels)
        assert len(record.masks) == len(drops)
        # Without replay, dropout draws fresh masks: outputs differ.
        assert not torch.allclose(net(x, sigma, labels), full)
        index = torch.tensor([3, 1])
        with replay_dropout_masks(record, index):
            sub = net(x[index], sigma[index], labels[index] if labels is not None else None)
    torch.testing.assert_close(sub, full[index], rtol=1e-4, atol=1e-5)


def test_edm2_dropout_only_at_listed_resolutions():
    arch = {"model_type": "EDM2UNet", **TINY_EDM2, "img_resolution": 32, "channel_mult": [1, 1, 2], "dropout": 0.4}
    model = build_precond(arch).model
    ps = {
        name: block.dropout.p
        for name, block in list(model.enc.items()) + list(model.dec.items())
        if name[-4:] != "conv"
    }
    assert all(p == (0.4 if int(name.split("x")[0]) <= 16 else 0.0) for name, p in ps.items())
    assert any(p == 0.0 for p in ps.values()) and any(p == 0.4 for p in ps.values())


def test_state_dict_round_trip_strict():
    for arch in (arch_preset("tiny"), {"model_type": "EDM2UNet", **TINY_EDM2}):
        src = _scrambled(build_precond(arch)).eval()
        dst = build_precond(arch).eval()
        x = torch.randn(2, 1, 16, 16)
        labels = torch.tensor([1, 2]) if src.label_dim else None
        with torch.no_grad():
            assert not torch.allclose(src(x, 2.0, labels), dst(x, 2.0, labels))
            dst.load_state_dict(src.state_dict(), strict=True)  # buffers (filters, Fourier features) included
            torch.testing.assert_close(src(x, 2.0, labels), dst(x, 2.0, labels))


# ---------------------------------------------------------------- arch dicts


def test_arch_presets_are_json_and_carry_contract_keys():
    for name in ("tiny", "ddpmpp", "edm2_s", "edm2_xl"):
        arch = arch_preset(name)
        assert json.loads(json.dumps(arch)) == arch
        assert {"model_type", "img_resolution", "img_channels", "label_dim", "sigma_data"} <= set(arch)
    assert arch_preset("ddpmpp")["dropout"] == 0.2
    assert arch_preset("edm2_xl")["dropout"] == 0.4
    assert arch_preset("tiny", dropout=0.0)["dropout"] == 0.0
    net = build_precond(arch_preset("tiny", dropout=0.25))
    assert net.arch["dropout"] == 0.25 and {m.p for m in net.modules() if isinstance(m, MaskDropout)} == {0.25}


def test_bad_arch_raises_value_error():
    with pytest.raises(ValueError, match="bogus_key"):
        build_precond({**arch_preset("tiny"), "bogus_key": 1})
    with pytest.raises(ValueError, match="bogus_key"):
        arch_preset("edm2_s", bogus_key=3)
    with pytest.raises(ValueError, match="model_type"):
        build_precond({**arch_preset("tiny"), "model_type": "DhariwalUNet"})
    with pytest.raises(ValueError, match="unknown arch preset"):
        arch_preset("huge")
    with pytest.raises(ValueError, match="dropout"):
        build_precond(arch_preset("tiny", dropout=1.5))
    with pytest.raises(ValueError, match="embedding_type"):
        build_precond(arch_preset("tiny", embedding_type="fourier"))
    # EDM's own names for the variant we build are accepted.
    build_precond(arch_preset("tiny", embedding_type="positional", encoder_type="standard"))


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_a_fresh_resampling_convs_filter_is_the_normalised_outer_product(taps):
    from tcm_core.networks.songunet import Conv2d

    f = np.asarray(taps, dtype=np.float64)
    expected = np.outer(f, f) / f.sum() ** 2  # EDM's 2-D FIR low-pass, unit sum
    for up, down in ((True, False), (False, True)):
        conv = Conv2d(4, 4, kernel=3, up=up, down=down, resample_filter=taps)
        assert conv.resample_filter.shape == (1, 1, len(taps), len(taps))
        np.testing.assert_allclose(conv.resample_filter[0, 0].numpy(), expected, rtol=1e-7)
        assert float(conv.resample_filter.sum()) == pytest.approx(1.0)
    with torch.device("meta"):  # how network files are first built (no memory)
        assert Conv2d(4, 4, kernel=3, up=True, resample_filter=taps).resample_filter.is_meta
