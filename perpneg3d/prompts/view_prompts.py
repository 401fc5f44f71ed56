"""Per-camera text embeddings for view-dependent (Perp-Neg) score distillation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Mapping

import torch
from pydantic import Field
from torch import Tensor

from perpneg3d.contracts import LinearTextEmbedding
from perpneg3d.errors import ConfigError
from perpneg3d.prompts.view_weights import NEGATIVE_VIEWS, ExponentialSchedule
from perpneg3d.prompts.views import OVERHEAD, VIEWS, view_labels, view_prompt
from perpneg3d.validation import Elevation, validated


@dataclass
class PromptBatch:
    """Text embeddings for one guidance step in the block layout of docs/conventions.md.

    text_emb: [(2+K)*B, ...] blocks [uncond | pos | neg_1 | ... | neg_K], each the B cameras in order;
    with emphasis != 1 one more block last, the prompt without view words: [(3+K)*B, ...].
    neg_weights: [B,K] weights of the negatives (K = 0 for plain view-dependent prompting).
    labels: [B] index into VIEWS of each camera's view.
    emphasis: the score-space view emphasis w (guidance.perpneg.combine), 1 for none.
    """

    text_emb: Tensor
    neg_weights: Tensor
    labels: Tensor
    emphasis: float = 1.0

    @property
    def num_neg(self) -> int:
        return self.neg_weights.shape[1]


def validate_prompt(prompt: str) -> str:
    """Reject an empty prompt with the fix."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"prompt is empty ({prompt!r}): pass one, e.g. prompt=\"a corgi standing\"")
    return prompt.strip()


class ViewPrompts:
    """View-dependent prompts: '<prompt>, <view> view' by azimuth, with Perp-Neg negatives.

    perp_neg=True: the positive embedding interpolates neighbouring views and the negatives are the
    front and side embeddings weighted by `schedule` (arXiv 2304.04968 section 4; docs/method.md). perp_neg=False: plain
    DreamFusion view prompts, K = 0 (Perp-Neg then reduces to classifier-free guidance).
    view_prompts overrides the text of single views, e.g. {"back": "a corgi seen from behind"}.
    score_emphasis w != 1 weights what the view words add to the prompt in score space: each view-conditioned
    noise prediction becomes eps(prompt) + w * (eps(view text) - eps(prompt)), the product of experts
    p(x | prompt)^(1-w) p(x | view text)^w, at the cost of one more block (the prompt alone) in the step's
    batched denoiser call (guidance.perpneg.combine; docs/method.md, "View emphasis"). Any prior.
    view_emphasis w != 1 does the same in embedding space: every view embedding becomes
    e(prompt) + w * (e(view text) - e(prompt)). That is the product of experts only where the prior's
    conditioning is linear in a bag-of-words embedding (the toy prior: contracts.LinearTextEmbedding); with
    CLIP or T5 token states it moves padding and prompt tokens off the encoder's range, so bind() refuses it.
    """

    @validated("prompts")
    def __init__(
        self,
        prompt: str,
        negative_prompt: str = "",
        perp_neg: bool = True,
        template: str = "{prompt}, {view} view",
        view_prompts: Mapping[str, str] | None = None,
        schedule=None,
        front_max_deg: Annotated[float, Field(gt=0, le=180)] = 45.0,
        back_min_deg: Annotated[float, Field(gt=0, le=180)] = 135.0,
        overhead_min_deg: Elevation = 60.0,
        view_emphasis: Annotated[float, Field(ge=0)] = 1.0,
        score_emphasis: Annotated[float, Field(ge=0)] = 1.0,
    ):
        self.prompt = validate_prompt(prompt)
        self.negative_prompt = negative_prompt
        self.perp_neg = perp_neg
        overrides = dict(view_prompts or {})
        unknown = set(overrides) - set(VIEWS)
        if unknown:
            raise ConfigError(f"view_prompts has unknown views {sorted(unknown)}: use {', '.join(VIEWS)}")
        self.view_texts = {v: overrides.get(v, view_prompt(self.prompt, v, template)) for v in VIEWS}
        self.schedule = schedule if schedule is not None else ExponentialSchedule()
        if view_emphasis != 1.0 and score_emphasis != 1.0:
            raise ConfigError(f"prompts.view_emphasis={view_emphasis} and prompts.score_emphasis={score_emphasis} "
                              "both weight the view words: set one of them (score_emphasis works with any prior)")
        self.view_emphasis = view_emphasis
        self.score_emphasis = score_emphasis
        self.thresholds = dict(front_max_deg=front_max_deg, back_min_deg=back_min_deg, overhead_min_deg=overhead_min_deg)

    def texts(self) -> list[str]:
        """All texts this object embeds: the negative prompt (unconditional), the four views, and the
        prompt itself when view_emphasis needs it."""
        return [self.negative_prompt] + [self.view_texts[v] for v in VIEWS] + ([self.prompt] if self.emphasised else [])

    @property
    def emphasised(self) -> bool:
        return self.view_emphasis != 1.0 or self.score_emphasis != 1.0

    def bind(self, denoiser) -> "ViewPrompts":
        """Embed this run's texts with `denoiser`, once (a bad prompt fails here, before step 0)."""
        if self.view_emphasis != 1.0 and not (isinstance(denoiser, LinearTextEmbedding) and denoiser.linear_text_embedding):
            structure = getattr(getattr(denoiser, "text_encoder", None), "structure", None)  # the toy encoder's
            name = type(denoiser).__name__ + (f" with text_encoder.structure={structure}" if structure else "")
            raise ConfigError(f"prompts.view_emphasis={self.view_emphasis} weights text embeddings, which weights the "
                              f"view words only for a bag-of-words encoder (the toy prior's), not "
                              f"{name}'s: use prompts.score_emphasis={self.view_emphasis} "
                              "(the same weighting on the noise predictions, any prior)")
        emb = denoiser.embed(self.texts())
        if self.view_emphasis != 1.0:
            base, views = emb[-1:].float(), emb[1:1 + len(VIEWS)].float()
            views = (base + self.view_emphasis * (views - base)).to(emb.dtype)
            emb = torch.cat([emb[:1], views])
        self._emb = emb
        return self

    def __call__(self, azimuth_deg: Tensor, elevation_deg: Tensor) -> PromptBatch:
        """The step's embeddings for cameras at azimuth/elevation [B] (degrees); bind() first."""
        emb = getattr(self, "_emb", None)
        if emb is None:
            raise RuntimeError("ViewPrompts.bind(denoiser) must be called before the prompts are used")
        uncond, views = emb[:1], emb[1:1 + len(VIEWS)]
        batch = azimuth_deg.shape[0]
        labels = view_labels(azimuth_deg, elevation_deg, **self.thresholds)
        # score-space emphasis: the prompt alone, one more block, last
        last = [emb[-1:].expand(batch, *emb.shape[1:])] if self.score_emphasis != 1.0 else []
        if not self.perp_neg:
            blocks = [uncond.expand(batch, *uncond.shape[1:]), views[labels.to(views.device)], *last]
            weights = torch.zeros(batch, 0, device=azimuth_deg.device)
            return PromptBatch(torch.cat(blocks), weights, labels, self.score_emphasis)
        mix = self.schedule(azimuth_deg, labels == OVERHEAD)  # the labels' threshold decides the weights too
        pos_mix = mix.pos_mix.to(device=views.device, dtype=torch.float32)
        pos = torch.einsum("bv,v...->b...", pos_mix, views.float()).to(views.dtype)
        negs = [views[VIEWS.index(v)].expand(batch, *views.shape[1:]) for v in NEGATIVE_VIEWS]
        blocks = [uncond.expand(batch, *uncond.shape[1:]), pos, *negs, *last]
        return PromptBatch(torch.cat(blocks), mix.neg_weights, labels, self.score_emphasis)
