"""The single-view reconstruction (SVR) model of ISS (paper 000, Sec. 3 and Fig. 3): E_S and D.

``E_S`` maps an image I to a shape latent ``z = f_S`` (ISS uses DVR [23], whose encoder is a ResNet-18); the
decoder ``D(p, z) -> (occupancy logit, rgb)`` is :class:`backend.fields.decoder.ImplicitDecoder` from the 3D
core. The mapper M is trained to regress ``E_S(I)`` from CLIP features (Eq. 2), and stage 2 / stylization render
D (Eq. 3, 4, 6).

Simplification: E_S is a small ResNet (one basic residual block per stage, configurable widths) instead of
ResNet-18, so the starter model trains on a CPU; the tiny configuration is a few thousand parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.errors import InputError
from backend.models.io import deterministic, load_weights, read_config, save_module

KIND = "svr"


@dataclass
class SVRConfig:
    image_size: int = 128                 # input resolution of E_S (images are resized to it)
    encoder_widths: tuple = (32, 64, 128, 256)  # one residual stage per width, stride 2 each
    latent_dim: int = 256                 # L, DVR's latent size
    decoder_hidden: int = 512             # DVR decoder width
    decoder_blocks: int = 5               # DVR: 5 ResnetBlockFC
    pe_freqs: int = 0                     # 0 = DVR's raw xyz input


class _BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with BatchNorm replaced by GroupNorm (batch-size independent)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        groups = max(1, min(8, cout // 4))
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.GroupNorm(groups, cout)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout)) \
            if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(h)) + self.skip(x))


class ImageEncoder(nn.Module):
    """E_S: image (B, 3, H, W) in [0, 1] -> shape latent (B, L)."""

    def __init__(self, widths: tuple, latent_dim: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        w0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.GroupNorm(max(1, min(8, w0 // 4)), w0), nn.ReLU())
        stages, cin = [], w0
        for w in widths:
            stages.append(_BasicBlock(cin, w, 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, latent_dim)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"SVR images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        x = self.stages(self.stem(x * 2.0 - 1.0))
        return self.fc(x.mean(dim=(2, 3)))


class SVRModel(nn.Module):
    """E_S + D. ``encode(images) -> z``; ``decode(points, z) -> (logits, rgb)``; ``forward`` = decode."""

    def __init__(self, config: SVRConfig | None = None) -> None:
        super().__init__()
        from backend.fields.decoder import ImplicitDecoder

        self.config = c = config or SVRConfig()
        self.encoder = ImageEncoder(tuple(c.encoder_widths), c.latent_dim, c.image_size)
        self.decoder = ImplicitDecoder(c.latent_dim, c.decoder_hidden, c.decoder_blocks, c.pe_freqs)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, images: Tensor) -> Tensor:
        """f_S = E_S(I)."""
        return self.encoder(images)

    def decode(self, points: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """D(p, z): occupancy logits (B, P) and colours (B, P, 3) in [0, 1]."""
        return self.decoder(points, z)

    forward = decode

    def save(self, directory: str | Path) -> Path:
        return save_module(self, self.config, KIND, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", fetch_hint: str = "") -> "SVRModel":
        cfg = read_config(directory, KIND, SVRConfig, fetch_hint)
        return load_weights(cls(cfg), directory, KIND, device, fetch_hint)  # type: ignore[return-value]

    @classmethod
    def tiny(cls, device: str = "cpu", seed: int = 1) -> "SVRModel":
        with deterministic(seed):
            m = cls(SVRConfig(image_size=32, encoder_widths=(8, 16), latent_dim=16, decoder_hidden=32,
                              decoder_blocks=2, pe_freqs=0))
            # A random decoder is inside (or outside) everywhere; shift its occupancy bias so that about a third of
            # the cube is inside at z = 0: the tiny shape then has a surface to render and mesh (text-to-shape tests).
            with torch.no_grad():
                from backend.fields.grid import grid_points

                logits, _ = m.decoder(grid_points(12).reshape(1, -1, 3), torch.zeros(1, m.latent_dim))
                m.decoder.fc_out.bias[0] -= torch.quantile(logits.flatten(), 0.67)
        return m.to(device).eval()
