"""Score Distillation Sampling with Perp-Neg (DreamFusion eq. 3 with eps_hat = eps_PN).

grad_theta L = E_t,eps[ w(t) (eps_PN(x_t; y, t) - eps) dx/dtheta ], injected through the surrogate
0.5 * ||latents - (latents - grad).detach()||^2 / B; no gradient flows into the denoiser.

recon_loss (MVDream's x0-reconstruction loss, Shi et al. 2023, Sec. 3.2; threestudio-mvdream's recon_loss): the
target is the denoiser's estimate of the clean latents, x0_hat = (x_t - sqrt(1 - abar_t) eps_PN) / sqrt(abar_t),
and the loss 0.5 * ||latents - x0_hat||^2 / B. Its gradient, latents - x0_hat = sqrt((1 - abar_t) / abar_t)
(eps_PN - eps), is SDS with the weight sqrt((1 - abar) / abar) in place of 1 - abar. recon_std_rescale = r > 0
pulls the guided estimate's spread back towards the unguided one's, per group of views (all the views of a
multi-view group, else each sample): x0_hat <- r * x0_hat * std(x0_pos) / std(x0_hat) + (1 - r) * x0_hat, with
x0_pos from the positive prompt's own eps (the same UNet call), which tempers the oversaturation of large guidance
scales (MVDream's CFG 50).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from perpneg3d.contracts import MultiView, SamplesLatents
from perpneg3d.errors import require
from perpneg3d.guidance.denoiser import add_noise
from perpneg3d.guidance.perpneg import MODES, guided_eps
from perpneg3d.schedules import ramp
from perpneg3d.validation import (NonNegativeFloat, PositiveFloat, PositiveRampValue, Probability, RampValue,
                                  UnitRange, validated)


@dataclass
class SDSOutput:
    """One SDS evaluation. Every field is a device tensor, so producing it costs no host sync."""

    loss: Tensor  # scalar surrogate whose gradient w.r.t. the render is the SDS gradient
    grad_norm: Tensor  # scalar: mean L2 norm of the per-sample gradient (after clean-up)
    nonfinite: Tensor  # scalar int: NaN/inf gradient entries that were zeroed
    nonfinite_share: Tensor  # scalar: nonfinite / number of gradient entries
    t: Tensor  # [B] sampled timesteps


def check_step_range(min_step_percent, max_step_percent) -> None:
    """0 <= min <= max <= 1 at every training step. Both bounds are piecewise linear in the step, so
    checking at every breakpoint of either ramp (and far past them) covers all steps. min == max is
    allowed (threestudio allows it: one fixed timestep)."""
    steps = {0, 10**9} | {int(v[i]) for v in (min_step_percent, max_step_percent) if isinstance(v, tuple) for i in (0, 3)}
    for step in sorted(steps):
        lo, hi = ramp(min_step_percent, step), ramp(max_step_percent, step)
        where = f"guidance.min_step_percent={_show(min_step_percent)} and max_step_percent={_show(max_step_percent)}"
        require(lo <= hi, f"{where} cross at step {step} (min {lo:.3g} > max {hi:.3g}): choose ramps with min <= max "
                          "at every step")
        require(0 <= lo and hi <= 1, f"{where} leave [0, 1] at step {step} (min {lo:.3g}, max {hi:.3g}): use fractions "
                                     "of the training timesteps")


def _show(value) -> str:
    return f"[{', '.join(f'{v:g}' for v in value)}]" if isinstance(value, tuple) else f"{value:g}"


class ScoreDistillation:
    """Perp-Neg SDS against any denoiser (Stable Diffusion, the toy prior, or your own class).

    t ~ U[min_step_percent, max_step_percent] * T per sample. Either bound may be a ramp
    [start_step, start_value, end_value, end_step] (threestudio's convention): e.g. max_step_percent
    [0, 0.98, 0.5, 5000] anneals the upper bound; min_step_percent [0, 0.6, 0.02, 500] starts with
    high noise only, so the coarse layout (the view) settles before details (DreamTime's observation).
    weighting "sds": w(t) = 1 - alphas_cumprod[t]; "uniform": w(t) = 1.
    grad_clip: elementwise clip of the SDS gradient, a number or a ramp; a rising ramp is D-SDS's
    score debiasing (threestudio's grad_clip). neg_time_ramp, neg_alignment, neg_gain: adaptive negative
    weights (perpneg.combine; docs/method.md); neg_gain multiplies every view weight (1: the paper's).
    recon_loss, recon_std_rescale: the x0-reconstruction loss instead of the SDS surrogate (module docstring);
    grad_clip and weighting shape the SDS gradient only.
    """

    @validated("guidance")
    def __init__(
        self,
        denoiser,
        guidance_scale: PositiveFloat = 100.0,
        mode: str = "perpneg",
        min_step_percent: RampValue = 0.02,
        max_step_percent: RampValue = 0.98,
        weighting: str = "sds",
        grad_clip: PositiveRampValue | None = None,
        neg_time_ramp: UnitRange | None = None,
        neg_alignment: bool = False,
        neg_gain: NonNegativeFloat = 1.0,
        recon_loss: bool = False,
        recon_std_rescale: Probability = 0.5,
    ):
        require(mode in MODES, f"guidance.mode={mode!r} is unknown: use one of {', '.join(MODES)}")
        require(weighting in ("sds", "uniform"), f"guidance.weighting={weighting!r} is unknown: use sds or uniform")
        check_step_range(min_step_percent, max_step_percent)
        adaptive = dict(neg_time_ramp=list(neg_time_ramp) if neg_time_ramp else None, neg_alignment=neg_alignment or None,
                        neg_gain=None if neg_gain == 1.0 else neg_gain)
        used = [(k, v) for k, v in adaptive.items() if v is not None]
        require(mode in ("perpneg", "cebm") or not used,
                f"guidance.{used[0][0]}={used[0][1]} has no effect with guidance.mode={mode}: it weights the "
                "negatives, which only perpneg and cebm subtract; remove it or use mode=perpneg" if used else "")
        self.denoiser, self.guidance_scale, self.mode, self.weighting = denoiser, guidance_scale, mode, weighting
        self.min_step_percent, self.max_step_percent = min_step_percent, max_step_percent
        self.grad_clip = grad_clip
        self.neg_time_ramp, self.neg_alignment, self.neg_gain = neg_time_ramp, neg_alignment, neg_gain
        require(not (recon_loss and grad_clip is not None),
                f"guidance.grad_clip={grad_clip} clips the SDS gradient, which guidance.recon_loss=true replaces: "
                "remove one of them")
        self.recon_loss, self.recon_std_rescale = recon_loss, recon_std_rescale

    def timestep_range(self, step: int) -> tuple[int, int]:
        """Inclusive [lo, hi] timestep indices at training step `step`."""
        num = self.denoiser.num_train_timesteps
        lo_i = int(ramp(self.min_step_percent, step) * num)
        return lo_i, max(lo_i, min(num - 1, int(ramp(self.max_step_percent, step) * num)))

    def __call__(self, rgb: Tensor, prompts, step: int, generator: torch.Generator, c2w: Tensor | None = None) -> SDSOutput:
        """rgb [B,H,W,3] in [0,1] (differentiable); prompts: a PromptBatch of (2+K)*B embeddings; c2w [B,4,4]: the
        cameras, which a MultiView denoiser is conditioned on (it also gets one timestep per group of views)."""
        den = self.denoiser
        rgb = rgb.permute(0, 3, 1, 2)  # a sampling encoder draws from the run's stream: resume stays exact
        latents = den.encode_sample(rgb, generator) if isinstance(den, SamplesLatents) else den.encode(rgb)
        batch = latents.shape[0]
        lo, hi = self.timestep_range(step)
        # drawn on the generator's device (the training device in train.py): no CPU draw, no copy
        gen_device = generator.device
        if isinstance(den, MultiView):  # a group's views are denoised together, at one noise level (MVDream)
            t = torch.randint(lo, hi + 1, (batch // den.views_per_group,), generator=generator, device=gen_device)
            t = t.repeat_interleave(den.views_per_group).to(latents.device)
        else:
            t = torch.randint(lo, hi + 1, (batch,), generator=generator, device=gen_device).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=gen_device).to(latents.device)
        with torch.no_grad():
            x_t = add_noise(den, latents.detach(), noise, t)
            neg_w = prompts.neg_weights.to(latents.device) if prompts.num_neg else None
            eps_hat, eps_pos = guided_eps(den, x_t, t, prompts.text_emb, neg_w, self.guidance_scale, self.mode,
                                          self.neg_time_ramp, self.neg_alignment, self.neg_gain, prompts.emphasis, c2w,
                                          with_positive=True)
            if self.recon_loss:
                group = den.views_per_group if isinstance(den, MultiView) else 1
                grad = latents.detach().float() - self.reconstruction(x_t.float(), t, eps_hat, eps_pos, group)
            else:
                w = 1 - den.alphas_cumprod.to(latents.device)[t] if self.weighting == "sds" else torch.ones(batch, device=latents.device)
                grad = w.float().view(-1, *([1] * (latents.dim() - 1))) * (eps_hat - noise)
            # non-finite entries are zeroed and the rest of the batch still trains (threestudio does
            # the same); the trainer skips the step only above trainer.nonfinite_skip_share
            nonfinite = (~torch.isfinite(grad)).sum()
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            if self.grad_clip is not None:  # a number or a ramp over training steps (SDS only: checked above)
                clip = ramp(self.grad_clip, step)
                grad = grad.clamp(-clip, clip)
        target = (latents - grad).detach()
        loss = 0.5 * ((latents - target) ** 2).sum() / batch
        return SDSOutput(loss, grad.flatten(1).norm(dim=1).mean(), nonfinite, nonfinite.float() / grad.numel(), t)

    def reconstruction(self, x_t: Tensor, t: Tensor, eps_hat: Tensor, eps_pos: Tensor, group: int) -> Tensor:
        """The x0-reconstruction target [B,...] (module docstring): x0 from the guided eps, its spread rescaled
        towards x0 from the positive prompt's eps over each `group` consecutive samples by recon_std_rescale."""
        abar = self.denoiser.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        x0 = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        if self.recon_std_rescale == 0:
            return x0
        x0_pos = (x_t - (1 - abar).sqrt() * eps_pos) / abar.sqrt()
        spread = lambda x: x.reshape(x.shape[0] // group, -1).std(dim=1)  # noqa: E731  (per group: views, C, H, W)
        factor = ((spread(x0_pos) + 1e-8) / (spread(x0) + 1e-8)).repeat_interleave(group)
        factor = factor.view(-1, *([1] * (x_t.dim() - 1)))
        return self.recon_std_rescale * x0 * factor + (1 - self.recon_std_rescale) * x0
