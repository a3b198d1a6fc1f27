"""Tiny random-weight diffusers pipelines built from configs (no hub), saved as local
diffusers folders and loaded by path as a user would: Stable Diffusion img2img (CDGA-PG)
and an image-variation pipeline (CDGA-IG), 32 × 32 images."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("a", "an", "of", "the", "photo", "sketch", "painting", "clipart", "cat", "dog", "fox")


def _unet(cross_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=4, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=2, norm_num_groups=4)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=4, sample_size=32)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def write_tokenizer(folder: Path):
    """A CLIP tokenizer from a vocabulary and merges file written here (no download)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2, ".": 3, ".</w>": 4}
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def img2img_pipeline(folder: Path) -> Path:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_hidden_layers=1, vocab_size=100,
                                        max_position_embeddings=16))
    tokenizer = write_tokenizer(folder / "_tokenizer_files")
    pipe = StableDiffusionImg2ImgPipeline(vae=_vae(), text_encoder=text, tokenizer=tokenizer, unet=_unet(16),
                                          scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def image_variation_pipeline(folder: Path) -> Path:
    import torch
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                             num_hidden_layers=1, image_size=32, patch_size=8,
                                                             projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionImageVariationPipeline(vae=_vae(), image_encoder=encoder, unet=_unet(16), scheduler=_scheduler(),
                                                 safety_checker=None, feature_extractor=processor,
                                                 requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
