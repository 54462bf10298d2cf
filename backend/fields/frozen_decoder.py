"""The implicit decoder's forward pass for a *frozen* decoder with a trainable latent, at a fraction of the memory.

ISS++ stage 2 (paper 000, Sec. 3.3.2) fine-tunes only the mapper M'; the SVR decoder D stays frozen, so the only
gradient the decoder passes on is the one to its latent input ``z``. Autograd does not know that the weights will
never need a gradient and keeps, for every one of the DVR trunk's ReLUs, its float32 output (N x hidden floats) for
the backward pass; for the 32^3 grid that stage 2 decodes every iteration on a CPU that was ~250 MB, about half of
the README main job's peak RSS above the loaded models (issue 15).

:func:`decode_frozen` computes the same function (:meth:`backend.fields.decoder.ImplicitDecoder.forward`) with a
custom backward that saves only each ReLU's sign as a bool (a quarter of the bytes) and runs the trunk in place.
Backward of the residual block ``y = x + W1 relu(W0 relu(x) + b0) + b1`` (weights frozen):

    dL/dx = dL/dy + [relu'(x)] * (W0^T ([relu'(h)] * (W1^T dL/dy)))

and since ``z`` enters before block i as ``x_i = net + W_z,i z + b_z,i``: ``dL/dz = sum_i W_z,i^T sum_p dL/dx_i(p)``.
The result and the gradient equal autograd's up to the summation order of float32 matrix products.

Used only where it applies: weights without ``requires_grad``, no split colour branch, no autocast (mixed dtypes in
a hand-written backward are not worth it); everything else goes through the decoder's own forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backend.fields.decoder import positional_encoding


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def applies(decoder: nn.Module, z: Tensor) -> bool:
    """Whether :func:`decode_frozen` may take the memory-saving path for ``decoder`` and ``z``."""
    return (torch.is_grad_enabled() and z.requires_grad and getattr(decoder, "fc_z", None) is not None
            and getattr(decoder, "color_branch", "x") is None and not _autocast_on()
            and not any(p.requires_grad for p in decoder.parameters()))


class _FrozenTrunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, points: Tensor, decoder: nn.Module) -> Tensor:  # type: ignore[override]
        masks = []
        with torch.no_grad():
            net = decoder.fc_p(positional_encoding(points, decoder.pe_freqs))  # (B, N, H); no z yet
            for i, block in enumerate(decoder.blocks):
                net.add_(decoder.fc_z[i](z)[:, None, :])
                m0 = net <= 0  # where the ReLU's gradient is 0 (kept as bools; masked_fill_ needs no float copy)
                h = block.fc_0(net.clamp_min(0))
                m1 = h <= 0
                net.add_(block.fc_1(h.clamp_min_(0)))
                masks += [m0, m1]
                del h
            mf = net <= 0
            net.clamp_min_(0)
        ctx.save_for_backward(*masks, mf)
        ctx.decoder = decoder
        return net

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        *masks, mf = ctx.saved_tensors
        dec = ctx.decoder
        g = grad.masked_fill(mf, 0.0)
        gz = None
        for i in reversed(range(len(dec.blocks))):
            block = dec.blocks[i]
            inner = torch.matmul(g, block.fc_1.weight)  # W1^T dL/dy (rows are points)
            inner.masked_fill_(masks[2 * i + 1], 0.0)
            inner = torch.matmul(inner, block.fc_0.weight)
            inner.masked_fill_(masks[2 * i], 0.0)
            g = g + inner  # dL/dx_i
            gi = torch.matmul(g.sum(dim=1), dec.fc_z[i].weight)  # (B, L)
            gz = gi if gz is None else gz + gi
        return gz, None, None


def decode_frozen(decoder: nn.Module, points: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``decoder(points, z)`` -> (logits (B, N), rgb (B, N, 3)); the memory-saving path where :func:`applies`."""
    if not applies(decoder, z):
        return decoder(points, z)
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, P, 3), got {tuple(points.shape)}")
    feat = _FrozenTrunk.apply(z, points, decoder)
    out = decoder.fc_out(feat)
    return out[..., 0], torch.sigmoid(out[..., 1:4])
