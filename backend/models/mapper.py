"""The CLIP2Shape mapper M of ISS (paper 000, Sec. 3.3.1): CLIP feature f -> SVR shape latent z.

"12 fully-connected and Leaky-ReLU layers" mapping the CLIP image feature f_I to the shape space Omega_S of the
SVR model. Stage 1 trains it with the L2 regression loss of Eq. 2, ``L_M = ||M(f_I) - E_S(I)||^2``
(:meth:`Mapper.regression_loss`), at lr 1e-4 (Sec. 4.2); stage 2 fine-tunes it per text with the CLIP consistency
loss (Eq. 4/5, in ``backend.losses``). Weights are initialised with He (Kaiming) normal initialisation for the
LeakyReLU and zero biases. The ISS code draws them from N(0, 0.02) (``init="normal"``); through 12 layers of width
256-512 that init shrinks the signal by about 10x per layer, so the mapper starts constant and, in a CPU-length
schedule, stays close to the mean latent: every prompt then gives the same shape (issue 12). He init keeps the
signal's scale through the stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from backend.errors import InputError
from backend.models.io import deterministic, load_weights, read_config, save_module

KIND = "mapper"


@dataclass
class MapperConfig:
    in_dim: int = 512        # CLIP embedding size D (ViT-B-32: 512)
    out_dim: int = 256       # SVR shape latent size L (DVR: 256)
    hidden: int = 512        # width of the hidden layers
    n_layers: int = 12       # ISS Sec. 3.3.1: 12 fully connected layers
    negative_slope: float = 0.02  # LeakyReLU(0.02)
    init_std: float = 0.02   # init="normal": weights ~ N(0, 0.02) (ISS code)
    init: str = "he"         # "he" (Kaiming normal for LeakyReLU) or "normal"
    latent_basis: int = 0    # rows of the stored basis of the shape-latent space (0: none; see Mapper.latent_basis)


class Mapper(nn.Module):
    """``M(f) -> z``: ``n_layers`` Linear layers with LeakyReLU between them (none after the last)."""

    def __init__(self, config: MapperConfig | None = None) -> None:
        super().__init__()
        self.config = config or MapperConfig()
        c = self.config
        if c.n_layers < 1:
            raise InputError("the mapper needs at least one layer")
        dims = [c.in_dim] + [c.hidden] * (c.n_layers - 1) + [c.out_dim]
        layers: list[nn.Module] = []
        for i in range(c.n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < c.n_layers - 1:
                layers.append(nn.LeakyReLU(c.negative_slope))
        self.net = nn.Sequential(*layers)
        if c.latent_basis > 0:
            # principal directions of the SVR latents M was trained on (rows, orthonormal, by falling variance): the
            # stage-2 aligner confines its update of z to the leading ones (ours; see Stage2Config.latent_subspace)
            self.register_buffer("latent_basis", torch.zeros(c.latent_basis, c.out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.net:
            if isinstance(m, nn.Linear):
                if self.config.init == "he":
                    nn.init.kaiming_normal_(m.weight, a=self.config.negative_slope, nonlinearity="leaky_relu")
                else:
                    nn.init.normal_(m.weight, 0.0, self.config.init_std)
                nn.init.zeros_(m.bias)

    def forward(self, f: Tensor) -> Tensor:
        if f.shape[-1] != self.config.in_dim:
            raise InputError(f"the mapper expects {self.config.in_dim}-d CLIP features, got {f.shape[-1]}-d "
                             "(the mapper and CLIP come from different profiles?)")
        return self.net(f)

    @torch.no_grad()
    def fit_latent_basis(self, z_shape: Tensor) -> None:
        """Store the principal directions of the shape latents ``z_shape`` (N, L) (PCA: right singular vectors of the
        centred latents, by falling variance) in :attr:`latent_basis`."""
        if self.config.latent_basis <= 0:
            raise InputError("this mapper was built without a latent basis (MapperConfig.latent_basis = 0)")
        z = z_shape.float()
        _, _, vh = torch.linalg.svd(z - z.mean(0), full_matrices=False)
        k = min(self.config.latent_basis, vh.shape[0])
        basis = torch.zeros_like(self.latent_basis)
        basis[:k] = vh[:k].to(basis)
        self.latent_basis.copy_(basis)

    def subspace(self, k: int) -> Tensor | None:
        """The leading ``k`` rows of :attr:`latent_basis` (k, L), or None without a basis or for ``k <= 0``."""
        basis = getattr(self, "latent_basis", None)
        if basis is None or k <= 0 or not bool(basis.abs().sum() > 0):
            return None
        return basis[: min(int(k), basis.shape[0])]

    def regression_loss(self, f_image: Tensor, z_shape: Tensor) -> Tensor:
        """Stage-1 loss L_M (ISS Eq. 2): mean squared distance between M(f_I) and the SVR latent E_S(I)."""
        return ((self(f_image) - z_shape.detach()) ** 2).sum(-1).mean()

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        return save_module(self, self.config, KIND, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", fetch_hint: str = "") -> "Mapper":
        cfg = read_config(directory, KIND, MapperConfig, fetch_hint)
        return load_weights(cls(cfg), directory, KIND, device, fetch_hint)  # type: ignore[return-value]

    @classmethod
    def tiny(cls, device: str = "cpu", seed: int = 2, in_dim: int = 32, out_dim: int = 16) -> "Mapper":
        """Tiny random mapper matching the tiny CLIP (32-d) and tiny SVR latent (16-d)."""
        with deterministic(seed):
            m = cls(MapperConfig(in_dim=in_dim, out_dim=out_dim, hidden=32, n_layers=12, init="normal"))
        return m.to(device).eval()
