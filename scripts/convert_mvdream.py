"""Convert MVDream's original checkpoint (ldm layout) to a diffusers folder that `guidance=mvdream` loads.

    python scripts/convert_mvdream.py checkpoint=sd-v2.1-base-4view.pt out=models/mvdream-sd21
    python train.py guidance=mvdream guidance.denoiser.pretrained_model_name_or_path=models/mvdream-sd21 ...

The UNet comes from the checkpoint; tokenizer, text encoder, VAE and scheduler from `base` (SD 2.1-base), which
MVDream leaves untrained (perpneg3d/guidance/mvdream_convert.py).
"""
from __future__ import annotations

from perpneg3d.config import run_script
from perpneg3d.errors import require
from perpneg3d.guidance.mvdream_convert import convert


def main(cfg) -> None:
    require(cfg.checkpoint, "checkpoint=<file> is required: MVDream's sd-v2.1-base-4view.pt (ldm layout)")
    require(cfg.out, "out=<folder> is required: a new folder for the converted model")
    out = convert(cfg.checkpoint, str(cfg.base), cfg.out, cfg.local_files_only, int(cfg.sample_size))
    print(f"wrote {out}: use guidance=mvdream guidance.denoiser.pretrained_model_name_or_path={out}")


if __name__ == "__main__":
    run_script("convert_mvdream", main)
