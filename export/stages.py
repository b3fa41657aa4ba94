"""Exportable stages, each declaring its contract (docs/ARCHITECTURE.md §6).

- source_encoder: image (B, 3, S, S) → w_a, alpha_src, styles0, feat_8 … feat_S
- motion_encoder: image (B, 3, S, S) → alpha (B, D)
- renderer: alpha (N, D) + the source state of ONE source (styles0 (1, n), feat_r (1, C_r, r, r)) → frames (N, 3, S, S);
  N is the dynamic axis and the source tensors are broadcast to the N frames, never tiled
- lmdm_denoiser: x_t (B, L, D), t (B,), alpha_1 (B, D), prefix (B, L, D), prefix_len (B,) → model output (B, L, D)

Batch is the only dynamic axis; spatial sizes are fixed per model size. Stages compute styles in float32 (the
runtime's float64 styles would not survive TensorRT). Every tensor crossing a stage boundary is contiguous NCHW
(AOTInductor code is specialised to the strides it was traced with).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..animator import Animator
from ..fast import FastEncoder, FastRenderer
from ..lmdm import LMDM


@dataclass(frozen=True)
class StageSpec:
    """The contract of one exported stage."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batch_inputs: tuple[str, ...]  # inputs whose axis 0 is the dynamic batch; the others are fixed
    sample: Callable[[int], tuple[torch.Tensor, ...]]  # sample inputs for a batch size
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    varargs_from: int | None = None  # forward(*inputs[varargs_from:]) is a *args group

    def shapes(self, batch: int) -> dict[str, list[int]]:
        return {n: list(t.shape) for n, t in zip(self.input_names, self.sample(batch), strict=True)}

    def dynamic_shapes(self):
        """torch.export dynamic_shapes: axis 0 of the batch inputs is one shared dynamic dim."""
        from torch.export import Dim

        batch = Dim("batch", min=self.min_batch, max=self.max_batch)
        dyn = [{0: batch} if n in self.batch_inputs else None for n in self.input_names]
        if self.varargs_from is not None:
            dyn = [*dyn[: self.varargs_from], tuple(dyn[self.varargs_from :])]
        return tuple(dyn)


class SourceEncoderStage(nn.Module):
    def __init__(self, animator: Animator):
        super().__init__()
        lia = animator.reference
        self.encoder = FastEncoder(lia)
        self.renderer = FastRenderer(lia, style_dtype=torch.float32)

    def forward(self, image: torch.Tensor):
        w_a, feats = self.encoder(image)
        # stage boundaries are plain contiguous NCHW: AOTInductor code is specialised to its inputs' strides
        return (w_a, self.encoder.motion_from_wa(w_a), self.renderer.styles0(w_a), *(f.contiguous() for f in feats))


class MotionEncoderStage(nn.Module):
    def __init__(self, animator: Animator):
        super().__init__()
        self.encoder = FastEncoder(animator.reference)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder.motion_from_wa(self.encoder(image)[0])


class RendererStage(nn.Module):
    def __init__(self, animator: Animator):
        super().__init__()
        self.renderer = FastRenderer(animator.reference, style_dtype=torch.float32)

    def forward(self, alpha: torch.Tensor, styles0: torch.Tensor, *feats: torch.Tensor) -> torch.Tensor:
        return self.renderer(alpha, styles0, list(feats))


class LMDMDenoiserStage(nn.Module):
    def __init__(self, lmdm: LMDM):
        super().__init__()
        self.lmdm = lmdm.eval()

    def forward(self, x_t, t, alpha_1, prefix, prefix_len):
        return self.lmdm(x_t, t, alpha_1, prefix, prefix_len)


def animator_stages(animator: Animator, max_batch: int = 32) -> dict[str, tuple[nn.Module, StageSpec]]:
    """The three animator stages with their contracts, in the animator's dtype and device."""
    cfg, dev, dt = animator.config, animator.device, animator.dtype
    s, d = cfg.size, cfg.motion_dim
    res = cfg.resolutions
    feat_names = tuple(f"feat_{r}" for r in res)
    opt = min(8, max_batch)
    source_stage = SourceEncoderStage(animator).eval()

    def image(b):
        g = torch.Generator(device=dev).manual_seed(b)
        return (torch.rand(b, 3, s, s, device=dev, generator=g).to(dt) * 2 - 1,)

    def render_inputs(b):
        # a real source state (random features or styles would be far off the distribution the network sees)
        with torch.no_grad():
            state = source_stage(image(1)[0])
        g = torch.Generator(device=dev).manual_seed(100 + b)
        return (torch.randn(b, d, device=dev, generator=g).to(dt) * 0.5, *(t.contiguous() for t in state[2:]))

    enc_out = ("w_a", "alpha_src", "styles0", *feat_names)
    return {
        "source_encoder": (
            source_stage,
            StageSpec("source_encoder", ("image",), enc_out, ("image",), image, 1, opt, max_batch),
        ),
        "motion_encoder": (
            MotionEncoderStage(animator).eval(),
            StageSpec("motion_encoder", ("image",), ("alpha",), ("image",), image, 1, opt, max_batch),
        ),
        "renderer": (
            RendererStage(animator).eval(),
            StageSpec(
                "renderer",
                ("alpha", "styles0", *feat_names),
                ("frames",),
                ("alpha",),
                render_inputs,
                1,
                opt,
                max_batch,
                varargs_from=2,
            ),
        ),
    }


def lmdm_stage(lmdm: LMDM, max_batch: int = 32) -> tuple[nn.Module, StageSpec]:
    cfg = lmdm.cfg
    dev = lmdm.data_std.device
    length, d = cfg.chunk, cfg.motion_dim

    def sample(b):
        return (
            torch.randn(b, length, d, device=dev),
            torch.randint(0, cfg.num_train_timesteps, (b,), device=dev),
            torch.randn(b, d, device=dev),
            torch.randn(b, length, d, device=dev),
            torch.randint(1, cfg.max_prefix + 1, (b,), device=dev),
        )

    names = ("x_t", "t", "alpha_1", "prefix", "prefix_len")
    spec = StageSpec("lmdm_denoiser", names, ("model_output",), names, sample, 1, min(8, max_batch), max_batch)
    return LMDMDenoiserStage(lmdm).eval(), spec
