"""Latent-conditioned implicit decoder: occupancy logit + RGB (the SVR decoder D of ISS / DVR).

ISS++ (paper 000, Sec. 3, Fig. 3) uses DVR [23] as the single-view-reconstruction model: an encoder maps an image
to a shape latent ``z`` and a decoder ``D(p, z)`` predicts, for a query point ``p``, an occupancy ``D_o(p)`` and a
colour ``D_c(p)``. The DVR decoder is a stack of residual fully connected blocks ("ResnetBlockFC"): the point is
lifted to the hidden width by one linear layer, and before every block the latent code, passed through its own
linear layer, is *added* to the hidden feature. A final linear layer after a ReLU gives 1 + 3 outputs: the
occupancy logit and the colour logits (colour through a sigmoid).

ISS++ Sec. 3.3 (texture stylization) duplicates D except its output layer into ``D_o`` and ``D_c`` so that colour
can be fine-tuned without touching the occupancy branch: :meth:`ImplicitDecoder.split_heads` does exactly that.

Optional NeRF-style positional encoding of the points (``pe_freqs > 0``) is an addition for sharper detail; the
default ``pe_freqs = 0`` is DVR's plain coordinate input.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor, nn


class ResnetBlockFC(nn.Module):
    """Residual FC block of DVR/ONet: ``x + fc_1(relu(fc_0(relu(x))))``; ``fc_1`` starts at zero (identity block)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc_0 = nn.Linear(width, width)
        self.fc_1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        nn.init.zeros_(self.fc_1.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc_1(self.act(self.fc_0(self.act(x))))


def positional_encoding(points: Tensor, n_freqs: int) -> Tensor:
    """NeRF positional encoding ``gamma(p) = (p, sin(2^k pi p), cos(2^k pi p))_{k<n_freqs}`` (Dream3D Eq. 6c)."""
    if n_freqs <= 0:
        return points
    freqs = (2.0 ** torch.arange(n_freqs, device=points.device, dtype=points.dtype)) * math.pi
    xf = points[..., None, :] * freqs[:, None]  # (..., F, 3)
    enc = torch.cat([torch.sin(xf), torch.cos(xf)], dim=-1).flatten(-2)
    return torch.cat([points, enc], dim=-1)


class ImplicitDecoder(nn.Module):
    """DVR-style decoder ``D(p, z) -> (occupancy logit, rgb)`` (ISS++ Fig. 3 "decoder D"; DVR decoder).

    Args:
        latent_dim: size L of the shape latent ``z`` (0 makes an unconditioned decoder).
        hidden: hidden width of every residual block (512 in DVR / ISS).
        n_blocks: number of residual FC blocks (5 in DVR).
        pe_freqs: positional-encoding frequencies for the points (0 = raw xyz, as in DVR).

    ``forward(points (B, P, 3), z (B, L)) -> (logits (B, P), rgb (B, P, 3))``; rgb in [0, 1].
    """

    def __init__(self, latent_dim: int = 256, hidden: int = 512, n_blocks: int = 5, pe_freqs: int = 0) -> None:
        super().__init__()
        if hidden <= 0 or n_blocks <= 0:
            raise ValueError("ImplicitDecoder needs hidden > 0 and n_blocks > 0")
        self.latent_dim = int(latent_dim)
        self.hidden = int(hidden)
        self.n_blocks = int(n_blocks)
        self.pe_freqs = int(pe_freqs)
        in_dim = 3 + 6 * self.pe_freqs
        self.fc_p = nn.Linear(in_dim, hidden)
        self.fc_z = nn.ModuleList([nn.Linear(latent_dim, hidden) for _ in range(n_blocks)]) if latent_dim > 0 else None
        self.blocks = nn.ModuleList([ResnetBlockFC(hidden) for _ in range(n_blocks)])
        self.fc_out = nn.Linear(hidden, 4)
        self.act = nn.ReLU()
        # After split_heads(): a separate colour trunk (ISS++ Sec. 3.3, D_c); None means shared trunk.
        self.color_branch: Optional[nn.Module] = None

    def config(self) -> dict:
        """Constructor arguments, for saving next to a checkpoint."""
        return {"latent_dim": self.latent_dim, "hidden": self.hidden, "n_blocks": self.n_blocks, "pe_freqs": self.pe_freqs}

    def _trunk(self, points: Tensor, z: Optional[Tensor], fc_p: nn.Module, fc_z, blocks) -> Tensor:
        net = fc_p(positional_encoding(points, self.pe_freqs))
        for i, block in enumerate(blocks):
            if fc_z is not None and z is not None:
                net = net + fc_z[i](z)[:, None, :]
            net = block(net)
        return self.act(net)

    def forward(self, points: Tensor, z: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape (B, P, 3), got {tuple(points.shape)}")
        if self.latent_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.latent_dim or z.shape[0] != points.shape[0]:
                got = None if z is None else tuple(z.shape)
                raise ValueError(f"z must have shape ({points.shape[0]}, {self.latent_dim}), got {got}")
        feat = self._trunk(points, z, self.fc_p, self.fc_z, self.blocks)
        out = self.fc_out(feat)
        logits = out[..., 0]
        if self.color_branch is None:
            rgb_logits = out[..., 1:4]
        else:
            cb = self.color_branch
            rgb_logits = cb.fc_out(self._trunk(points, z, cb.fc_p, cb.fc_z, cb.blocks))
        return logits, torch.sigmoid(rgb_logits)

    def colour(self, points: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """Colour ``D_c(p)`` (B, P, 3) alone: after :meth:`split_heads` only the colour network runs."""
        if self.color_branch is None:
            return self.forward(points, z)[1]
        cb = self.color_branch
        return torch.sigmoid(cb.fc_out(self._trunk(points, z, cb.fc_p, cb.fc_z, cb.blocks)))

    def split_heads(self) -> nn.Module:
        """Duplicate the trunk into an occupancy network D_o and a colour network D_c (ISS++ Sec. 3.3).

        The output layer is decomposed into 1 channel (occupancy, kept here) and 3 channels (colour, on the new
        copy), so outputs are unchanged right after the split. Returns the colour branch (its parameters are the
        ones texture stylization optimises).
        """
        if self.color_branch is not None:
            return self.color_branch
        cb = nn.Module()
        cb.fc_p = copy.deepcopy(self.fc_p)
        cb.fc_z = copy.deepcopy(self.fc_z)
        cb.blocks = copy.deepcopy(self.blocks)
        cb.fc_out = nn.Linear(self.hidden, 3).to(self.fc_out.weight.device, self.fc_out.weight.dtype)
        with torch.no_grad():
            cb.fc_out.weight.copy_(self.fc_out.weight[1:4])
            cb.fc_out.bias.copy_(self.fc_out.bias[1:4])
        self.color_branch = cb
        return cb

    def occupancy_parameters(self) -> list[nn.Parameter]:
        """Parameters of the occupancy branch D_o (trunk + output layer)."""
        params = list(self.fc_p.parameters()) + list(self.blocks.parameters()) + list(self.fc_out.parameters())
        if self.fc_z is not None:
            params += list(self.fc_z.parameters())
        return params
