"""2D text-to-image sampling with DDIM (diffusers) and any guidance mode (arXiv 2304.04968, Algorithm 1)."""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from perpneg3d.contracts import HasImageSize, HasSchedulerConfig, device_of
from perpneg3d.guidance.perpneg import guided_eps


def make_ddim_scheduler(denoiser):
    """DDIM from the denoiser's own scheduler config when it has one, else from its alphas_cumprod.
    Denoisers return epsilon whatever their model predicts (a v-prediction model converts in eps()),
    so the scheduler always reads epsilon."""
    from diffusers import DDIMScheduler

    if isinstance(denoiser, HasSchedulerConfig) and denoiser.scheduler_config:
        return DDIMScheduler.from_config(denoiser.scheduler_config, prediction_type="epsilon")
    abar = denoiser.alphas_cumprod.double().cpu()
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return DDIMScheduler(
        num_train_timesteps=len(abar), trained_betas=betas.float().numpy(),
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


@torch.no_grad()
def sample(
    denoiser,
    text_emb: Tensor,
    neg_weights: Tensor,
    num_samples: int,
    *,
    scale: float = 7.5,
    mode: str = "perpneg",
    steps: int = 50,
    eta: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    neg_time_ramp: tuple[float, float] | None = None,
    alignment: bool = False,
    emphasis: float = 1.0,
) -> Tensor:
    """Sample images [num_samples,3,H,W] in [0,1].

    text_emb: [2+K, ...] embeddings of (uncond, positive, negative_1..K); neg_weights: [K]. emphasis != 1
    (score-space view emphasis, perpneg.combine): [3+K, ...], the prompt without view words last.
    Each denoising step runs the denoiser once on the (2+K)*B batch [uncond | pos | negs], combines
    with `combine(mode)` and takes a DDIM step. Initial noise comes from `generator` exactly as in
    diffusers' StableDiffusionPipeline, so mode "cfg" reproduces it.
    """
    device = device_of(denoiser)
    scheduler = make_ddim_scheduler(denoiser)
    scheduler.set_timesteps(steps, device=device)
    size = denoiser.image_size if isinstance(denoiser, HasImageSize) else 512
    shape = (num_samples, *denoiser.latent_shape(height or size, width or size))
    gen_device = generator.device if generator is not None else device
    latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    latents = latents * scheduler.init_noise_sigma
    num_neg = text_emb.shape[0] - 2 - int(emphasis != 1.0)
    emb = text_emb.to(device).repeat_interleave(num_samples, dim=0)  # block layout: each prompt x num_samples
    weights = neg_weights.to(device).float().reshape(1, num_neg).expand(num_samples, num_neg) if num_neg else None
    for t in tqdm(scheduler.timesteps, desc=f"DDIM {mode}", disable=not progress, leave=False):
        x_in = scheduler.scale_model_input(latents, t)
        eps_hat = guided_eps(denoiser, x_in, t.reshape(1).expand(num_samples).to(device), emb, weights, scale, mode,
                             neg_time_ramp, alignment, emphasis=emphasis)
        latents = scheduler.step(eps_hat.to(latents.dtype), t, latents, eta=eta, generator=generator).prev_sample
    return denoiser.decode(latents)
