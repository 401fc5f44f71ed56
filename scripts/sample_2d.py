"""2D text-to-image with Perp-Neg (or cfg / negprompt / cebm) and DDIM.

    python scripts/sample_2d.py prompt="a corgi standing" view=back mode=perpneg view_negative_weight=2
    python scripts/sample_2d.py guidance=toy prompt="a toy dog" view=side
"""
from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from perpneg3d.config import instantiate, run_script
from perpneg3d.errors import require
from perpneg3d.guidance.ddim_sampler import sample
from perpneg3d.guidance.perpneg import MODES
from perpneg3d.images import make_grid, save_png
from perpneg3d.prompts import validate_prompt
from perpneg3d.prompts.views import VIEW_NEGATIVES, view_prompt
from perpneg3d.run_dir import new_run_dir


def build_texts(cfg) -> tuple[list[str], list[float]]:
    """[uncond, positive, negatives...] and the negatives' weights, from the view strategy and/or user negatives."""
    prompt = validate_prompt(cfg.prompt)
    extra, extra_w = list(cfg.negative_prompts or []), [float(w) for w in (cfg.negative_weights or [])]
    require(len(extra) == len(extra_w),
            f"negative_weights has {len(extra_w)} values for {len(extra)} negative_prompts: give one weight per negative prompt")
    if cfg.view:
        require(cfg.view in VIEW_NEGATIVES, f"view={cfg.view!r} is unknown: use side, back, front or null")
        negs = [view_prompt(prompt, v) for v in VIEW_NEGATIVES[cfg.view]]
        texts, weights = ["", view_prompt(prompt, cfg.view), *negs], [float(cfg.view_negative_weight)] * len(negs)
    else:
        texts, weights = ["", prompt], []
    texts, weights = texts + extra, weights + extra_w
    if cfg.mode == "cfg":
        return texts[:2], []
    if cfg.mode == "negprompt":
        return texts[:3], weights[:1]
    return texts, weights


def main(cfg) -> None:
    require(cfg.mode in MODES, f"mode={cfg.mode!r} is unknown: use one of {', '.join(MODES)}")
    for key in ("num_samples", "batch_size", "steps"):
        require(int(cfg[key]) >= 1, f"{key}={cfg[key]} must be at least 1")
    texts, weights = build_texts(cfg)
    out = new_run_dir(cfg.out_dir)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out / "prompts.json").write_text(json.dumps({"texts": texts, "roles": ["uncond", "positive"] + ["negative"] * (len(texts) - 2), "negative_weights": weights}, indent=2))
    denoiser = instantiate(cfg.guidance.denoiser)
    emb = denoiser.embed(texts)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    images = []
    for start in tqdm(range(0, cfg.num_samples, cfg.batch_size), desc="batches"):
        n = min(cfg.batch_size, cfg.num_samples - start)
        images.append(sample(denoiser, emb, torch.tensor(weights), n, scale=cfg.scale, mode=cfg.mode, steps=cfg.steps,
                             eta=cfg.eta, height=cfg.height, width=cfg.width, generator=generator).cpu())
    images = torch.cat(images)
    for i, img in enumerate(images):
        save_png(img, out / "images" / f"{i:04d}.png")
    upscale = max(1, 256 // images.shape[-1])
    save_png(make_grid(images, nrow=min(8, len(images)), upscale=upscale), out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")


if __name__ == "__main__":
    run_script("sample_2d", main)
