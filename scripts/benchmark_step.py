"""Time per training step, split into render / prompts / encode / denoiser / backward / optimizer.

    python scripts/benchmark_step.py                         # the toy preset on this machine
    python scripts/benchmark_step.py --prior sd21-random     # full-size SD 2.1-base UNet + VAE, random weights
    python scripts/benchmark_step.py --prior sd21-random --resolution 64 --batch 1 --steps 20

Each configuration runs with Perp-Neg (2 negatives: 4 prompts per UNet call) and with plain
view prompts (2 prompts). Reports ms per phase, it/s and peak memory (CUDA: allocator peak; CPU:
process peak RSS). Speed does not depend on the weights, so random ones measure real cost.
"""
from __future__ import annotations

import argparse
import hashlib
import resource
import sys

import torch
from hydra import compose, initialize_config_dir

from perpneg3d.config import CONFIG_DIR, instantiate
from perpneg3d.guidance.stable_diffusion import StableDiffusion
from perpneg3d.random_streams import RandomStreams
from perpneg3d.training.timing import PhaseTimer, TimedDenoiser
from perpneg3d.training.trainer import new_counters

# Stable Diffusion 2.1-base (sd2-community mirror) UNet, VAE and scheduler configs.
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    norm_num_groups=32, scaling_factor=0.18215,
)
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


class RandomSD21(StableDiffusion):
    """Full-size SD 2.1-base UNet and VAE with random weights; text embeddings are fixed random
    [77,1024] tensors per string (text encoding is cached and never part of a step)."""

    def __init__(self, device: str = "auto", torch_dtype: str = "auto"):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from perpneg3d.guidance.stable_diffusion import resolve_device, resolve_dtype

        self.name = "random SD 2.1-base"
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(torch_dtype, self.device)
        self.tokenizer, self.text_encoder = None, None
        self.unet = UNet2DConditionModel(**SD21_UNET).to(self.dtype)
        self.vae = AutoencoderKL(**SD21_VAE).to(self.dtype)
        self.scheduler_config = dict(SD21_SCHEDULER)
        self._finish_setup()

    def _encode_text(self, texts):
        out = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            out.append(torch.randn(77, 1024, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(out).to(self.device, self.dtype)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args, perp_neg: bool):
    overrides = [f"prompts.perp_neg={str(perp_neg).lower()}", "trainer.progress=false"]
    if args.prior == "toy":
        overrides.append("experiment=toy")
    overrides += [f"cameras.batch_size={args.batch}", f"cameras.heights=[{args.resolution}]", f"cameras.widths=[{args.resolution}]"]
    overrides += args.overrides
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    trainer, cameras, prompts = instantiate(cfg.trainer), instantiate(cfg.cameras), instantiate(cfg.prompts)
    if args.prior == "sd21-random":
        guidance = instantiate(cfg.guidance, denoiser=RandomSD21(args.device))
    else:
        guidance = instantiate(cfg.guidance)
    geometry, renderer = instantiate(cfg.geometry), instantiate(cfg.renderer)
    device = getattr(guidance.denoiser, "device", torch.device("cpu"))
    geometry.to(device).train()
    renderer.to(device).train()
    return trainer, cameras, prompts, guidance, geometry, renderer, device


def run(args, perp_neg: bool) -> dict:
    trainer, cameras, prompts, guidance, geometry, renderer, device = build(args, perp_neg)
    timer = PhaseTimer()
    guidance.denoiser = TimedDenoiser(guidance.denoiser, timer)
    optimizer = trainer.make_optimizer(geometry, renderer)
    rng, counters = RandomStreams.seeded(0, device), new_counters(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timer.reset()
        with timer.phase("step"):
            trainer.train_step(step, geometry, renderer, guidance, prompts, cameras, optimizer, rng, counters, timer)
    ms = {k: 1000 * v / args.steps for k, v in timer.seconds.items()}
    ms["guidance_other"] = ms.get("guidance", 0) - ms.get("encode", 0) - ms.get("denoiser", 0)
    return dict(perp_neg=perp_neg, ms=ms, its=1000 / ms["step"], peak_mb=peak_memory_mb(device), device=str(device),
                geometry=geometry.encoding.implementation, renderer=renderer.backend)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", choices=("toy", "sd21-random", "config"), default="toy",
                        help="toy preset, full-size random SD 2.1-base, or the train.yaml default (pass overrides)")
    parser.add_argument("--resolution", type=int, default=None, help="render size (toy: 32, SD: 64)")
    parser.add_argument("--batch", type=int, default=None, help="cameras per step (toy: 2, SD: 1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. geometry.implementation=torch")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (32 if args.prior == "toy" else 64)
    args.batch = args.batch or (2 if args.prior == "toy" else 1)
    results = [run(args, True), run(args, False)]
    phases = ["render", "prompts", "encode", "denoiser", "guidance_other", "backward", "optimizer", "step"]
    print(f"prior {args.prior}, B={args.batch}, {args.resolution}x{args.resolution} renders, {args.steps} timed steps "
          f"on {results[0]['device']} ({torch.get_num_threads()} threads; geometry {results[0]['geometry']}, "
          f"renderer {results[0]['renderer']})")
    print("| prompts | " + " | ".join(f"{p} ms" for p in phases) + " | it/s | peak MB |")
    print("|---" * (len(phases) + 3) + "|")
    for r in results:
        label = "Perp-Neg (K=2)" if r["perp_neg"] else "plain (K=0)"
        print(f"| {label} | " + " | ".join(f"{r['ms'].get(p, 0):.1f}" for p in phases) + f" | {r['its']:.2f} | {r['peak_mb']:.0f} |")
    print(f"Perp-Neg / plain step time: {results[0]['ms']['step'] / results[1]['ms']['step']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
