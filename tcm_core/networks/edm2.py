"""EDM2 magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics").

Written from the paper's equations; parameter and buffer names follow EDM2's ``UNet`` so that an EDM2
checkpoint loads after renaming ``unet.`` to ``model.`` and dropping the logvar head (which we do not build).

TCM/ECT changes kept here: dropout only in blocks whose resolution is in ``dropout_resolutions``, all
dropout through :class:`MaskDropout`, and forced weight normalisation that can be switched off with
:func:`no_forced_weight_norm` (target passes and frozen networks must not rewrite weights).

Shapes: ``forward(x (B, C, H, W), noise_labels (B,), class_labels (B, label_dim) | None) -> (B, C, H, W)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import nn

from tcm_core.networks.dropout import MaskDropout

_FORCED_WN_ENABLED: ContextVar[bool] = ContextVar("tcm_forced_weight_norm", default=True)


@contextlib.contextmanager
def no_forced_weight_norm() -> Iterator[None]:
    """Inside this block, :class:`MPConv` in train mode does not overwrite its weight in place."""
    token = _FORCED_WN_ENABLED.set(False)
    try:
        yield
    finally:
        _FORCED_WN_ENABLED.reset(token)


def forced_weight_norm_enabled() -> bool:
    return _FORCED_WN_ENABLED.get()


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Scale ``x`` to unit RMS magnitude over ``dim`` (default: all but the first): x / (eps + ‖x‖/√n)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x up/down resampling with a separable, unit-sum FIR filter (depthwise); 'keep' is the identity."""
    if mode == "keep":
        return x
    taps = torch.as_tensor(list(f), dtype=torch.float32, device=x.device)
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps)[None, None].to(x.dtype)
    pad = (len(f) - 1) // 2
    channels = x.shape[1]
    if mode == "down":
        return nn.functional.conv2d(x, kernel.tile(channels, 1, 1, 1), groups=channels, stride=2, padding=pad)
    if mode == "up":
        return nn.functional.conv_transpose2d(
            x, (kernel * 4).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=pad
        )
    raise ValueError(f"resample mode must be 'keep', 'up' or 'down', got {mode!r}")


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its output RMS for unit-normal input (0.596)."""
    return nn.functional.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving interpolation: ((1-t) a + t b) / √((1-t)² + t²)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation with balance ``t`` between ``a`` (0) and ``b`` (1)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(n_a) * (1 - t)), b * (scale / math.sqrt(n_b) * t)], dim=dim)


class MPFourier(nn.Module):
    """Random Fourier features √2·cos(2π(f x + φ)) with f ~ N(0, bandwidth²), φ ~ U(0, 1) (buffers)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()), no bias.

    The effective weight is normalize(w)·gain/√fan_in. In train mode (unless inside
    :func:`no_forced_weight_norm`) the stored weight is first overwritten by normalize(w): forced weight
    normalisation keeps the raw weights on the unit sphere so Adam's effective step size stays constant.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training and _FORCED_WN_ENABLED.get():
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2 U-Net block: 'enc' (skip conv + pixel norm before the residual) or 'dec' (skip conv after)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.dropout = MaskDropout(dropout)
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(self.dropout(y))

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            b, c, h, w = x.shape
            # Channels are laid out as (head, channel, {q, k, v}); q, k, v are pixel-normalised per head.
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # each (b, heads, c_head, hw)
            # softmax(qᵀk / √c_head) v
            y = nn.functional.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
            y = self.attn_proj(y.transpose(2, 3).reshape(b, c, h, w))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """EDM2 U-Net (config img64: channel_mult [1,2,3,4], 3 blocks per level, attention at 16 and 8)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        dropout: float = 0.0,
        dropout_resolutions: Sequence[int] = (16, 8, 4, 2, 1),
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        _check_edm2_arguments(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks,
                              channels_per_head, dropout, label_balance, concat_balance, res_balance, attn_balance)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        block = _BlockFactory(cemb, resample_filter, channels_per_head, dropout, {int(r) for r in dropout_resolutions},
                              res_balance, attn_balance, clip_act)
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(label_dim, cemb, kernel=()) if label_dim else None
        # Encoder, decoder, output conv (created in this order: it fixes the seeded initialisation).
        self.enc, cout = _edm2_encoder(block, img_resolution, img_channels, cblock, num_blocks, attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec, cout = _edm2_decoder(block, img_resolution, cout, skips, cblock, num_blocks, attn_resolutions)
        self.out_conv = MPConv(cout, img_channels, kernel=(3, 3))

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError("EDM2UNet with label_dim > 0 needs class_labels")
            labels = class_labels.to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)

        for name, layer in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def _check_edm2_arguments(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks,
                          channels_per_head, dropout, label_balance, concat_balance, res_balance,
                          attn_balance) -> None:
    for name, value in (("img_resolution", img_resolution), ("img_channels", img_channels),
                        ("model_channels", model_channels), ("num_blocks", num_blocks),
                        ("channels_per_head", channels_per_head)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    if label_dim < 0:
        raise ValueError(f"label_dim must be >= 0, got {label_dim}")
    if not channel_mult or any(int(m) < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty list of ints >= 1, got {channel_mult}")
    if img_resolution % (1 << (len(channel_mult) - 1)):
        raise ValueError(f"img_resolution {img_resolution} must be divisible by 2^(len(channel_mult)-1)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    for name, value in (("label_balance", label_balance), ("concat_balance", concat_balance),
                        ("res_balance", res_balance), ("attn_balance", attn_balance)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


class _BlockFactory:
    """Blocks of one U-Net: the shared settings, with dropout only at the resolutions that have it."""

    def __init__(self, cemb, resample_filter, channels_per_head, dropout, dropout_resolutions, res_balance,
                 attn_balance, clip_act) -> None:
        self.shared = dict(resample_filter=resample_filter, channels_per_head=channels_per_head,
                           res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        self.cemb, self.dropout, self.dropout_resolutions = cemb, dropout, dropout_resolutions

    def __call__(self, cin: int, cout: int, res: int, **kwargs: object) -> Block:
        dropout = self.dropout if res in self.dropout_resolutions else 0.0
        return Block(cin, cout, self.cemb, dropout=dropout, **self.shared, **kwargs)


def _edm2_encoder(block, img_resolution, img_channels, cblock, num_blocks, attn_resolutions
                  ) -> tuple[nn.ModuleDict, int]:
    """The input gets a constant-ones channel so the first conv can learn an offset; then per level a down
    block (below the top) and ``num_blocks`` blocks."""
    enc = nn.ModuleDict()
    cout = img_channels + 1
    for level, channels in enumerate(cblock):
        res = img_resolution >> level
        if level == 0:
            cin, cout = cout, channels
            enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=(3, 3))
        else:
            enc[f"{res}x{res}_down"] = block(cout, cout, res, flavor="enc", resample_mode="down")
        for idx in range(num_blocks):
            cin, cout = cout, channels
            enc[f"{res}x{res}_block{idx}"] = block(cin, cout, res, flavor="enc", attention=res in attn_resolutions)
    return enc, cout


def _edm2_decoder(block, img_resolution, cout, skips, cblock, num_blocks, attn_resolutions
                  ) -> tuple[nn.ModuleDict, int]:
    """Two blocks at the bottom, then per level an up block and ``num_blocks + 1`` blocks taking the skips."""
    dec = nn.ModuleDict()
    skips = list(skips)
    for level, channels in reversed(list(enumerate(cblock))):
        res = img_resolution >> level
        if level == len(cblock) - 1:
            dec[f"{res}x{res}_in0"] = block(cout, cout, res, flavor="dec", attention=True)
            dec[f"{res}x{res}_in1"] = block(cout, cout, res, flavor="dec")
        else:
            dec[f"{res}x{res}_up"] = block(cout, cout, res, flavor="dec", resample_mode="up")
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), channels
            dec[f"{res}x{res}_block{idx}"] = block(cin, cout, res, flavor="dec", attention=res in attn_resolutions)
    return dec, cout
