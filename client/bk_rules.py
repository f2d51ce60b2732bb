"""Per-layer rules of book-keeping DP-SGD: from a layer's input `a` (kept by a forward hook) and the gradient
`g` of the summed per-example loss with respect to its output, each rule gives

- the squared norm of every example's gradient of the layer's trainable parameters (shape [B]), and
- a function that, given per-example clipping factors c ([B]), returns the clipped sum sum_b c_b grad_b
  for each of those parameters.

No rule runs a weight-gradient kernel of autograd: everything comes from (a, g). Layers whose weight acts on T
positions per example (sequences, convolution windows) choose, per layer, between the ghost norm
(||a_b^T g_b||^2 = <a_b a_b^T, g_b g_b^T>, cost ~ B T^2 (d + p)) and the per-example gradient itself
(a_b^T g_b, cost ~ B T p d, then kept for the clipped sum): ghost when 2 T^2 <= p d, as in Bu et al. (2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ClippedSum = Callable[[torch.Tensor], list[tuple[nn.Parameter, torch.Tensor]]]

# Conv windows are copied (im2col) in chunks of at most this many elements, so batch 1024 stays in memory.
_IM2COL_CHUNK_ELEMENTS = 1 << 25


@dataclass
class LayerGrads:
    norm_sq: torch.Tensor  # [B]: each example's squared gradient norm over this layer's trainable parameters
    clipped_sum: ClippedSum


def _trainable(p: nn.Parameter | None) -> bool:
    return p is not None and p.requires_grad


def _positions_rule(a: torch.Tensor, g: torch.Tensor, weight: nn.Parameter,
                    bias: nn.Parameter | None) -> LayerGrads:
    """A weight used as out[b, t] = W a[b, t] (+ bias) at T positions: a [B, T, d], g [B, T, p]."""
    batch, positions, d = a.shape
    p = g.shape[2]
    norm_sq = torch.zeros(batch, dtype=g.dtype, device=g.device)
    per_example: torch.Tensor | None = None
    if _trainable(weight):
        if positions == 1:
            # rank one: ||g a^T||^2 = ||g||^2 ||a||^2, and the clipped sum is one GEMM
            norm_sq = norm_sq + a[:, 0].square().sum(1) * g[:, 0].square().sum(1)
        elif 2 * positions * positions <= p * d:
            aat = torch.bmm(a, a.transpose(1, 2))
            ggt = torch.bmm(g, g.transpose(1, 2))
            norm_sq = norm_sq + (aat * ggt).sum((1, 2))
        else:
            per_example = torch.bmm(g.transpose(1, 2), a)  # [B, p, d]
            norm_sq = norm_sq + per_example.square().sum((1, 2))
    bias_grad = g.sum(1) if _trainable(bias) else None  # [B, p]
    if bias_grad is not None:
        norm_sq = norm_sq + bias_grad.square().sum(1)

    def clipped_sum(c: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        out = []
        if _trainable(weight):
            if per_example is not None:
                summed = (c @ per_example.reshape(batch, -1)).view(p, d)
            else:
                summed = (g * c.view(-1, 1, 1)).reshape(-1, p).t() @ a.reshape(-1, d)
            out.append((weight, summed.view_as(weight)))
        if bias_grad is not None:
            out.append((bias, c @ bias_grad))
        return out

    return LayerGrads(norm_sq, clipped_sum)


def linear_rule(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> LayerGrads:
    """nn.Linear on [B, d] or [B, ..., d] inputs (every middle dimension counts as a position)."""
    batch = a.shape[0]
    return _positions_rule(a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1]),
                           module.weight, module.bias)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding, as F.conv2d applies it ('same' may be asymmetric)."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, dil in zip(module.kernel_size, module.dilation, strict=True):  # 'same' (stride 1 only)
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return (left, right, top, bottom)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def _windows(a: torch.Tensor, module: nn.Conv2d, out_h: int, out_w: int) -> torch.Tensor:
    """im2col without F.unfold (very slow on CPU): a strided view [B, Ho, Wo, Cin, kh, kw] of the padded
    input, copied once into [B, Ho*Wo, Cin*kh*kw], the column order of the weight's [Cin, kh, kw]."""
    padded = F.pad(a, _conv_padding(module))
    batch, channels = padded.shape[:2]
    sb, sc, sh, sw = padded.stride()
    (kh, kw), (st_h, st_w), (dh, dw) = module.kernel_size, module.stride, module.dilation
    view = padded.as_strided((batch, out_h, out_w, channels, kh, kw),
                             (sb, st_h * sh, st_w * sw, sc, dh * sh, dw * sw))
    return view.reshape(batch, out_h * out_w, channels * kh * kw)


def conv2d_rule(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> LayerGrads:
    """nn.Conv2d (groups 1, zero padding, any stride, dilation and padding): a linear map on the windows."""
    batch, cout, out_h, out_w = g.shape
    positions = out_h * out_w
    d = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    g3 = g.reshape(batch, cout, positions)
    if 2 * positions * positions <= cout * d:
        return _positions_rule(_windows(a, module, out_h, out_w), g3.transpose(1, 2), module.weight, module.bias)
    # Per-example gradients [B, Cout, d], one batched GEMM per chunk of examples (bounded im2col memory).
    chunk = max(1, _IM2COL_CHUNK_ELEMENTS // max(1, positions * d))
    weight = module.weight
    per_example = None
    if _trainable(weight):
        per_example = torch.cat([torch.bmm(g3[i:i + chunk], _windows(a[i:i + chunk], module, out_h, out_w))
                                 for i in range(0, batch, chunk)]) if batch else g3.new_zeros(0, cout, d)
    bias_grad = g3.sum(2) if _trainable(module.bias) else None
    norm_sq = torch.zeros(batch, dtype=g.dtype, device=g.device)
    if per_example is not None:
        norm_sq = norm_sq + per_example.square().sum((1, 2))
    if bias_grad is not None:
        norm_sq = norm_sq + bias_grad.square().sum(1)

    def clipped_sum(c: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        out = []
        if per_example is not None:
            out.append((weight, (c @ per_example.reshape(batch, -1)).view_as(weight)))
        if bias_grad is not None:
            out.append((module.bias, c @ bias_grad))
        return out

    return LayerGrads(norm_sq, clipped_sum)


def _affine_rule(x_hat: torch.Tensor, g: torch.Tensor, weight: nn.Parameter | None, bias: nn.Parameter | None,
                 reduce_dims: tuple[int, ...]) -> LayerGrads:
    """Elementwise affine out = x_hat * w + b: per-example grads are sums of g * x_hat and of g."""
    grads: list[tuple[nn.Parameter, torch.Tensor]] = []
    if _trainable(weight):
        grads.append((weight, (g * x_hat).sum(reduce_dims)))
    if _trainable(bias):
        grads.append((bias, g.sum(reduce_dims)))
    batch = g.shape[0]
    norm_sq = sum((pe.reshape(batch, -1).square().sum(1) for _, pe in grads),
                  torch.zeros(batch, dtype=g.dtype, device=g.device))

    def clipped_sum(c: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(p, (c @ pe.reshape(batch, -1)).view_as(p)) for p, pe in grads]

    return LayerGrads(norm_sq, clipped_sum)


def group_norm_rule(module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> LayerGrads:
    """GroupNorm over [B, C, *]: weight and bias are per channel, summed over the spatial positions."""
    # The normalised input, recomputed from the kept input (the same mean and rstd as the forward pass).
    x_hat = F.group_norm(a, module.num_groups, eps=module.eps)
    batch, channels = g.shape[:2]
    return _affine_rule(x_hat.reshape(batch, channels, -1), g.reshape(batch, channels, -1),
                        module.weight, module.bias, (2,))


def layer_norm_rule(module: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor) -> LayerGrads:
    """LayerNorm over the last dims of [B, ..., *shape]: summed over the positions in between."""
    x_hat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
    batch, shape = g.shape[0], tuple(module.normalized_shape)
    return _affine_rule(x_hat.reshape(batch, -1, *shape), g.reshape(batch, -1, *shape),
                        module.weight, getattr(module, "bias", None), (1,))


def embedding_rule(module: nn.Embedding, a: torch.Tensor, g: torch.Tensor) -> LayerGrads:
    """nn.Embedding on [B, ...] ids: example b's gradient adds g[b, t] to row ids[b, t]. Its norm is the ghost
    norm sum_{t,s} [ids_t = ids_s] <g_t, g_s>, or, for long sequences, the dense per-example table."""
    batch = a.shape[0]
    ids = a.reshape(batch, -1)
    g3 = g.reshape(batch, ids.shape[1], -1)
    if module.padding_idx is not None:
        # torch gives the padding row no gradient; the rule must agree.
        g3 = g3 * (ids != module.padding_idx).unsqueeze(-1).to(g3.dtype)
    positions, (rows, dim) = ids.shape[1], module.weight.shape
    if 2 * positions * positions <= rows * dim:
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g3.dtype)
        norm_sq = (same * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
    else:
        table = g3.new_zeros(batch, rows, dim)
        table.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, dim), g3)
        norm_sq = table.square().sum((1, 2))
    weight = module.weight

    def clipped_sum(c: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        summed = torch.zeros_like(weight)
        summed.index_add_(0, ids.reshape(-1), (g3 * c.view(-1, 1, 1)).reshape(-1, dim))
        return [(weight, summed)]

    return LayerGrads(norm_sq, clipped_sum)


Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], LayerGrads]

# Exact types only: a subclass (e.g. Opacus' RNNLinear inside DPLSTM, applied once per time step) may be used
# in ways its parent's rule does not cover.
RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: linear_rule,
    nn.Conv2d: conv2d_rule,
    nn.GroupNorm: group_norm_rule,
    nn.LayerNorm: layer_norm_rule,
    nn.Embedding: embedding_rule,
}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why book-keeping cannot take this module's per-example gradients, or None if it can."""
    rule = RULES.get(type(module))
    if rule is None:
        return f"no book-keeping rule for {type(module).__name__}"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r}"
        if module.padding == "same" and module.stride != (1, 1):
            return "Conv2d with padding='same' and a stride"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "Embedding with max_norm or sparse gradients"
    return None
