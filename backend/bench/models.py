"""``python -m backend bench models``: forward+backward cost of the two heavy models the pipelines call.

1. CLIP ViT-B-32 image encoding of V views at 224^2 (ISS++ Eq. 4 renders m = 10 views): images -> torch
   preprocessing -> ``encode_image`` -> cosine loss against a text embedding -> backward to the pixels.
2. One Stable-Diffusion-sized UNet step at 64x64 latents (SD 1.5 UNet config, 4 latent channels, 77x768 text
   condition): forward with classifier-free guidance (batch 2) and backward to the latents, as SDS through
   a renderer needs (ISS++ Eq. 7 drops the UNet Jacobian, but ThemeStation's LoRA fine-tuning and any
   gradient-through-UNet variant pay for it; the forward alone is printed too).

Random weights at full size (``open_clip.create_model("ViT-B-32")`` with no tag, ``UNet2DConditionModel`` from
the SD 1.5 config): timing needs no download. Runs on the CPU and on CUDA when present (fp32 and fp16 on CUDA).
Numbers are medians of ``--repeats`` runs after one warm-up, measured in this run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], None], device: str, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels, lazy init)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_clip(device: str, views: int, size: int, repeats: int) -> dict[str, float]:
    from backend.models.clip import ClipModel

    clip = ClipModel.from_pretrained("ViT-B-32", None, device=device)
    text = torch.nn.functional.normalize(torch.randn(1, clip.embed_dim, device=device), dim=-1)
    images = torch.rand(views, 3, size, size, device=device, requires_grad=True)

    def fwd() -> None:
        with torch.no_grad():
            clip.encode_image(images)

    def fwd_bwd() -> None:
        images.grad = None
        loss = 1.0 - (clip.encode_image(images) @ text.t()).mean()
        loss.backward()

    return {"forward_s": _time(fwd, device, repeats), "forward_backward_s": _time(fwd_bwd, device, repeats)}


def bench_unet(device: str, dtype: torch.dtype, repeats: int, latent: int = 64) -> dict[str, float]:
    from diffusers import UNet2DConditionModel

    cfg = dict(SD15_UNET, sample_size=latent)
    unet = UNet2DConditionModel(**cfg).to(device, dtype)
    unet.requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype, requires_grad=True)  # CFG batch
    t = torch.tensor([500, 500], device=device)
    cond = torch.randn(2, 77, 768, device=device, dtype=dtype)

    def fwd() -> None:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=cond)

    def fwd_bwd() -> None:
        x.grad = None
        out = unet(x, t, encoder_hidden_states=cond).sample
        out.float().square().mean().backward()

    res = {"params_M": n_params / 1e6, "forward_s": _time(fwd, device, repeats)}
    res["forward_backward_s"] = _time(fwd_bwd, device, repeats)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backend bench models", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="all",
                   help="all = CPU, and CUDA when present (default)")
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--latent", type=int, default=64, help="UNet latent side (64 = 512x512 images)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--skip-clip", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = {"auto": ["cuda" if torch.cuda.is_available() else "cpu"], "cpu": ["cpu"], "cuda": ["cuda"],
               "all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}[args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device visible to torch")
        return 2
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}"
          + (f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no CUDA"))
    for dev in devices:
        if not args.skip_clip:
            r = bench_clip(dev, args.views, args.size, args.repeats)
            print(f"[{dev}] CLIP ViT-B-32 encode_image {args.views}x{args.size}^2: forward {r['forward_s'] * 1e3:.1f} ms, "
                  f"forward+backward {r['forward_backward_s'] * 1e3:.1f} ms "
                  f"({r['forward_backward_s'] / args.views * 1e3:.1f} ms/view)")
        if not args.skip_unet:
            dtypes = [torch.float32] + ([torch.float16] if dev == "cuda" else [])
            for dt in dtypes:
                r = bench_unet(dev, dt, args.repeats, args.latent)
                print(f"[{dev}] SD-1.5-size UNet ({r['params_M']:.0f} M params, {str(dt).replace('torch.', '')}) one CFG "
                      f"step (batch 2) at {args.latent}x{args.latent} latents: forward {r['forward_s'] * 1e3:.1f} ms, "
                      f"forward+backward {r['forward_backward_s'] * 1e3:.1f} ms")
    return 0
