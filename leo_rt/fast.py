"""The fast form of the animator: exact inference rewrites of docs/ARCHITECTURE.md §3, built from an :class:`LIA`.

- The source is encoded once into a :class:`SourceState`; per frame only the decoder runs (rewrite 1).
- Q and the base grids are computed once (rewrite 2).
- Every modulation is affine in alpha: s(alpha) = s0 + alpha @ Pᵀ with s0 per source and P = M·Q per
  checkpoint, all layers stacked into one matrix (rewrite 3); the conv scale is folded into s.
- Modulated convs are batched convs with one shared weight, demodulated afterwards (rewrite 4).
- Source features are broadcast to every frame, never copied (rewrite 5).

The prepared tensors are derived from the LIA parameters when the module is built; rebuild after changing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .kernels.warp import warp_blend
from .model import LIA, SQRT2, base_grid, motion_basis


@dataclass
class SourceState:
    """A source image encoded once: everything per-frame rendering needs from it.

    w_a (B, style_dim); feats [(B, C_r, r, r) for r = 8 … S]; alpha_src (B, motion_dim) the source's own motion
    code; styles0 (B, n_styles) the modulations of every decoder layer at alpha = 0. B is 1 for one source.
    """

    w_a: torch.Tensor
    feats: list[torch.Tensor]
    alpha_src: torch.Tensor
    styles0: torch.Tensor

    @property
    def batch(self) -> int:
        return self.w_a.shape[0]

    def to(self, *args, **kwargs) -> SourceState:
        return SourceState(
            self.w_a.to(*args, **kwargs),
            [f.to(*args, **kwargs) for f in self.feats],
            self.alpha_src.to(*args, **kwargs),
            self.styles0.to(*args, **kwargs),
        )


def _depthwise(kernel: torch.Tensor, channels: int) -> torch.Tensor:
    # correlation with the flipped kernel, one filter per channel: (C, 1, kh, kw)
    return torch.flip(kernel, [0, 1]).expand(channels, 1, *kernel.shape).contiguous()


def _conv_layout(cin: int) -> torch.memory_format:
    """Memory layout for a conv on CPU. oneDNN's channels-last kernels are faster (no activation reorders) but
    accumulate fp32 less accurately for deep reductions (~1e-6 relative at 512 input channels against 2e-7 in
    NCHW): wide layers, which are small maps, run NCHW; the large high-resolution maps run channels-last."""
    return torch.contiguous_format if cin >= 512 else torch.channels_last


def blur(x: torch.Tensor, kernel_dw: torch.Tensor, pad: tuple[int, int], stride: int = 1) -> torch.Tensor:
    """upfirdn2d without upsampling, as one depthwise conv (optionally keeping every stride-th output)."""
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    return F.conv2d(x, kernel_dw, stride=stride, groups=x.shape[1])


def upsample2(x: torch.Tensor, kernel_dw: torch.Tensor) -> torch.Tensor:
    """upfirdn2d(up=2, pad=(2, 1)) with the ×4 kernel, for the 3-channel flow and RGB skip paths."""
    n, c, h, w = x.shape
    x = F.pad(x.view(n, c, h, 1, w, 1), [0, 1, 0, 0, 0, 1]).view(n, c, 2 * h, 2 * w)
    return blur(x, kernel_dw, (2, 1))


class _Prepared(nn.Module):
    """Holds tensors derived from (or aliasing) LIA parameters as non-persistent buffers, so that .to(),
    tracing and export see them, while state_dict() stays the official layout of the LIA itself."""

    def put(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t.detach(), persistent=False)

    def get(self, name: str) -> torch.Tensor:
        return getattr(self, name)


class FastEncoder(_Prepared):
    """net_app + fc with pre-scaled weights and depthwise blurs; the skip path blurs only the pixels it keeps."""

    def __init__(self, lia: LIA):
        super().__init__()
        convs, fc = lia.enc.net_app.convs, lia.enc.fc
        # FusedLeakyReLU's √2 is folded into the preceding conv (leaky(a)·√2 = leaky(√2·a)); in a ResBlock the
        # main path's √2 cancels the block's 1/√2, which moves onto the skip conv instead.
        self.put("first_w", convs[0][0].weight * (convs[0][0].scale * SQRT2))
        self.put("first_b", convs[0][1].bias * SQRT2)
        self.n_blocks = len(convs) - 2
        self.layouts = []
        for i, block in enumerate(convs[1:-1]):
            c1, c2, sk = block.conv1[0], block.conv2[1], block.skip[1]
            self.layouts.append(_conv_layout(c1.weight.shape[1]))
            self.put(f"w1_{i}", c1.weight * (c1.scale * SQRT2))
            self.put(f"b1_{i}", block.conv1[1].bias * SQRT2)
            self.put(f"w2_{i}", c2.weight * c2.scale)
            self.put(f"b2_{i}", block.conv2[2].bias)
            self.put(f"ws_{i}", sk.weight * (sk.scale / SQRT2))
            self.put(f"blur_{i}", _depthwise(block.conv2[0].kernel, c1.weight.shape[1]))
        self.put("last_w", convs[-1].weight * convs[-1].scale)
        self.n_fc = len(fc)
        for j, lin in enumerate(fc):
            self.put(f"fc_w{j}", lin.weight * lin.scale)
            self.put(f"fc_b{j}", lin.bias)

    def forward(self, x: torch.Tensor):
        """x (B, 3, S, S) → w_a (B, style_dim), feats [(B, C_r, r, r) for r = 8 … S]."""
        x = F.leaky_relu_(F.conv2d(x, self.first_w).add_(self.first_b), 0.2)
        feats = [x]
        for i in range(self.n_blocks):
            x = x.contiguous(memory_format=self.layouts[i])
            y = F.leaky_relu_(F.conv2d(x, self.get(f"w1_{i}"), padding=1).add_(self.get(f"b1_{i}")), 0.2)
            y = F.conv2d(blur(y, self.get(f"blur_{i}"), (2, 2)), self.get(f"w2_{i}"), stride=2)
            y = F.leaky_relu_(y.add_(self.get(f"b2_{i}")), 0.2)
            x = y.add_(F.conv2d(blur(x, self.get(f"blur_{i}"), (1, 1), stride=2), self.get(f"ws_{i}")))
            feats.append(x)
        w_a = F.conv2d(x, self.last_w).flatten(1)
        return w_a, feats[-2::-1]  # the ResBlock inputs, 8×8 first … S×S last

    def motion_from_wa(self, w_a: torch.Tensor) -> torch.Tensor:
        """alpha = fc(w_a): five linears without activations."""
        for j in range(self.n_fc):
            w_a = F.linear(w_a, self.get(f"fc_w{j}"), self.get(f"fc_b{j}"))
        return w_a


class FastRenderer(_Prepared):
    """SourceState tensors + alpha (N, motion_dim) → frames (N, 3, S, S), absolute mode, unclamped.

    style_dtype: dtype of the stacked modulations and demodulation factors (default float64 for fp32/fp64
    models, float32 for 16-bit ones; exporters pass float32, since TensorRT has no float64)."""

    def __init__(self, lia: LIA, style_dtype: torch.dtype | None = None):
        super().__init__()
        dec, cfg = lia.dec, lia.cfg
        dtype = dec.direction.weight.dtype
        wide = torch.promote_types(dtype, torch.float32)  # derived constants computed in at least fp32
        # Styles and demodulation factors are O(channels) per frame: keep them in float64 (float32 for 16-bit
        # models) so the affine rewrite adds no rounding of its own; the feature maps stay in `dtype`.
        if style_dtype is None:
            style_dtype = torch.float64 if wide == torch.float32 or wide == torch.float64 else torch.float32
        self.style_dtype = style_dtype
        q = motion_basis(dec.direction.weight).to(self.style_dtype)
        self.put("q", q.to(dtype))
        # Modulated layers in execution order: conv1, then per block (up conv, conv, to_flow).
        styled = [dec.conv1]
        for k in range(len(dec.to_flows)):
            styled += [dec.convs[2 * k], dec.convs[2 * k + 1], dec.to_flows[k]]
        mods = [m.conv for m in styled]
        # Stacked modulation with the conv scale folded in: s = scale·(M z + b) with z = w_a + alpha Qᵀ.
        sd = self.style_dtype
        mod_w = torch.cat([m.modulation.weight.to(sd) * (m.modulation.scale * m.scale) for m in mods])
        mod_b = torch.cat([m.modulation.bias.to(sd) * m.scale for m in mods])
        self.put("mod_w", mod_w)  # (n_styles, style_dim)
        self.put("mod_b", mod_b)
        self.put("mod_p", mod_w @ q)  # (n_styles, motion_dim)
        self.splits = [m.cin for m in mods]
        self.upsample = [m.upsample for m in mods]
        self.put("const", dec.input.input)
        self.layouts: list[torch.memory_format] = []
        for i, (layer, m) in enumerate(zip(styled, mods, strict=True)):
            w = m.weight[0]  # (Cout, Cin, k, k)
            if m.demodulate:
                self.put(f"wsq{i}", w.to(sd).pow(2).sum([2, 3]))  # (Cout, Cin)
                self.put(f"act_b{i}", layer.activate.bias)
            else:  # to_flow: 1×1, applied as a per-frame (3, C) matrix
                self.put(f"flow_b{i}", layer.bias)
                w = w.flatten(1)
            if m.upsample:
                w = w.transpose(0, 1).contiguous()  # conv_transpose2d wants (Cin, Cout, k, k)
                self.put(f"blur{i}", _depthwise(m.blur.kernel, m.cout))
            self.layouts.append(torch.channels_last if m.upsample else _conv_layout(m.cin))
            self.put(f"w{i}", w.contiguous(memory_format=self.layouts[-1]) if w.dim() == 4 else w)
        for k, t in enumerate(dec.to_rgbs):
            self.put(f"rgb_w{k}", t.conv[0].weight * t.conv[0].scale)
            self.put(f"rgb_act_b{k}", t.conv[1].bias)
            self.put(f"rgb_b{k}", t.bias)
        self.put("up_blur", _depthwise(dec.to_rgbs[0].upsample.kernel, 3))
        for r in cfg.resolutions:
            self.put(f"grid{r}", base_grid(r, device=q.device, dtype=wide))  # coordinates never below fp32

    def styles0(self, w_a: torch.Tensor) -> torch.Tensor:
        """Per-source modulations at alpha = 0: (B, n_styles), in style_dtype."""
        return F.linear(w_a.to(self.style_dtype), self.mod_w, self.mod_b)

    def _styled_conv(self, i: int, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Batched modulated conv: conv(x·s, W) · rsqrt(s² @ Σ W² + 1e-8), then FusedLeakyReLU (√2 folded in)."""
        w = self.get(f"w{i}")
        # Transposed convs run channels-last (oneDNN is 2-4× faster there, equally accurate); 3×3 convs NCHW (as
        # fast here, and their fp32 accumulation is 2-5× more accurate). The modulation writes the layout wanted.
        layout = self.layouts[i]
        if torch.compiler.is_compiling():  # out= with a strided tensor breaks the graph; inductor fuses this
            x = (x * s.to(x.dtype)[:, :, None, None]).contiguous(memory_format=layout)
        else:
            x = torch.mul(x, s.to(x.dtype)[:, :, None, None], out=torch.empty_like(x, memory_format=layout))
        if self.upsample[i]:
            out = blur(F.conv_transpose2d(x, w, stride=2), self.get(f"blur{i}"), (1, 1))
        else:
            out = F.conv2d(x, w, padding=w.shape[-1] // 2)
        demod = (torch.rsqrt(F.linear(s.square(), self.get(f"wsq{i}")) + 1e-8) * SQRT2).to(out.dtype)  # (N, Cout)
        out = out.mul_(demod[:, :, None, None]).add_(self.get(f"act_b{i}"), alpha=SQRT2)
        return F.leaky_relu_(out, 0.2)

    def forward(
        self,
        alpha: torch.Tensor,
        styles0: torch.Tensor,
        feats: list[torch.Tensor],
        src_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """alpha (N, motion_dim); styles0 (B, n_styles) and feats [(B, C_r, r, r)] of B sources, B = 1 (shared by
        every frame) or N (one per frame); or, with src_index (N,) int64, frame n renders source src_index[n] of K
        (styles0 gathered, the warp reads feats[src_index[n]] without copying). → frames (N, 3, S, S)."""
        n = alpha.shape[0]
        if src_index is not None:
            styles0 = styles0.index_select(0, src_index)  # (N, n_styles): O(channels) a frame
        styles = styles0.to(self.style_dtype) + F.linear(alpha.to(self.style_dtype), self.mod_p)
        s = torch.split(styles, self.splits, dim=1)  # per layer (N, Cin)
        h = self._styled_conv(0, self.const.expand(n, -1, -1, -1), s[0])
        rgb = logits = None
        for k, feat in enumerate(feats):
            i = 1 + 3 * k
            h = self._styled_conv(i + 1, self._styled_conv(i, h, s[i]), s[i + 1])
            # ToFlow: a 1×1 modulated conv without demodulation, as one (HW, C) @ (C, 3) product per frame
            nb, c, r, _ = h.shape
            w_flow = (self.get(f"w{i + 2}")[None] * s[i + 2][:, None, :]).to(h.dtype)  # (N, 3, C)
            step = torch.bmm(h.permute(0, 2, 3, 1).reshape(nb, r * r, c), w_flow.transpose(1, 2))  # (N, HW, 3)
            step = step.view(nb, r, r, 3).permute(0, 3, 1, 2) + self.get(f"flow_b{i + 2}")
            logits = step if logits is None else step + upsample2(logits, self.up_blur)
            warped, h = warp_blend(feat, logits, h, self.get(f"grid{r}"), src_index)
            out = F.conv2d(warped, self.get(f"rgb_w{k}"))
            out = F.leaky_relu(out + self.get(f"rgb_act_b{k}"), 0.2) * SQRT2 + self.get(f"rgb_b{k}")
            rgb = out if rgb is None else out + upsample2(rgb, self.up_blur)
        return rgb
