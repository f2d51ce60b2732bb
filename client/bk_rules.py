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

Saved = tuple[torch.Tensor, ...] | None  # what forward_stats kept from the forward pass
ClippedSum = Callable[[torch.Tensor], list[tuple[nn.Parameter, torch.Tensor]]]


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
            norm_sq = norm_sq + torch.linalg.vecdot(a[:, 0], a[:, 0]) * torch.linalg.vecdot(g[:, 0], g[:, 0])
        elif 2 * positions * positions <= p * d:
            aat = torch.bmm(a, a.transpose(1, 2))
            ggt = torch.bmm(g, g.transpose(1, 2))
            norm_sq = norm_sq + torch.linalg.vecdot(aat.reshape(batch, -1), ggt.reshape(batch, -1))
        else:
            per_example = torch.bmm(g.transpose(1, 2), a)  # [B, p, d]
            norm_sq = norm_sq + torch.linalg.vector_norm(per_example.reshape(batch, -1), dim=1).square()
    bias_grad = g.sum(1) if _trainable(bias) else None  # [B, p]
    if bias_grad is not None:
        norm_sq = norm_sq + torch.linalg.vecdot(bias_grad, bias_grad)

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


def linear_rule(module: nn.Linear, a: torch.Tensor, g: torch.Tensor, saved: Saved) -> LayerGrads:
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


def _shifted_per_example(a: torch.Tensor, g: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
    """Per-example weight gradients of a stride-1 conv, [kh*kw, B, Cout, Cin], by one batched GEMM per kernel
    offset on a channels-last copy of the padded input: no im2col at all.

    Row r = y*Wp + x of the flattened padded input, read from offset (i, j), is input pixel (y+i, x+j) for the
    output columns x < Wo; the columns x >= Wo of each row wrap into the next row, so the output gradients get
    Wp - Wo zero columns there and those products vanish. One spare zero row keeps the last example's reads
    inside the tensor."""
    left, right, top, bottom = _conv_padding(module)
    padded = F.pad(a, (left, right, top, bottom + 1)).permute(0, 2, 3, 1).contiguous()  # [B, Hp+1, Wp, Cin]
    batch, _, wp, cin = padded.shape
    _, cout, out_h, out_w = g.shape
    rows = out_h * wp
    gp = F.pad(g, (0, wp - out_w)).reshape(batch, cout, rows)
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    out = g.new_empty(kh * kw, batch, cout, cin)
    base, batch_stride = padded.storage_offset(), padded.stride(0)
    for i in range(kh):
        for j in range(kw):
            slab = padded.as_strided((batch, rows, cin), (batch_stride, cin, 1),
                                     base + (i * dh * wp + j * dw) * cin)
            torch.bmm(gp, slab, out=out[i * kw + j])
    return out


def _grouped_per_example(a: torch.Tensor, g: torch.Tensor, module: nn.Conv2d,
                         padding: tuple[int, int]) -> torch.Tensor:
    """Per-example weight gradients [B, Cout, Cin, kh, kw] as the weight gradient of one grouped convolution with
    the batch as the groups: oneDNN's own kernel, any stride, padding and dilation, no im2col."""
    batch, cout, out_h, out_w = g.shape
    cin = a.shape[1]
    # Only the weight's shape matters to a weight-gradient-only backward: an uninitialised tensor (never read)
    # saves copying the weight B times.
    shape_only = a.new_empty(batch * cout, cin, *module.kernel_size)
    grads = torch.ops.aten.convolution_backward(
        g.reshape(1, batch * cout, out_h, out_w), a.reshape(1, batch * cin, *a.shape[2:]), shape_only, None,
        list(module.stride), list(padding), list(module.dilation), False, [0, 0], batch, [False, True, False])[1]
    return grads.view(batch, cout, cin, *module.kernel_size)


# Below this many output positions per example, oneDNN's grouped-conv kernel loses to shifted GEMMs here
# (measured on this CPU: 64->64 channels at 7x7 took 70 ms against 48 ms, 16->16 at 28x28 18 ms against 39 ms).
_GROUPED_MIN_POSITIONS = 100


# Up to this many weights per output channel (Cin * kh * kw: an RGB or grey image's first 3x3 conv), the
# im2col windows are no larger than a few copies of the input, and one batched GEMM on them beats oneDNN's
# grouped-conv kernel (measured here: 1->32 channels at 28x28, batch 64, 0.9 ms against 1.1 ms).
_WINDOWS_MAX_COLUMNS = 32


def _small_window_rule(a: torch.Tensor, g3: torch.Tensor, module: nn.Conv2d, out_h: int, out_w: int) -> LayerGrads:
    """Per-example weight and bias gradients together, [B, Cout, d + 1], by one batched GEMM of the output
    gradients with the im2col windows and a row of ones (whose product is the bias gradient). The windows are
    laid out [B, d + 1, positions], so the one copy that builds them reads and writes along image rows (twice
    as fast here as the [B, positions, d] layout)."""
    batch, cout, positions = g3.shape
    padded = F.pad(a, _conv_padding(module))
    sb, sc, sh, sw = padded.stride()
    (kh, kw), (st_h, st_w), (dh, dw) = module.kernel_size, module.stride, module.dilation
    cin = module.in_channels
    d = cin * kh * kw
    with_bias = _trainable(module.bias)
    columns = g3.new_empty(batch, d + int(with_bias), positions)
    columns[:, :d].view(batch, cin, kh, kw, out_h, out_w).copy_(
        padded.as_strided((batch, cin, kh, kw, out_h, out_w), (sb, sc, dh * sh, dw * sw, st_h * sh, st_w * sw)))
    if with_bias:
        columns[:, d] = 1.0
    per_example = torch.bmm(g3, columns.transpose(1, 2)).reshape(batch, -1)  # [B, Cout * (d + 1)]
    weight, bias = module.weight, module.bias

    def clipped_sum(c: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        summed = (c @ per_example).view(cout, -1)
        out = [(weight, summed[:, :d].reshape(weight.shape))]
        if with_bias:
            out.append((bias, summed[:, d].contiguous()))
        return out

    return LayerGrads(torch.linalg.vector_norm(per_example, dim=1).square(), clipped_sum)


def conv2d_rule(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, saved: Saved) -> LayerGrads:
    """nn.Conv2d (groups 1, zero padding, any stride, dilation and padding): a linear map on the windows.
    Per-example gradients by oneDNN's grouped conv (large maps, strided convs) or by shifted GEMMs (small maps),
    or the ghost norm on im2col windows when there are few positions and many weights."""
    batch, cout, out_h, out_w = g.shape
    positions = out_h * out_w
    kh, kw = module.kernel_size
    d = module.in_channels * kh * kw
    g3 = g.reshape(batch, cout, positions)
    if 2 * positions * positions <= cout * d:
        return _positions_rule(_windows(a, module, out_h, out_w), g3.transpose(1, 2), module.weight, module.bias)
    weight = module.weight
    if _trainable(weight) and batch and d <= _WINDOWS_MAX_COLUMNS:
        return _small_window_rule(a, g3, module, out_h, out_w)
    left, right, top, bottom = _conv_padding(module)
    symmetric = left == right and top == bottom
    grads: list[tuple[nn.Parameter, torch.Tensor]] = []
    if _trainable(weight) and batch and module.stride == (1, 1) and (
            positions < _GROUPED_MIN_POSITIONS or not symmetric):
        per_offset = _shifted_per_example(a, g, module)  # [K, B, Cout, Cin]
        norm_sq = torch.linalg.vector_norm(per_offset, dim=(0, 2, 3)).square()

        def offsets_sum(c: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
            k = per_offset.shape[0]
            summed = torch.bmm(c.view(1, 1, batch).expand(k, 1, batch), per_offset.view(k, batch, -1))
            return [(weight, summed.view(kh, kw, cout, -1).permute(2, 3, 0, 1).contiguous())]

        layers = [LayerGrads(norm_sq, offsets_sum)]
    else:
        if _trainable(weight):
            grads.append((weight, _grouped_per_example(a, g, module, (top, left)) if batch
                          else g.new_zeros(0, *weight.shape)))
        layers = []
    if _trainable(module.bias):
        grads.append((module.bias, g3.sum(2)))
    layers.append(_per_example_rule(grads, batch, g))
    if len(layers) == 1:
        return layers[0]
    first, second = layers
    return LayerGrads(first.norm_sq + second.norm_sq, lambda c: first.clipped_sum(c) + second.clipped_sum(c))


def _per_example_rule(grads: list[tuple[nn.Parameter, torch.Tensor]], batch: int, g: torch.Tensor) -> LayerGrads:
    """Layers whose per-example gradients ([B, *param shape]) are cheap to hold outright."""
    norm_sq = sum((torch.linalg.vector_norm(pe.reshape(batch, -1), dim=1).square() for _, pe in grads),
                  torch.zeros(batch, dtype=g.dtype, device=g.device))

    def clipped_sum(c: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(p, (c @ pe.reshape(batch, -1)).view_as(p)) for p, pe in grads]

    return LayerGrads(norm_sq, clipped_sum)


def _affine_rule(x_hat: torch.Tensor, g: torch.Tensor, weight: nn.Parameter | None, bias: nn.Parameter | None,
                 reduce_dims: tuple[int, ...]) -> LayerGrads:
    """Elementwise affine out = x_hat * w + b: per-example grads are sums of g * x_hat and of g."""
    grads: list[tuple[nn.Parameter, torch.Tensor]] = []
    if _trainable(weight):
        grads.append((weight, (g * x_hat).sum(reduce_dims)))
    if _trainable(bias):
        grads.append((bias, g.sum(reduce_dims)))
    return _per_example_rule(grads, g.shape[0], g)


def forward_stats(module: nn.Module, output: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Called by the forward hook, while autograd still holds them: GroupNorm's per-group mean and 1/std, which
    its forward pass saved for the backward pass (freed once the backward has run)."""
    fn = output.grad_fn
    if isinstance(module, nn.GroupNorm) and type(fn).__name__ == "NativeGroupNormBackward0":
        return fn._saved_result1, fn._saved_result2
    return None


def _group_stats(module: nn.GroupNorm, a: torch.Tensor,
                 saved: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's per-group mean and 1/std, [B, groups]: as saved by the forward pass, or recomputed from
    the kept input where autograd saved none under those names."""
    if saved is not None:
        return saved[0], saved[1]
    grouped = a.reshape(a.shape[0], module.num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False)
    return mean, torch.rsqrt(var + module.eps)


def group_norm_rule(module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, saved: Saved) -> LayerGrads:
    """GroupNorm over [B, C, *]: per example and channel, sum_s g * x_hat (weight) and sum_s g (bias).

    Both come from torch's own fused GroupNorm backward kernel run on the batch seen as ONE example with B * C
    channels in B * groups groups: its weight and bias gradients are then exactly the per-example ones, in one
    pass over g and a, from the forward's saved mean and rstd (2.5-3.5x faster here than a product and sums)."""
    batch, channels = g.shape[:2]
    mean, rstd = _group_stats(module, a, saved)
    spatial = g[0, 0].numel()
    weight = module.weight.detach().repeat(batch) if module.weight is not None else None
    _, per_weight, per_bias = torch.ops.aten.native_group_norm_backward(
        g.reshape(1, batch * channels, spatial), a.reshape(1, batch * channels, spatial),
        mean.reshape(1, -1), rstd.reshape(1, -1), weight, 1, batch * channels, spatial,
        batch * module.num_groups, [False, True, True])
    grads: list[tuple[nn.Parameter, torch.Tensor]] = []
    if _trainable(module.weight):
        grads.append((module.weight, per_weight.view(batch, channels)))
    if _trainable(module.bias):
        grads.append((module.bias, per_bias.view(batch, channels)))
    return _per_example_rule(grads, batch, g)


def layer_norm_rule(module: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor,
                    saved: Saved) -> LayerGrads:
    """LayerNorm over the last dims of [B, ..., *shape]: summed over the positions in between."""
    x_hat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
    batch, shape = g.shape[0], tuple(module.normalized_shape)
    return _affine_rule(x_hat.reshape(batch, -1, *shape), g.reshape(batch, -1, *shape),
                        module.weight, getattr(module, "bias", None), (1,))


def embedding_rule(module: nn.Embedding, a: torch.Tensor, g: torch.Tensor,
                   saved: Saved) -> LayerGrads:
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
        norm_sq = torch.linalg.vecdot(same.reshape(batch, -1), torch.bmm(g3, g3.transpose(1, 2)).reshape(batch, -1))
    else:
        table = g3.new_zeros(batch, rows, dim)
        table.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, dim), g3)
        norm_sq = torch.linalg.vector_norm(table.reshape(batch, -1), dim=1).square()
    weight = module.weight

    def clipped_sum(c: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        summed = torch.zeros_like(weight)
        summed.index_add_(0, ids.reshape(-1), (g3 * c.view(-1, 1, 1)).reshape(-1, dim))
        return [(weight, summed)]

    return LayerGrads(norm_sq, clipped_sum)


Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, Saved], LayerGrads]

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
