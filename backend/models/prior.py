"""Diffusion prior f_T -> f_{T->I} (ISS++ paper 000, Sec. 3.3.3, Eq. 5; after DALL-E 2's prior [28]).

A small denoiser over CLIP embeddings: given the unit-norm CLIP text embedding f_T it generates a CLIP *image*
embedding f_{T->I}; different noise gives different f_{T->I}, which ISS++ blends with f_T (``tau f_{T->I} +
(1 - tau) f_T``, Eq. 5) for diverse shapes.

As in DALL-E 2 (Ramesh et al. 2022, Sec. 2.1): a Transformer over the tokens [text embedding, timestep embedding,
noised image embedding, learned query], the output at the query predicts the *clean* image embedding directly (not
the noise), with a cosine noise schedule (diffusers ``squaredcos_cap_v2``), the text conditioning dropped 10% of
the time for classifier-free guidance, and embeddings scaled to unit variance per dimension (x sqrt(D)).
Simplifications: the text *token sequence* DALL-E 2 also feeds is omitted (only the pooled f_T), attention is
bidirectional instead of causal, and sampling uses DDIM with few steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.errors import InputError
from backend.models.io import deterministic, load_weights, read_config, save_module

KIND = "prior"


@dataclass
class PriorConfig:
    embed_dim: int = 512          # CLIP embedding size D
    width: int = 512              # transformer width
    layers: int = 6
    heads: int = 8
    num_timesteps: int = 1000     # DALL-E 2 prior: 1000 diffusion steps
    sample_steps: int = 64        # DALL-E 2 samples the prior with 64 strided steps
    cond_drop_prob: float = 0.1   # classifier-free guidance dropout of the text condition
    dropout: float = 0.0


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal timestep embedding (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class DiffusionPrior(nn.Module):
    """Denoiser ``x0_hat = f(x_t, t, f_T)`` over CLIP embeddings plus its training loss and sampler."""

    def __init__(self, config: PriorConfig | None = None) -> None:
        super().__init__()
        from diffusers import DDIMScheduler, DDPMScheduler

        self.config = c = config or PriorConfig()
        self.text_proj = nn.Linear(c.embed_dim, c.width)
        self.x_proj = nn.Linear(c.embed_dim, c.width)
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.query = nn.Parameter(torch.randn(c.width) * 0.02)
        self.null_text = nn.Parameter(torch.zeros(c.embed_dim))  # the "no text" condition of CFG
        self.pos = nn.Parameter(torch.randn(4, c.width) * 0.02)
        layer = nn.TransformerEncoderLayer(c.width, c.heads, dim_feedforward=4 * c.width, dropout=c.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.embed_dim))
        sched = dict(num_train_timesteps=c.num_timesteps, beta_schedule="squaredcos_cap_v2",
                     prediction_type="sample", clip_sample=False)
        self.scheduler = DDPMScheduler(**sched)
        self.sampler = DDIMScheduler(**sched)

    @property
    def scale(self) -> float:
        """Unit-norm embeddings times sqrt(D) have unit variance per dimension (DALL-E 2 prior)."""
        return math.sqrt(self.config.embed_dim)

    def forward(self, x_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        """Predict the clean (scaled) image embedding from the noised one."""
        b = x_t.shape[0]
        tokens = torch.stack([
            self.text_proj(text_emb * self.scale),
            self.time_mlp(timestep_embedding(t, self.config.width).to(x_t.dtype)),
            self.x_proj(x_t),
            self.query.expand(b, -1),
        ], dim=1) + self.pos
        h = self.transformer(tokens)
        return self.out(h[:, -1])

    def _check(self, emb: Tensor, what: str) -> None:
        if emb.ndim != 2 or emb.shape[1] != self.config.embed_dim:
            raise InputError(f"the prior expects {what} of shape (B, {self.config.embed_dim}), got {tuple(emb.shape)}")

    def loss(self, text_emb: Tensor, image_emb: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """DALL-E 2 prior objective: ``|| f(x_t, t, f_T) - x_0 ||^2`` with x_0 the scaled CLIP image embedding."""
        self._check(text_emb, "text embeddings")
        self._check(image_emb, "image embeddings")
        b, dev = image_emb.shape[0], image_emb.device
        x0 = F.normalize(image_emb, dim=-1) * self.scale
        t = torch.randint(0, self.config.num_timesteps, (b,), generator=generator).to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        x_t = self.scheduler.add_noise(x0, noise, t)
        cond = F.normalize(text_emb, dim=-1)
        drop = torch.rand(b, generator=generator).to(dev) < self.config.cond_drop_prob
        cond = torch.where(drop[:, None], self.null_text.expand_as(cond), cond)
        return F.mse_loss(self(x_t, t, cond), x0)

    @torch.no_grad()
    def sample(self, text_emb: Tensor, generator: Optional[torch.Generator] = None, steps: Optional[int] = None,
               guidance_scale: float = 1.0) -> Tensor:
        """Sample f_{T->I} (B, D), unit-norm, for text embeddings f_T (B, D); DDIM with ``steps`` steps."""
        self._check(text_emb, "text embeddings")
        steps = int(steps or self.config.sample_steps)
        if steps < 1:
            raise InputError("the prior needs steps >= 1")
        dev = text_emb.device
        cond = F.normalize(text_emb.float(), dim=-1)
        x = torch.randn(cond.shape, generator=generator).to(dev)
        self.sampler.set_timesteps(steps, device=dev)
        for t in self.sampler.timesteps:
            tt = t.expand(cond.shape[0]).to(dev)
            x0 = self(x, tt, cond)
            if guidance_scale != 1.0:
                x0_u = self(x, tt, self.null_text.expand_as(cond))
                x0 = x0_u + guidance_scale * (x0 - x0_u)
            x = self.sampler.step(x0, t, x).prev_sample
        return F.normalize(x, dim=-1)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        return save_module(self, self.config, KIND, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", fetch_hint: str = "") -> "DiffusionPrior":
        cfg = read_config(directory, KIND, PriorConfig, fetch_hint)
        return load_weights(cls(cfg), directory, KIND, device, fetch_hint)  # type: ignore[return-value]

    @classmethod
    def tiny(cls, device: str = "cpu", seed: int = 3, embed_dim: int = 32) -> "DiffusionPrior":
        with deterministic(seed):
            m = cls(PriorConfig(embed_dim=embed_dim, width=32, layers=2, heads=2, sample_steps=8))
        return m.to(device).eval()
