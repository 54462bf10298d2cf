"""Theme-driven fine-tuning of the text-to-image model (ThemeStation, paper 003, Sec. 3.1, 3.3.2, 3.3.3, app. A).

All three priors of ThemeStation are the pre-trained text-to-image model fine-tuned on a few images with the
standard denoising objective (DDPM, Ho et al.): ``E_{x0, t, eps} || eps_phi(sqrt(abar_t) x0 + sqrt(1-abar_t) eps;
y, t) - eps ||^2`` (``v`` as the target for v-prediction models):

- the *theme-driven* model for concept images (Sec. 3.1): exemplar colour renders, shared prompt
  "a 3D model of <subject>, in the style of [V]"; 200 iterations for one exemplar, 400 for several, batch 8,
  learning rate 2e-6 (appendix A, full fine-tuning);
- the *reference prior* (Sec. 3.3.3): exemplar colour renders with ``y_x`` and normal maps with
  ``y_n = y_x + ", normal map"``;
- the *concept prior* (Sec. 3.3.2): the concept image and augmented views of the initial model, prompt
  "a 3D model of [V] <subject>".

``method="lora"`` (default) trains a peft LoRA adapter on the UNet's attention projections of the *shared* model
(cheap, and the adapter is removed by :meth:`TunedPrior.release`); ``method="full"`` fine-tunes a private copy of
the UNet, as the paper does. The LoRA learning rate (1e-4) is LoRA's usual rate, not the paper's 2e-6, which is
for full fine-tuning.

Simplification: the paper adds the camera pose of each render as an extra condition (appendix A); here the pose
enters the prompt as a view word ("front view", "side view", "back view", "overhead view"), DreamFusion's
view-dependent prompting, so the fine-tuned model still learns which view it draws.
"""

from __future__ import annotations

import copy
import logging
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.errors import InputError
from backend.events import CancelToken, Progress

log = logging.getLogger(__name__)

METHODS = ("lora", "full")


@dataclass
class FinetuneConfig:
    """Fine-tuning schedule (ThemeStation appendix A unless noted)."""

    iterations_single: int = 200  # one exemplar (appendix A, appendix C: more overfits and loses diversity)
    iterations_multi: int = 400  # a few exemplars
    batch_size: int = 8
    method: str = "lora"  # "lora" (peft adapter) or "full" (private UNet copy, as the paper)
    lr_full: float = 2e-6  # appendix A
    lr_lora: float = 1e-4  # LoRA (Hu et al.) / diffusers DreamBooth-LoRA default
    lora_rank: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"fine-tuning method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.batch_size < 1 or self.iterations_single < 0 or self.iterations_multi < 0 or self.lora_rank < 1:
            raise InputError("fine-tuning needs batch_size >= 1, iterations >= 0 and lora_rank >= 1")

    def iterations(self, n_exemplars: int) -> int:
        """200 iterations for a single exemplar, 400 for a few (appendix A)."""
        return self.iterations_single if n_exemplars <= 1 else self.iterations_multi


def view_word(azimuth_deg: float, elevation_deg: float = 0.0) -> str:
    """DreamFusion-style view word for a camera: azimuth 0 = front (Blender's -Y camera), 180 = back."""
    if elevation_deg >= 60.0:
        return "overhead view"
    a = float(azimuth_deg) % 360.0
    if a < 45.0 or a >= 315.0:
        return "front view"
    if 135.0 <= a < 225.0:
        return "back view"
    return "side view"


@dataclass
class TunedPrior:
    """A fine-tuned diffusion prior: the bundle to use and the LoRA adapter to activate (None for a full copy).

    ``release()`` removes the adapter from the shared model (call it when the prior is no longer needed).
    """

    bundle: Any
    adapter: Optional[str]
    method: str
    iterations: int
    final_loss: float = float("nan")

    def release(self) -> None:
        if self.adapter is not None and getattr(self.bundle.unet, "peft_config", None):
            if self.adapter in self.bundle.unet.peft_config:
                self.bundle.unet.delete_adapters([self.adapter])
        self.adapter = None


def _model_space(bundle: Any, images: Tensor, chunk: int = 8) -> Tensor:
    with torch.no_grad():
        return torch.cat([bundle.to_model_space(images[i : i + chunk]) for i in range(0, len(images), chunk)])


def _target(bundle: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    ptype = bundle.scheduler.config.get("prediction_type", "epsilon")
    if ptype == "v_prediction":
        return bundle.scheduler.get_velocity(x0, noise, t)
    if ptype == "sample":
        return x0
    return noise


def finetune(
    bundle: Any,
    images: Tensor,
    prompts: Sequence[str],
    iterations: int,
    cfg: FinetuneConfig = FinetuneConfig(),
    *,
    name: str = "theme",
    stage: str = "fine-tune",
    cancel: Optional[CancelToken] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Progress]:
    """Fine-tune ``bundle`` on ``images`` (N, 3, H, W) in [0, 1] with one prompt per image; a generator.

    Yields one :class:`Progress` per iteration (checking ``cancel`` first) and returns a :class:`TunedPrior`
    (``prior = yield from finetune(...)``). On cancellation or error the LoRA adapter is removed again.
    """
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise InputError(f"fine-tuning needs images (N, 3, H, W) with N > 0, got {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise InputError(f"fine-tuning needs one prompt per image: {len(prompts)} prompts for {len(images)} images")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    uniq = sorted(set(prompts))
    prompt_idx = torch.tensor([uniq.index(p) for p in prompts])
    cond_all = bundle.encode_prompt(uniq)
    x0_all = _model_space(bundle, images)

    adapter: Optional[str] = None
    if cfg.method == "lora":
        adapter = f"{name}_{uuid.uuid4().hex[:8]}"
        with warnings.catch_warnings():  # several adapters on one UNet is intended (theme, reference, concept)
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            params = bundle.add_lora(rank=cfg.lora_rank, adapter_name=adapter)
        model_bundle, lr = bundle, cfg.lr_lora
    else:
        model_bundle = copy.copy(bundle)
        model_bundle.unet = copy.deepcopy(bundle.unet)
        params = list(model_bundle.unet.parameters())
        for p in params:
            p.requires_grad_(True)
        lr = cfg.lr_full
    unet = model_bundle.unet
    prior = TunedPrior(model_bundle, adapter, cfg.method, iterations)
    was_training = unet.training
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        n_train = int(bundle.scheduler.config.num_train_timesteps)
        dev = x0_all.device
        unet_dtype = next(unet.parameters()).dtype
        unet.train()
        loss_v = float("nan")
        for it in range(iterations):
            if cancel is not None:
                cancel.check()
            idx = torch.randint(0, len(x0_all), (min(cfg.batch_size, len(x0_all)),), generator=gen)
            x0 = x0_all[idx.to(dev)].float()
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            t = torch.randint(0, n_train, (len(idx),), generator=gen).to(dev)
            x_t = bundle.scheduler.add_noise(x0, noise, t)
            cond = cond_all[prompt_idx[idx].to(dev)]
            pred = unet(x_t.to(unet_dtype), t, encoder_hidden_states=cond.to(unet_dtype)).sample
            loss = F.mse_loss(pred.float(), _target(bundle, x0, noise, t).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
            yield Progress(stage, it + 1, iterations, f"loss {loss_v:.4f}")
        prior.final_loss = loss_v
    except BaseException:
        prior.release()
        raise
    finally:
        unet.train(was_training)
        for p in params:
            p.requires_grad_(False)
        if cfg.method == "lora":
            for p in params:
                p.grad = None
    log.info("fine-tuned %s (%s) for %d iterations, final loss %.4f", name, cfg.method, iterations, prior.final_loss)
    return prior
