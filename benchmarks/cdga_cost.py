"""What a CDGA image costs against a latent augmentation (issue 30): seconds per generated
image of Stable Diffusion v1.5's architecture (img2img, CDGA-PG) against seconds per
augmented row of ``box`` sampling, in the same run.

    python benchmarks/cdga_cost.py [--steps 2] [--size 512] [--device auto] [--json FILE]

The diffusion pipeline is built from Stable Diffusion v1.5's published configs (UNet 860M
parameters, cross-attention 768; VAE 4 levels; CLIP ViT-L/14 text encoder) with random
weights: no download is possible here, and the arithmetic, hence the time, does not depend
on the weights' values. It runs ``--steps`` denoising steps of img2img at strength 1 (each
step one UNet call on the conditional and unconditional halves), timed per step after a
warm-up, plus the VAE encode / decode and the text encoder, and the cost of CDGA's default
(50 steps at strength 0.75: 37 UNet steps) is computed from them. ``box`` sampling: a box
head of the default config on a 512-d cache, ``vlaug.augment.box_samples`` drawing 5
samples per row for 4,096 rows. The ratio is seconds per generated image / seconds per
box-sampled row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def sd15_pipeline(folder: Path, device):
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_diffusion import write_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    tokenizer = write_tokenizer(folder / "tokenizer_files")
    tokenizer.model_max_length = 77
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), sum(p.numel() for p in unet.parameters())


def time_generation(pipe, size: int, steps: int) -> dict:
    from PIL import Image

    image = Image.new("RGB", (size, size), (120, 90, 60))
    call = lambda n: pipe(prompt=["a sketch of a dog."], image=[image], strength=1.0, guidance_scale=7.5,  # noqa: E731
                          num_inference_steps=n, generator=[torch.Generator().manual_seed(0)]).images
    call(1)  # warm-up
    t0 = time.perf_counter()
    call(1)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    call(1 + steps)
    more = time.perf_counter() - t0
    per_step = (more - one) / steps
    fixed = max(0.0, one - per_step)  # text encoder, VAE encode and decode
    unet_steps = int(50 * 0.75)  # CDGA's default: 50 steps at strength 0.75
    return {"seconds_per_unet_step": per_step, "seconds_fixed": fixed, "unet_steps_default": unet_steps,
            "seconds_per_image_default": fixed + unet_steps * per_step}


def time_box(device, rows: int = 4096, d: int = 512, n_aug: int = 5) -> dict:
    from vlaug.augment import box_samples
    from vlaug.heads import HEADS, make_head_config

    import dataclasses

    head = HEADS["box"][1](dataclasses.replace(make_head_config("box"), embed_dim=d)).to(device)
    x = torch.nn.functional.normalize(torch.randn(rows, d, device=device), dim=-1)
    t = torch.nn.functional.one_hot(torch.randint(0, 16, (rows,)), 16).float().to(device)
    box_samples(head, x, t, n_aug)  # warm-up
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        box_samples(head, x, t, n_aug, generator=torch.Generator(device=device).manual_seed(0))
        best = min(best, time.perf_counter() - t0)
    return {"rows": rows, "n_aug": n_aug, "seconds": best, "seconds_per_augmented_row": best / (rows * n_aug)}


def main() -> None:
    from vlaug.devices import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    device = resolve_device(args.device)
    box = time_box(device)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, n_params = sd15_pipeline(Path(tmp), device)
        gen = time_generation(pipe, args.size, args.steps)
    ratio = gen["seconds_per_image_default"] / box["seconds_per_augmented_row"]
    out = {"device": str(device), "threads": torch.get_num_threads(), "unet_parameters": n_params, "size": args.size,
           "generation": gen, "box": box, "ratio": ratio}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
