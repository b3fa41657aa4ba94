"""The published LIA image animator, as straightforward modules with the official state-dict layout.

This is the reference form: its forward pass follows the published call pattern (source and driving frame
encoded on every call, per-sample weights in a grouped conv, the QR factor and sampling grids rebuilt on every
call). The fast form in :mod:`leo_rt.fast` reads the same parameters. docs/ARCHITECTURE.md §2 is the specification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig
from .errors import InputError
from .kernels.warp import base_grid

SQRT2 = math.sqrt(2.0)
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)


@dataclass(frozen=True)
class LIAConfig(ModelConfig, kind="animator", format_name="leo_rt.animator", metadata_key="leo_rt_config"):
    """Shape of an animator. Channels at resolution r: min(channel_cap, channel_base // r), the decoder's
    multiplied by channel_multiplier (the published encoder ignores the multiplier)."""

    size: int = 256
    style_dim: int = 512
    motion_dim: int = 20
    channel_multiplier: int = 1
    channel_cap: int = 512
    channel_base: int = 16384

    def __post_init__(self):
        if self.size < 8 or self.size & (self.size - 1):
            raise InputError(f"size must be a power of two >= 8, got {self.size}; the official sizes are 128, 256, 512")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def resolutions(self) -> list[int]:
        """Decoder block resolutions, 8 … size; also the resolutions of the encoder features."""
        return [2**i for i in range(3, self.log_size + 1)]

    def enc_channels(self, r: int) -> int:
        return min(self.channel_cap, self.channel_base // r)

    def dec_channels(self, r: int) -> int:
        return min(self.channel_cap, self.channel_base * self.channel_multiplier // r)


PRESETS = LIAConfig.register_presets(
    {
        "lia-128": LIAConfig(size=128),
        "lia-256": LIAConfig(size=256),
        "lia-512": LIAConfig(size=512),
        # Reduced width for quick tests and demos of the code path; same structure, fewer channels.
        **{
            f"lia-{s}-tiny": LIAConfig(size=s, style_dim=64, channel_cap=32, channel_base=2048)
            for s in (32, 64, 128, 256, 512)
        },
    }
)


def make_blur_kernel(factor: float = 1.0) -> torch.Tensor:
    k = torch.tensor(BLUR_TAPS)
    k = k[None, :] * k[:, None]
    return k / k.sum() * factor


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
    """Zero-insert upsample, pad both axes by (pad0, pad1), correlate with the flipped kernel, downsample.
    Written like the published native version: every channel as its own 1-channel image."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    if up > 1:
        x = x.view(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        h, w = h * up, w * up
        x = x.reshape(b, c, h, w)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    h, w = h + pad[0] + pad[1], w + pad[0] + pad[1]
    x = F.conv2d(x.reshape(b * c, 1, h, w), torch.flip(kernel, [0, 1]).view(1, 1, kh, kw))
    x = x.view(b, c, h - kh + 1, w - kw + 1)
    return x[:, :, ::down, ::down]


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x + bias, 0.2) * SQRT2


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return fused_leaky_relu(x, self.bias)


class ScaledLeakyReLU(nn.Module):
    def forward(self, x):
        return F.leaky_relu(x, 0.2)


class Blur(nn.Module):
    def __init__(self, pad: tuple[int, int], factor: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(factor))
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """×2 upsampling of the RGB and flow skip paths: up 2, pad (2, 1), kernel ×4."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(4.0))

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=2, pad=(2, 1))


class EqualConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1 / math.sqrt(cin * k * k)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, din: int, dout: int, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din))
        self.bias = nn.Parameter(torch.full((dout,), float(bias_init)))
        self.scale = 1 / math.sqrt(din)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class ConvLayer(nn.Sequential):
    """[blur] → equalised conv → [FusedLeakyReLU]; with downsampling the conv has stride 2 and no padding."""

    def __init__(self, cin: int, cout: int, k: int, downsample: bool = False, bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR_TAPS) - 2) + (k - 1)
            layers.append(Blur(pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, k // 2
        layers.append(EqualConv2d(cin, cout, k, stride=stride, padding=padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(cout) if bias else ScaledLeakyReLU())
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = ConvLayer(cin, cin, 3)
        self.conv2 = ConvLayer(cin, cout, 3, downsample=True)
        self.skip = ConvLayer(cin, cout, 1, downsample=True, activate=False, bias=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class EncoderApp(nn.Module):
    def __init__(self, cfg: LIAConfig):
        super().__init__()
        s = cfg.size
        self.convs = nn.ModuleList([ConvLayer(3, cfg.enc_channels(s), 1)])
        cin = cfg.enc_channels(s)
        for i in range(cfg.log_size, 2, -1):
            cout = cfg.enc_channels(2 ** (i - 1))
            self.convs.append(ResBlock(cin, cout))
            cin = cout
        self.convs.append(EqualConv2d(cin, cfg.style_dim, 4, padding=0, bias=False))

    def forward(self, x):
        """x (B, 3, S, S) → w_a (B, style_dim), feats [(B, C_r, r, r) for r = 8 … S]."""
        outs = []
        for conv in self.convs:
            x = conv(x)
            outs.append(x)
        return outs[-1].flatten(1), outs[::-1][2:]


class Encoder(nn.Module):
    def __init__(self, cfg: LIAConfig):
        super().__init__()
        self.net_app = EncoderApp(cfg)
        d = cfg.style_dim
        self.fc = nn.Sequential(*[EqualLinear(d, d) for _ in range(4)], EqualLinear(d, cfg.motion_dim))


class ModulatedConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, style_dim: int, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.cin, self.cout, self.k = cin, cout, k
        self.demodulate, self.upsample = demodulate, upsample
        if upsample:
            p = (len(BLUR_TAPS) - 2) - (k - 1)
            self.blur = Blur(pad=((p + 1) // 2 + 1, p // 2 + 1), factor=4.0)
        self.scale = 1 / math.sqrt(cin * k * k)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k))
        self.modulation = EqualLinear(style_dim, cin, bias_init=1.0)

    def forward(self, x, z):
        """Published form: per-sample weights, one grouped conv over the batch."""
        b, cin, h, w = x.shape
        style = self.modulation(z).view(b, 1, cin, 1, 1)
        weight = self.scale * self.weight * style  # (B, Cout, Cin, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.cout, 1, 1, 1)
        x = x.reshape(1, b * cin, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * cin, self.cout, self.k, self.k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=b)
            out = self.blur(out.view(b, self.cout, out.shape[2], out.shape[3]))
        else:
            weight = weight.reshape(b * self.cout, cin, self.k, self.k)
            out = F.conv2d(x, weight, padding=self.k // 2, groups=b)
            out = out.view(b, self.cout, out.shape[2], out.shape[3])
        return out


class NoiseInjection(nn.Module):
    """Holds the published noise weight; noise is never added at inference."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


class ConstantInput(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, 4, 4))


class StyledConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, k, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(cout)

    def forward(self, x, z):
        return self.activate(self.conv(x, z))


class ToRGB(nn.Module):
    def __init__(self, cin: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ConvLayer(cin, 3, 1)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, skip=None):
        out = self.conv(x) + self.bias
        return out if skip is None else out + self.upsample(skip)


class ToFlow(nn.Module):
    def __init__(self, cin: int, style_dim: int):
        super().__init__()
        self.upsample = Upsample()
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, h, z, feat, skip=None):
        """Returns (f̃, h', L): masked warped source features, blended decoder features, flow/mask logits."""
        logits = self.conv(h, z) + self.bias
        grid = base_grid(h.shape[2], h.shape[3], device=h.device).expand(h.shape[0], -1, -1, -1)  # every call
        grid = grid.to(torch.promote_types(h.dtype, torch.float32))
        if skip is not None:
            logits = logits + self.upsample(skip)
        flow = torch.tanh(logits[:, 0:2]).permute(0, 2, 3, 1) + grid
        mask = torch.sigmoid(logits[:, 2:3])
        # 16-bit models: sample with fp32 coordinates (the published code only ran in fp32)
        sampled = F.grid_sample(feat.to(flow.dtype), flow, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped = sampled.to(h.dtype) * mask
        return warped, warped + h * (1.0 - mask), logits


def motion_basis(direction_weight: torch.Tensor) -> torch.Tensor:
    """Q of the reduced Householder QR of (weight + 1e-8), computed in at least fp32: (style_dim, motion_dim)."""
    w = direction_weight.to(torch.promote_types(direction_weight.dtype, torch.float32))
    q, _ = torch.linalg.qr(w + 1e-8, mode="reduced")
    return q


class Direction(nn.Module):
    def __init__(self, style_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(style_dim, motion_dim))

    def forward(self, alpha):
        """alpha (B, motion_dim) → D(alpha) = alpha @ Qᵀ, the QR refactored on every call as published."""
        q = motion_basis(self.weight).to(alpha.dtype)
        return alpha @ q.T


class Synthesis(nn.Module):
    def __init__(self, cfg: LIAConfig):
        super().__init__()
        sd = cfg.style_dim
        self.direction = Direction(sd, cfg.motion_dim)
        c4 = cfg.dec_channels(4)
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, 3, sd)
        self.to_rgb1 = ToRGB(c4, upsample=False)  # present in checkpoints, unused
        self.convs, self.to_rgbs, self.to_flows = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cin = c4
        for r in cfg.resolutions:
            cout = cfg.dec_channels(r)
            self.convs.append(StyledConv(cin, cout, 3, sd, upsample=True))
            self.convs.append(StyledConv(cout, cout, 3, sd))
            self.to_rgbs.append(ToRGB(cout))
            self.to_flows.append(ToFlow(cout, sd))
            cin = cout

    def forward(self, z, feats):
        """z (B, style_dim) style vector; feats [(B, C_r, r, r)] → image (B, 3, S, S), unclamped."""
        h = self.conv1(self.input.input.repeat(z.shape[0], 1, 1, 1), z)
        rgb = logits = None
        for k, feat in enumerate(feats):
            h = self.convs[2 * k + 1](self.convs[2 * k](h, z), z)
            warped, h, logits = self.to_flows[k](h, z, feat, logits)
            rgb = self.to_rgbs[k](warped, rgb)
        return rgb


class LIA(nn.Module):
    """The published generator (`enc` + `dec`). Its methods are the published call patterns."""

    def __init__(self, cfg: LIAConfig):
        super().__init__()
        self.cfg = cfg
        self.enc = Encoder(cfg)
        self.dec = Synthesis(cfg)

    def encode_app(self, img):
        return self.enc.net_app(img)

    def encode_motion(self, img):
        return self.enc.fc(self.enc.net_app(img)[0])

    def decode(self, w_a, alpha, feats):
        """Absolute mode: z = w_a + D(alpha)."""
        return self.dec(w_a + self.dec.direction(alpha), feats)

    def forward(self, img_source, img_drive, alpha_start=None):
        """One published reenactment call: both images encoded, relative mode when alpha_start is given."""
        w_a, feats = self.enc.net_app(img_source)
        alpha_drv = self.enc.fc(self.enc.net_app(img_drive)[0])
        direction = self.dec.direction
        z = w_a + direction(alpha_drv)
        if alpha_start is not None:
            z = z - direction(alpha_start) + direction(self.enc.fc(w_a))
        return self.dec(z, feats)
