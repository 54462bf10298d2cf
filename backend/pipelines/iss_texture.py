"""ISS++ texture stylization (paper 000, Sec. 3.4.1, Fig. 6(a) top branch) as the colour pass of text to shape.

ISS++ stylizes the texture of a generated shape by duplicating the SVR decoder D, except its output layer, into an
occupancy network D_o and a colour network D_c (1 and 3 output channels), and fine-tuning D_c alone with the CLIP
consistency loss (Eq. 4) on renders over random background colours (Sec. 3.4.1 "background augmentation", Fig. 7).
The occupancy, and so the shape and its IoU, cannot change.

Text to shape uses it with the generation prompt itself as the style (ours: ISS++ applies it to a style prompt
such as "mahogany chair"). Why: the stage-1 mapper regresses a latent from a text feature, and a regression
averages the latents of the shapes that fit the words, so colours come out washed out ("a red table" pink, "a
black vase" mauve). Stage 2 moves the whole latent, where colour and shape are entangled and the 3D prior loss holds
the shape; fine-tuning D_c moves the colour alone. Measured in ``bench quality`` (the README's table).

Substitutions (ours, said here and in the README):

- The fixed occupancy is decoded once on a grid (:class:`backend.fields.adapters.CachedDecoderField`) and the
  colour network runs only at samples that contribute to a pixel (compositing weight above a threshold, as
  :class:`backend.pipelines.stylize.PrunedColorField` does), so an iteration costs a few thousand D_c queries
  instead of every ray sample: a few tenths of a second on a CPU.
- One random background colour per view (the paper draws one per iteration).
- Iterations and the learning rate are not given in the paper; ours are measured defaults (``TextureConfig``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from backend.fields.adapters import CachedDecoderField
from backend.fields.grid import sample_grid
from backend.losses.clip_consistency import clip_consistency_loss
from backend.pipelines.stylize import PrunedColorField
from backend.render import random_cameras, render


@dataclass
class TextureConfig:
    """The colour pass: ISS++ texture stylization (Sec. 3.4.1) with the generation prompt."""

    iterations: int = 15  # ours (the paper gives none); 0 switches the pass off
    target: str = "blend"  # "blend": Eq. 5's blend of f_T with the variant's diffusion-prior sample f_{T->I} (an
    # image feature) at weight ``tau``; "text": f_T alone, Eq. 4 with the prompt as ISS++ stylizes with its style
    # text. Measured (bench quality, first 9 held-out prompts, same shapes): colour right 7/9 with the blend, 5/9
    # with "text": renders match an image-feature target more easily than a text feature (the modality gap ISS
    # bridges). Without a diffusion prior the blend is f_T.
    tau: float = 0.5  # Eq. 5's weight for the colour pass (Sec. 4.2's 0.5), also when stage 2 follows f_T alone
    views: int = 4  # random views per iteration
    resolution: int = 64  # render size (the starter CLIP reads 64 px; larger CLIPs resize)
    n_samples: int = 32  # samples per ray
    lr: float = 1e-3  # Adam on D_c (ours)
    occupancy_grid: int = 48  # the fixed occupancy, decoded once on this grid
    beta: float = 0.02  # sigma = o / beta, as DecoderField
    weight_threshold: float = 1e-3  # D_c runs only where a sample's compositing weight exceeds this
    chunk: int = 8192  # rays per renderer chunk
    checkpoint: bool = True  # recompute chunks in backward: memory bounded by one chunk at any view count / size
    elevation_range: tuple[float, float] = (0.0, 40.0)
    azimuth_range: tuple[float, float] = (0.0, 360.0)
    radius: float = 1.6
    fov: float = 45.0


class FixedShapeColourField(nn.Module):
    """The occupancy of ``D_o(., z)`` decoded once (fixed), the colour of ``D_c(., z)`` live.

    Wrapped in :class:`backend.pipelines.stylize.PrunedColorField` for rendering, so the colour network runs only at
    samples whose compositing weight exceeds its threshold. Gradients reach only D_c's parameters.
    """

    def __init__(self, decoder: nn.Module, z: Tensor, occupancy_grid: int, beta: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.z = z.detach().reshape(1, -1)
        self.beta = float(beta)
        with torch.no_grad():
            self.occ = CachedDecoderField(decoder, self.z, occupancy_grid, beta=beta).grid[:1].clone()

    def sigma(self, points: Tensor) -> Tensor:
        return sample_grid(self.occ, points)[..., 0] / self.beta

    def color(self, points: Tensor) -> Tensor:
        return self.decoder.colour(points.reshape(1, -1, 3), self.z).reshape(*points.shape[:-1], 3)


class TextureAligner:
    """Fine-tune D_c, a copy of the decoder's colour network, towards a CLIP target (ISS++ Sec. 3.4.1, Eq. 4).

    ``decoder`` is left untouched: :attr:`decoder` is a copy whose heads are split (:meth:`ImplicitDecoder.
    split_heads`); its occupancy equals the original's exactly, and its colour is what the pass learned. Use it for
    the final mesh (:func:`backend.pipelines.iss_stages.decoder_mesh`).
    """

    def __init__(self, decoder: nn.Module, z: Tensor, clip: Any, target: Tensor, config: TextureConfig,
                 generator: torch.Generator, device: str = "cpu") -> None:
        self.config = config
        self.decoder = copy.deepcopy(decoder).to(device)
        self.decoder.requires_grad_(False)
        self.decoder.eval()
        colour = self.decoder.split_heads()
        colour.requires_grad_(True)
        self.clip = clip
        self.target = target.detach().reshape(1, -1).to(device)
        self.generator = generator
        self.device = device
        self.field = PrunedColorField(FixedShapeColourField(self.decoder, z.to(device), config.occupancy_grid,
                                                            config.beta), weight_threshold=config.weight_threshold)
        self.opt = torch.optim.Adam(colour.parameters(), lr=config.lr)
        self.iteration = 0

    def step(self) -> dict[str, float]:
        """One iteration on fresh random views over random background colours; returns the CLIP loss."""
        cfg = self.config
        cams = random_cameras(cfg.views, cfg.azimuth_range, cfg.elevation_range, radius=cfg.radius, fov=cfg.fov,
                              generator=self.generator, device=self.device)
        gen_dev = self.generator.device if self.generator is not None else torch.device("cpu")
        bg = torch.rand(cfg.views, 3, generator=self.generator, device=gen_dev).to(self.device)
        out = render(self.field, cams, cfg.resolution, cfg.resolution, n_samples=cfg.n_samples, background=bg,
                     generator=self.generator, normals=None, chunk=cfg.chunk, checkpoint=cfg.checkpoint)
        loss = clip_consistency_loss(self.target, self.clip.encode_image(out["rgb"].permute(0, 3, 1, 2)))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.iteration += 1
        return {"texture_clip": float(loss.detach())}


def texture_pass(decoder: nn.Module, z: Tensor, clip: Any, target: Tensor, config: TextureConfig,
                 generator: torch.Generator, device: str = "cpu",
                 aligner: Optional[TextureAligner] = None) -> nn.Module:
    """Run all ``config.iterations`` and return the decoder with the learned colour (``decoder`` if 0)."""
    if config.iterations <= 0:
        return decoder
    aligner = aligner or TextureAligner(decoder, z, clip, target, config, generator, device)
    for _ in range(config.iterations):
        aligner.step()
    return aligner.decoder
