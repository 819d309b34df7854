"""DDPM++ U-Net of Song et al. (2021) in the layout of EDM's ``SongUNet`` (Karras et al. 2022).

Written from the published formulas; module, parameter and buffer names follow EDM's so that an EDM
CIFAR-10 checkpoint loads with ``strict=True`` (after dropping ``map_augment`` when it is not used).
Only the DDPM++ variant is built: positional noise embedding, standard encoder and decoder.

Shapes: ``forward(x (B, C, H, W), noise_labels (B,), class_labels (B, label_dim) | None) -> (B, C, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.functional import silu

from tcm_core.networks.dropout import MaskDropout


def _xavier_uniform_(weight: torch.Tensor, fan_in: int, fan_out: int, gain: float = 1.0) -> None:
    """Xavier-uniform in EDM's convention: a convolution's fans count the kernel on both sides."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class Linear(nn.Module):
    """Fully connected layer ``x Wᵀ + b``; weight (out, in), Xavier-uniform times ``init_weight``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        _xavier_uniform_(self.weight, in_features, out_features, init_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down resampling by a separable FIR filter applied before it.

    ``kernel == 0`` resamples only. The filter buffer ``resample_filter`` exists only when resampling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        init_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        if self.weight is not None:
            _xavier_uniform_(self.weight, in_channels * kernel * kernel, out_channels * kernel * kernel, init_weight)
        if up or down:
            # Outer product normalised to unit sum: a 2-D low-pass kernel, shape (1, 1, k, k). Computed in Python:
            # on the meta device (tcm_core.io.network_files) the first tensor arithmetic costs about a second.
            taps = [float(v) for v in resample_filter]
            norm = sum(taps) ** 2
            kernel = [[a * b / norm for b in taps] for a in taps]
            self.register_buffer("resample_filter", torch.tensor(kernel, dtype=torch.float32)[None, None])
        else:
            self.resample_filter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample_filter is not None:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            channels = x.shape[1]
            if self.up:
                # Transposed depthwise conv; x4 keeps the mean (each output pixel gets 1/4 of the mass).
                x = nn.functional.conv_transpose2d(
                    x, (f * 4).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=pad
                )
            else:
                x = nn.functional.conv2d(x, f.tile(channels, 1, 1, 1), groups=channels, stride=2, padding=pad)
        if self.weight is not None:
            x = nn.functional.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


def _group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    # At least 4 channels per group, at most 32 groups (EDM's rule).
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=eps)


class UNetBlock(nn.Module):
    """Residual block (DDPM++ flavour: embedding added, not scale/shift) with optional self-attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.skip_scale = math.sqrt(0.5)
        self.attention = attention
        self.norm0 = _group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = _group_norm(out_channels)
        self.dropout = MaskDropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if attention:
            self.norm2 = _group_norm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        x = silu(self.norm1(x + self.affine(emb)[:, :, None, None].to(x.dtype)))
        x = self.conv1(self.dropout(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.attention:
            b, c, h, w = x.shape
            # One head; qkv channels are interleaved as (channel, {q, k, v}) as in EDM.
            q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, h * w).unbind(2)
            # softmax(qᵀk / √c) v, computed in float32 for stability.
            a = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()
            )
            a = a.transpose(1, 2).to(x.dtype).reshape(b, c, h, w)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding [cos(x ω_i), sin(x ω_i)], ω_i = max_positions^(-i/(n/2 - endpoint))."""

    def __init__(self, num_channels: int, max_positions: float = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** exponents
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ U-Net (EDM ``SongUNet`` with positional embedding, standard encoder and decoder)."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        channel_mult_noise: int = 1,
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        _check_songunet_arguments(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                                  channel_mult, channel_mult_emb, num_blocks, dropout, label_dropout,
                                  channel_mult_noise)
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block_kwargs = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        # Mapping network: noise level (+ label, + augmentation) -> embedding.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        # Encoder, then decoder (modules are created in this order: it fixes the seeded initialisation).
        self.enc, cout = _songunet_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                           attn_resolutions, block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]
        self.dec = _songunet_decoder(img_resolution, cout, skips, out_channels, model_channels, channel_mult,
                                     num_blocks, attn_resolutions, block_kwargs)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        # Swap the [cos, sin] halves to [sin, cos], as the DDPM++ reference does.
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("SongUNet with label_dim > 0 needs class_labels")
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(silu(out))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


def _check_positive_int(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")


def _check_songunet_arguments(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                              channel_mult, channel_mult_emb, num_blocks, dropout, label_dropout,
                              channel_mult_noise) -> None:
    for name, value in (("img_resolution", img_resolution), ("in_channels", in_channels),
                        ("out_channels", out_channels), ("model_channels", model_channels),
                        ("num_blocks", num_blocks), ("channel_mult_emb", channel_mult_emb),
                        ("channel_mult_noise", channel_mult_noise)):
        _check_positive_int(name, value)
    if label_dim < 0 or augment_dim < 0:
        raise ValueError(f"label_dim and augment_dim must be >= 0, got {label_dim}, {augment_dim}")
    if not channel_mult or any(int(m) < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty list of ints >= 1, got {channel_mult}")
    if img_resolution % (1 << (len(channel_mult) - 1)):
        raise ValueError(
            f"img_resolution {img_resolution} must be divisible by 2^(len(channel_mult)-1) for the down levels"
        )
    if not 0.0 <= dropout < 1.0 or not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"dropout and label_dropout must be in [0, 1), got {dropout}, {label_dropout}")
    if model_channels * min(channel_mult) < 4:
        raise ValueError("model_channels * min(channel_mult) must be >= 4 (GroupNorm needs 4 channels per group)")


def _songunet_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                      block_kwargs) -> tuple[nn.ModuleDict, int]:
    """EDM's encoder: a 3x3 conv, then per level a down block (below the top) and ``num_blocks`` blocks."""
    enc = nn.ModuleDict()
    cout = in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            cin, cout = cout, model_channels
            enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
        else:
            enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs)
    return enc, cout


def _songunet_decoder(img_resolution, cout, skips, out_channels, model_channels, channel_mult, num_blocks,
                      attn_resolutions, block_kwargs) -> nn.ModuleDict:
    """EDM's decoder: two blocks at the bottom, then per level an up block and ``num_blocks + 1`` blocks that
    take the encoder's skips; at the top a GroupNorm and the 3x3 output conv."""
    dec = nn.ModuleDict()
    skips = list(skips)
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
            dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            attention = idx == num_blocks and res in attn_resolutions
            dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
        if level == 0:
            dec[f"{res}x{res}_aux_norm"] = _group_norm(cout)
            dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, init_weight=1e-5)
    return dec
