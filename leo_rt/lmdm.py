"""LMDM, the latent motion diffusion model (our design, docs/ARCHITECTURE.md §4).

A 1-D U-Net over time denoises a chunk of motion codes x = (alpha_i − alpha_1) for i = 1 … L, shape (B, L, D),
conditioned on alpha_1 (the linear motion condition: a linear map of alpha_1 added to the timestep embedding,
which drives FiLM scale/shift in every residual block). Data are standardised per position and channel with
statistics stored in the model (set by the trainer), so the diffusion sees unit-scale data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig
from .errors import InputError


@dataclass(frozen=True)
class LMDMConfig(ModelConfig, kind="LMDM", format_name="leo_rt.lmdm"):
    motion_dim: int = 20
    chunk: int = 64  # L, codes per chunk (a multiple of 2 ** (levels − 1))
    channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4)
    res_blocks: int = 2
    heads: int = 4
    groups: int = 32
    dropout: float = 0.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    prediction_type: str = "epsilon"
    # The known prefix of a chunk (its first K codes: the condition alpha_1, plus the overlap with the previous
    # chunk) is also given to the U-Net as input channels (values and a mask), trained with random K, so that a
    # chunk continues its prefix instead of only being pinned to it.
    max_prefix: int = 8

    def __post_init__(self):
        stride = 2 ** (len(self.channel_mults) - 1)
        if self.chunk < 2 or self.chunk % stride:
            raise InputError(
                f"chunk must be a multiple of {stride} (the U-Net halves it {stride // 2 or 1}×), got {self.chunk}"
            )
        if self.channels % self.groups:
            raise InputError(f"channels ({self.channels}) must be divisible by groups ({self.groups})")


LMDM_PRESETS = LMDMConfig.register_presets(
    {
        "lmdm-default": LMDMConfig(),
        # The small presets train in minutes on a CPU; they predict v, which stays usable at high noise after
        # little training (an undertrained ε-model's x̂_0 = (x_t − σ·ε̂)/a blows up as a → 0).
        "lmdm-small": LMDMConfig(chunk=32, channels=64, groups=16, prediction_type="v_prediction"),
        "lmdm-tiny": LMDMConfig(
            chunk=16,
            channels=32,
            channel_mults=(1, 2),
            res_blocks=1,
            heads=2,
            groups=8,
            max_prefix=6,
            prediction_type="v_prediction",
        ),
    }
)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock1d(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None].chunk(2, dim=1)  # (B, C, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention1d(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        b, c, n = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, self.heads, c // self.heads, n).unbind(1)  # (B, H, C/H, L)
        out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        return x + self.out(out.transpose(2, 3).reshape(b, c, n))


class LMDM(nn.Module):
    """Denoiser ε_θ(x_t, t, alpha_1) (or v_θ): x_t (B, L, D) in standardised units, t (B,), alpha_1 (B, D)."""

    def __init__(self, cfg: LMDMConfig):
        super().__init__()
        self.cfg = cfg
        c, d, g = cfg.channels, cfg.motion_dim, cfg.groups
        emb = 4 * c
        self.time_mlp = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.cond = nn.Linear(d, emb)  # the linear motion condition on alpha_1
        # scale of alpha_i − alpha_1 per position i and channel: offsets grow along the chunk, and a per-position
        # scale keeps the first steps (small offsets) as precise as the later ones; row 0 is always exactly 0
        self.register_buffer("data_std", torch.ones(cfg.chunk, d))
        self.register_buffer("cond_mean", torch.zeros(d))  # statistics of alpha_1 for the condition
        self.register_buffer("cond_std", torch.ones(d))
        self.inp = nn.Conv1d(2 * d + 1, c, 3, padding=1)  # x_t, known prefix (masked), mask
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        chans, skips = c, [c]
        for lvl, m in enumerate(cfg.channel_mults):
            coarsest = lvl == len(cfg.channel_mults) - 1
            for _ in range(cfg.res_blocks):
                blocks = [ResBlock1d(chans, c * m, emb, g, cfg.dropout)]
                chans = c * m
                if coarsest:
                    blocks.append(Attention1d(chans, cfg.heads, g))
                self.down.append(nn.ModuleList(blocks))
                skips.append(chans)
            if not coarsest:
                self.down.append(nn.ModuleList([nn.Conv1d(chans, chans, 3, stride=2, padding=1)]))
                skips.append(chans)
        self.mid = nn.ModuleList(
            [
                ResBlock1d(chans, chans, emb, g, cfg.dropout),
                Attention1d(chans, cfg.heads, g),
                ResBlock1d(chans, chans, emb, g, cfg.dropout),
            ]
        )
        for lvl, m in reversed(list(enumerate(cfg.channel_mults))):
            coarsest = lvl == len(cfg.channel_mults) - 1
            for i in range(cfg.res_blocks + 1):
                blocks = [ResBlock1d(chans + skips.pop(), c * m, emb, g, cfg.dropout)]
                chans = c * m
                if coarsest:
                    blocks.append(Attention1d(chans, cfg.heads, g))
                if lvl > 0 and i == cfg.res_blocks:
                    blocks.append(_Upsample(chans))
                self.up.append(nn.ModuleList(blocks))
        self.out_norm = nn.GroupNorm(g, chans)
        self.out = nn.Conv1d(chans, d, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # an untrained model predicts zero
        nn.init.zeros_(self.out.bias)

    def embed(self, t: torch.Tensor, alpha_1: torch.Tensor) -> torch.Tensor:
        cond = (alpha_1 - self.cond_mean) / self.cond_std
        return self.time_mlp(timestep_embedding(t, self.cfg.channels)) + self.cond(cond)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        alpha_1: torch.Tensor,
        prefix: torch.Tensor | None = None,
        prefix_len: torch.Tensor | int = 1,
    ) -> torch.Tensor:
        """x (B, L, D) noisy standardised codes; t (B,) timesteps; alpha_1 (B, D); prefix (B, L, D) the known
        standardised codes (only the first prefix_len rows are read; None = zeros, i.e. just x_1 = 0)."""
        b, n, _ = x.shape
        emb = self.embed(t.expand(b) if t.dim() == 0 else t, alpha_1)
        k = torch.as_tensor(prefix_len, device=x.device).reshape(-1, 1)  # (B or 1, 1)
        mask = (torch.arange(n, device=x.device)[None] < k).to(x.dtype)[..., None].expand(b, n, 1)  # (B, L, 1)
        known = torch.zeros_like(x) if prefix is None else prefix * mask
        h = self.inp(torch.cat([x, known, mask], dim=2).transpose(1, 2))  # (B, C, L)
        hs = [h]
        for blocks in self.down:
            for blk in blocks:
                h = blk(h, emb) if isinstance(blk, ResBlock1d) else blk(h)
            hs.append(h)
        for blk in self.mid:
            h = blk(h, emb) if isinstance(blk, ResBlock1d) else blk(h)
        for blocks in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for blk in blocks:
                h = blk(h, emb) if isinstance(blk, ResBlock1d) else blk(h)
        return self.out(F.silu(self.out_norm(h))).transpose(1, 2)  # (B, L, D)


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------------------------------------------- files

FORMAT_NAME = LMDMConfig.format_name


def save_lmdm(model: LMDM, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Directory with model.safetensors + config.json (`extra` entries added to it), each written to a temporary
    file and renamed."""
    return model.cfg.save_checkpoint(path, model.state_dict(), extra)


def load_lmdm(path: str | os.PathLike, *, device="cpu", dtype=torch.float32) -> LMDM:
    """Load an LMDM checkpoint directory strictly; a wrong kind of checkpoint or a mismatch is a clear error."""
    from .checkpoint import check_state_dict

    cfg, sd, _ = LMDMConfig.load_checkpoint(path, how="train one with `leo-rt train-lmdm`")
    model = LMDM(cfg)
    check_state_dict(model.state_dict(), sd, what=f"the LMDM its config describes ({Path(path) / 'config.json'})")
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval()
