"""Build a tiny, randomly initialised Stable Diffusion folder, as diffusers' own tests do.

Real CLIP BPE vocabulary (from the clip-anytorch package), tiny UNet/VAE/text encoder, DDIM.
The folder is loaded back through the same code path users use.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the BPE's base alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of OpenAI CLIP's tokenizer, rebuilt from clip-anytorch's BPE file."""
    import importlib.util

    spec = importlib.util.find_spec("clip")  # located, not imported: clip's __init__ needs torchvision
    if spec is None:
        raise RuntimeError("clip-anytorch is missing: pip install --no-deps clip-anytorch")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_tiny_sd(folder: Path, prediction_type: str = "epsilon") -> Path:
    """Save a tiny SD pipeline (image 32x32, latents 4x16x16) to `folder` and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = write_clip_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MODEL_MAX_LENGTH)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=MODEL_MAX_LENGTH,
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder
