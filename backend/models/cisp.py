"""CISP (paper 002, Sbrolli et al.): a joint image-shape embedding and a voxel diffusion model conditioned on it.

- Image encoder E_i: a ViT (the paper uses DeiT-B) mapping an image to the joint space.
- Shape encoder E_c: "3D-DeiT", a Vision Transformer whose patches are 3D voxel blocks (Conv3d patch embedding).
- Contrastive loss: CLIP's symmetric InfoNCE over the batch with a learnable temperature
  (:meth:`CISP.contrastive_loss`), pulling matching image/shape pairs together.
- Voxel DDPM conditioned on the joint embedding with classifier-free guidance: the embedding is projected to a few
  attention tokens that a small 3D U-Net attends to ("joint embedding -> projected tokens -> DDPM attention"); the
  condition is replaced by a learned null embedding with probability ``cond_drop_prob`` in training and the
  guided noise is ``eps_u + w (eps_c - eps_u)`` at sampling.

Simplifications (so the starter model trains on a CPU): small ViTs instead of DeiT-B, a 32^3 (default) / 8^3
(tiny) voxel grid, a compact 3D U-Net with cross-attention at the bottleneck only, DDIM sampling with few steps.
The paper does not say what its DDPM predicts; the starter denoiser predicts x0 (``prediction_type="sample"``),
because the eps-predicting one never learnt to use its condition (see :meth:`CISP.diffusion_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.errors import InputError
from backend.models.io import deterministic, load_weights, read_config, save_module
from backend.models.prior import timestep_embedding
from backend.events import checkpoint as cancel_checkpoint

KIND = "cisp"
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class CISPConfig:
    embed_dim: int = 256          # joint embedding size
    image_size: int = 64
    image_patch: int = 8
    voxel_res: int = 32
    voxel_patch: int = 4
    width: int = 256              # transformer width of both encoders
    layers: int = 4
    heads: int = 4
    init_temperature: float = 0.07  # CLIP's initial temperature
    unet_channels: tuple = (32, 64, 128)
    cond_tokens: int = 4          # joint embedding -> this many attention tokens
    num_timesteps: int = 1000
    cond_drop_prob: float = 0.1   # classifier-free guidance dropout
    guidance_scale: float = 3.0
    sample_steps: int = 50
    # What the denoiser predicts (diffusers' names): "epsilon" (DDPM, Ho et al. Eq. 14), "sample" (x0) or
    # "v_prediction" (Salimans & Ho 2022). The defaults are those of the first starter models (format 1 configs
    # without these keys); the trainer's defaults are the fixed ones, see backend/training/cisp_trainer.py.
    prediction_type: str = "epsilon"
    time_embed_dim: int = 0       # sinusoidal timestep embedding width (0: unet_channels[0], the old 8)
    timestep_spacing: str = "leading"  # DDIM timesteps: "trailing" starts at t = T-1, where x_T is pure noise
    clip_sample: bool = False     # clip the sampler's x0 estimate to the data range [-1, 1] (Ho et al. 2020)
    # The image tower E_i: "vit" trains a small ViT from scratch; "clip" is paper 002's pretrained-backbone
    # design here (its DeiT-B image encoder starts from pretraining): the profile's own CLIP image tower, frozen,
    # with a trainable MLP head of ``backbone_dim`` -> embed_dim, so the joint embedding starts from features
    # that already generalise beyond the 1040 training shapes (the from-scratch ViT over-fits them).
    image_backbone: str = "vit"
    backbone_dim: int = 0


def _vit_blocks(width: int, layers: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class _ViT(nn.Module):
    """ViT over 2D or 3D patches: patch embedding, [CLS] token, learned positions, Transformer, projection."""

    def __init__(self, dims: int, in_ch: int, size: int, patch: int, width: int, layers: int, heads: int, out: int):
        super().__init__()
        if size % patch:
            raise InputError(f"size {size} must be a multiple of the patch size {patch}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.patch = conv(in_ch, width, patch, patch)
        n = (size // patch) ** dims
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        self.blocks = _vit_blocks(width, layers, heads)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        tok = self.patch(x).flatten(2).transpose(1, 2)
        tok = torch.cat([self.cls.expand(tok.shape[0], -1, -1), tok], dim=1) + self.pos
        return self.proj(self.norm(self.blocks(tok)[:, 0]))


class _ClipHead(nn.Module):
    """E_i's trained part on a frozen CLIP image tower: an MLP on the CLIP feature. When the joint space has the
    CLIP feature's size the head is residual, ``f + MLP(LN(f))`` with the MLP's last layer starting at zero, so
    the joint embedding starts as the CLIP embedding itself and contrastive training with the voxel encoder adds
    3D structure to it instead of replacing it (ours: paper 002 fine-tunes its pretrained encoder end to end;
    a 0.7 M-parameter tower trained on 1040 shapes would over-fit, so it stays frozen and the head learns)."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.residual = dim == out
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))
        if self.residual:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, f: Tensor) -> Tensor:
        return f + self.mlp(f) if self.residual else self.mlp(f)


class _ResBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int) -> None:
        super().__init__()
        self.n1 = nn.GroupNorm(min(8, cin), cin)
        self.c1 = nn.Conv3d(cin, cout, 3, 1, 1)
        self.t = nn.Linear(temb, cout)
        self.n2 = nn.GroupNorm(min(8, cout), cout)
        self.c2 = nn.Conv3d(cout, cout, 3, 1, 1)
        nn.init.zeros_(self.c2.weight)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.t(temb)[:, :, None, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class VoxelDenoiser(nn.Module):
    """Small 3D U-Net eps(x_t, t, tokens) with cross-attention to the condition tokens at the bottleneck."""

    def __init__(self, channels: tuple, cond_dim: int, cond_tokens: int, heads: int = 4, time_dim: int = 0) -> None:
        super().__init__()
        c0 = channels[0]
        self.time_dim = tdim = int(time_dim) or c0
        self.temb_dim = temb = max(4 * c0, tdim)
        self.time = nn.Sequential(nn.Linear(tdim, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.cond_dim, self.cond_tokens = cond_dim, cond_tokens
        cmid = channels[-1]
        self.tokens = nn.Linear(cond_dim, cond_tokens * cmid)
        self.cond_t = nn.Linear(cond_dim, temb)
        self.inp = nn.Conv3d(1, c0, 3, 1, 1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        cin = c0
        for i, c in enumerate(channels):
            self.down.append(_ResBlock3D(cin, c, temb))
            self.pool.append(nn.Conv3d(c, c, 3, 2, 1) if i < len(channels) - 1 else nn.Identity())
            cin = c
        self.mid1 = _ResBlock3D(cmid, cmid, temb)
        self.attn_norm = nn.LayerNorm(cmid)
        self.attn = nn.MultiheadAttention(cmid, max(1, min(heads, cmid // 8)), batch_first=True)
        self.mid2 = _ResBlock3D(cmid, cmid, temb)
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels))):
            c = channels[i]
            cout = channels[i - 1] if i > 0 else c0
            self.up.append(_ResBlock3D(cin + c, cout, temb))
            cin = cout
        self.out = nn.Sequential(nn.GroupNorm(min(8, cin), cin), nn.SiLU(), nn.Conv3d(cin, 1, 3, 1, 1))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        temb = self.time(timestep_embedding(t, self.time_dim).to(x.dtype)) + self.cond_t(cond)
        h = self.inp(x)
        skips = []
        for block, pool in zip(self.down, self.pool):
            h = block(h, temb)
            skips.append(h)
            if not isinstance(pool, nn.Identity):
                h = pool(h)
        h = self.mid1(h, temb)
        b, c, d, hh, w = h.shape
        seq = h.flatten(2).transpose(1, 2)
        kv = self.tokens(cond).view(b, self.cond_tokens, c)
        seq = seq + self.attn(self.attn_norm(seq), kv, kv, need_weights=False)[0]
        h = self.mid2(seq.transpose(1, 2).reshape(b, c, d, hh, w), temb)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-3:] != skip.shape[-3:]:
                h = F.interpolate(h, size=skip.shape[-3:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), temb)
        return self.out(h)


class CISP(nn.Module):
    """Image encoder + voxel encoder (joint space) + embedding-conditioned voxel diffusion."""

    def __init__(self, config: CISPConfig | None = None) -> None:
        super().__init__()
        from diffusers import DDIMScheduler, DDPMScheduler

        self.config = c = config or CISPConfig()
        if c.image_backbone == "clip":
            if c.backbone_dim <= 0:
                raise InputError("a CISP with a CLIP image backbone needs backbone_dim (the CLIP embedding size)")
            self.image_encoder = _ClipHead(c.backbone_dim, 2 * c.width, c.embed_dim)
        elif c.image_backbone == "vit":
            self.image_encoder = _ViT(2, 3, c.image_size, c.image_patch, c.width, c.layers, c.heads, c.embed_dim)
        else:
            raise InputError(f"CISP image_backbone must be vit or clip, got {c.image_backbone!r}")
        object.__setattr__(self, "backbone", None)  # not a submodule: its weights are the CLIP's, saved there
        self.voxel_encoder = _ViT(3, 1, c.voxel_res, c.voxel_patch, c.width, c.layers, c.heads, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.init_temperature)))
        if c.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"CISP prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {c.prediction_type!r}")
        self.denoiser = VoxelDenoiser(tuple(c.unet_channels), c.embed_dim, c.cond_tokens, c.heads, c.time_embed_dim)
        self.null_cond = nn.Parameter(torch.zeros(c.embed_dim))
        sched = dict(num_train_timesteps=c.num_timesteps, beta_schedule="linear", prediction_type=c.prediction_type)
        self.scheduler = DDPMScheduler(**sched, clip_sample=False)
        self.sampler = DDIMScheduler(**sched, clip_sample=bool(c.clip_sample), timestep_spacing=c.timestep_spacing)

    # ------------------------------------------------------------------ joint embedding

    def attach_backbone(self, clip: Any) -> "CISP":
        """Give a ``image_backbone="clip"`` CISP the CLIP whose image tower it was trained on (the profile's)."""
        dim = getattr(clip, "embed_dim", None)
        if dim is not None and dim != self.config.backbone_dim:
            raise InputError(f"this CISP was trained on a {self.config.backbone_dim}-d CLIP image embedding; the "
                             f"profile's CLIP gives {dim}-d")
        object.__setattr__(self, "backbone", clip)
        return self

    def encode_image_features(self, features: Tensor) -> Tensor:
        """Unit-norm joint embeddings (B, E) from CLIP image features (B, backbone_dim): the head of a
        ``image_backbone="clip"`` CISP."""
        if self.config.image_backbone != "clip":
            raise InputError("encode_image_features is for a CISP with a CLIP image backbone")
        return F.normalize(self.image_encoder(features.float()), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm joint embeddings (B, E) of images (B, 3, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"CISP images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.config.image_backbone == "clip":
            if self.backbone is None:
                raise InputError("this CISP reads images through a CLIP image tower: attach_backbone(clip) first")
            with torch.no_grad():
                feats = self.backbone.encode_image(images)
            return self.encode_image_features(feats)
        s = self.config.image_size
        x = images.float()
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=x.shape[-1] > s)
        return F.normalize(self.image_encoder(x * 2.0 - 1.0), dim=-1)

    def _voxels(self, voxels: Tensor) -> Tensor:
        r = self.config.voxel_res
        if voxels.ndim == 4:
            voxels = voxels[:, None]
        if voxels.ndim != 5 or voxels.shape[1] != 1 or tuple(voxels.shape[-3:]) != (r, r, r):
            raise InputError(f"CISP voxels must have shape (B, {r}, {r}, {r}), got {tuple(voxels.shape)}")
        return voxels.float()

    def encode_voxels(self, voxels: Tensor) -> Tensor:
        """Unit-norm joint embeddings (B, E) of occupancy grids (B, R, R, R) in [0, 1] (3D-DeiT)."""
        return F.normalize(self.voxel_encoder(self._voxels(voxels) * 2.0 - 1.0), dim=-1)

    def contrastive_loss(self, images: Optional[Tensor], voxels: Tensor, features: Optional[Tensor] = None) -> Tensor:
        """Symmetric InfoNCE (CLIP loss) between matching image/shape pairs of a batch (``features``: precomputed
        CLIP image features instead of images, for a CLIP-backbone CISP)."""
        fi = self.encode_image_features(features) if features is not None else self.encode_image(images)
        fv = self.encode_voxels(voxels)
        logits = self.logit_scale.exp().clamp(max=100.0) * fi @ fv.t()
        labels = torch.arange(fi.shape[0], device=fi.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))

    # ------------------------------------------------------------------ conditioned voxel diffusion

    def diffusion_loss(self, voxels: Tensor, cond: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """DDPM loss on voxels in [-1, 1], conditioned on ``cond`` (dropped for CFG).

        ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. Eq. 4); the target is ``eps`` (Eq. 14),
        ``x0`` or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` by ``config.prediction_type``. Why not eps for these
        grids: at high t the eps target is ~x_t itself, so its loss barely depends on the condition and the model
        never learns to use it; its x0 estimate ``(x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)`` multiplies the
        eps error by up to 156 (t = 999), and DDIM samples of the first starter model filled ~25% of the grid
        (ground truth ~3%). x0 and v targets keep the condition in the loss at every t.
        """
        x0 = self._voxels(voxels) * 2.0 - 1.0
        b, dev = x0.shape[0], x0.device
        t = torch.randint(0, self.config.num_timesteps, (b,), generator=generator).to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        x_t = self.scheduler.add_noise(x0, noise, t)
        drop = torch.rand(b, generator=generator).to(dev) < self.config.cond_drop_prob
        c = torch.where(drop[:, None], self.null_cond.expand_as(cond), cond)
        kind = self.config.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else self.scheduler.get_velocity(x0, noise, t)
        return F.mse_loss(self.denoiser(x_t, t, c), target)

    @torch.no_grad()
    def sample(self, cond: Tensor, guidance_scale: Optional[float] = None, steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Voxel occupancies (B, R, R, R) in [0, 1] for joint embeddings ``cond`` (B, E), with CFG weight w."""
        if cond.ndim != 2 or cond.shape[1] != self.config.embed_dim:
            raise InputError(f"CISP condition must have shape (B, {self.config.embed_dim}), got {tuple(cond.shape)}")
        w = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = int(steps or self.config.sample_steps)
        if steps < 1:
            raise InputError("CISP sampling needs steps >= 1")
        r, dev = self.config.voxel_res, cond.device
        x = torch.randn((cond.shape[0], 1, r, r, r), generator=generator).to(dev)
        null = self.null_cond.expand_as(cond)
        self.sampler.set_timesteps(steps, device=dev)
        for t in self.sampler.timesteps:
            cancel_checkpoint()
            tt = t.expand(cond.shape[0]).to(dev)
            if w != 1.0:  # CFG is linear in the model output, whichever of eps / x0 / v it predicts
                out_c, out_u = self.denoiser(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, null])).chunk(2)
                out = out_u + w * (out_c - out_u)
            else:
                out = self.denoiser(x, tt, cond)
            x = self.sampler.step(out, t, x).prev_sample
        return ((x[:, 0] + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        return save_module(self, self.config, KIND, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", fetch_hint: str = "") -> "CISP":
        cfg = read_config(directory, KIND, CISPConfig, fetch_hint)
        return load_weights(cls(cfg), directory, KIND, device, fetch_hint)  # type: ignore[return-value]

    @classmethod
    def tiny(cls, device: str = "cpu", seed: int = 4) -> "CISP":
        with deterministic(seed):
            m = cls(CISPConfig(embed_dim=16, image_size=16, image_patch=8, voxel_res=8, voxel_patch=4, width=16,
                               layers=1, heads=2, unet_channels=(8, 16), cond_tokens=2, sample_steps=4))
        return m.to(device).eval()
