"""Deterministic toy text embeddings: no download, object words stronger than view words.

Known concepts (objects and views) get orthonormal directions; every other word gets a fixed
pseudo-random direction (seeded by a hash of the word) in the remaining dimensions, with a small
weight. e(text) = sum of its words' weighted directions; the empty text embeds to zero.

The held-out objects (horse, rabbit, chair: issue 21's evaluation on objects nothing was tuned on) get
directions after the first `dim` dimensions, so every text of the original world (dog, cat, car) embeds
exactly as before, padded with zeros: its prior, and every number measured with it, is unchanged.

`structure="clip"` (issue 28) gives the same words CLIP's structure instead of a bag: a text becomes a fixed-length
sequence of token states, [BOS, words..., EOS, padding], each state the sum of the token vectors up to it plus a
position vector (a causal mix, as CLIP's causal attention lets each token see the ones before it), scaled to unit
norm (the non-linearity, as CLIP's layer norm). The padding states therefore carry the whole sentence, a view word
changes every state after it, and nothing is a sum of words any more. The prior reads a pooled feature from the
states (`readout`: their mean, scaled to unit norm), as SD's UNet reads CLIP's states through attention: its
log-prior is then not linear in the conditioning, so extrapolating the conditioning is no product of experts
(docs/method.md, "View emphasis in score space").
"""
from __future__ import annotations

import hashlib
import re
from typing import Literal, Sequence

import torch
from torch import Tensor

from perpneg3d.errors import ConfigError
from perpneg3d.validation import NonNegativeFloat, PositiveInt, validated

SYNONYMS = {
    "dog": ("dog", "dogs", "puppy", "corgi", "westie", "terrier", "doggy", "hound"),
    "cat": ("cat", "cats", "kitten", "kitty", "tabby"),
    "car": ("car", "cars", "lamborghini", "vehicle", "automobile", "sportscar"),
    "horse": ("horse", "horses", "pony", "stallion", "mare"),
    "rabbit": ("rabbit", "rabbits", "bunny", "hare"),
    "chair": ("chair", "chairs", "armchair"),
}
HELD_OUT = ("horse", "rabbit", "chair")  # added after the original world: directions beyond `dim`
VIEW_WORDS = ("front", "side", "back", "overhead")
CONCEPTS = tuple(o for o in SYNONYMS if o not in HELD_OUT) + VIEW_WORDS


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def object_of(text: str) -> str | None:
    """The first known object named in `text` (synonyms included), else None."""
    for word in words(text):
        for name, syn in SYNONYMS.items():
            if word in syn:
                return name
    return None


SPECIAL_TOKENS = ("<bos>", "<eos>")  # CLIP's start and end tokens; padding tokens add nothing but their position


class ToyTextEncoder:
    """Maps texts to [N, dim + 3] vectors (bag of words) or [N, max_length, dim + 3] token states (clip);
    <readout(e(p)), readout(e(c))> is large when p and c name the same things."""

    @validated("guidance.denoiser.text_encoder")
    def __init__(self, dim: PositiveInt = 64, object_weight: NonNegativeFloat = 1.0, view_weight: NonNegativeFloat = 0.2,
                 other_weight: NonNegativeFloat = 0.05, structure: Literal["bag_of_words", "clip"] = "bag_of_words",
                 max_length: PositiveInt = 16, position_weight: NonNegativeFloat = 0.02):
        if dim <= len(CONCEPTS):
            raise ConfigError(f"text dim={dim} must exceed the {len(CONCEPTS)} concept directions")
        if structure == "clip" and max_length < 3:
            raise ConfigError(f"guidance.denoiser.text_encoder.max_length={max_length}: must be at least 3 "
                              "(start token, one word, end token)")
        self.dim, self.width = dim, dim + len(HELD_OUT)
        self.object_weight, self.view_weight, self.other_weight = object_weight, view_weight, other_weight
        self.structure, self.max_length = structure, max_length
        self.bag_of_words = structure == "bag_of_words"  # e(text) is the sum of its words' vectors
        rand = torch.randn(max_length, dim - len(CONCEPTS), generator=torch.Generator().manual_seed(7))
        self.positions = torch.zeros(max_length, self.width)
        self.positions[:, len(CONCEPTS):dim] = position_weight * rand / rand.norm(dim=1, keepdim=True)
        self._cache: dict[str, Tensor] = {}

    def _word_vector(self, word: str) -> Tensor:
        vec = torch.zeros(self.width)
        for name, syn in SYNONYMS.items():
            if word in syn:
                index = self.dim + HELD_OUT.index(name) if name in HELD_OUT else CONCEPTS.index(name)
                vec[index] = self.object_weight
                return vec
        if word in VIEW_WORDS:
            vec[CONCEPTS.index(word)] = self.view_weight
            return vec
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        rand = torch.randn(self.dim - len(CONCEPTS), generator=torch.Generator().manual_seed(seed))
        vec[len(CONCEPTS):self.dim] = self.other_weight * rand / rand.norm()
        return vec

    def embed_one(self, text: str) -> Tensor:
        if text not in self._cache:
            if self.bag_of_words:
                self._cache[text] = sum((self._word_vector(w) for w in words(text)), torch.zeros(self.width))
            else:
                self._cache[text] = self._token_states(text)
        return self._cache[text]

    def _token_states(self, text: str) -> Tensor:
        """[max_length, width]: unit-norm causal sums of [<bos>, words..., <eos>] plus positions (words past
        max_length - 2 are cut, as CLIP cuts at 77 tokens); padding tokens add only their position."""
        tokens = [SPECIAL_TOKENS[0], *words(text)[:self.max_length - 2], SPECIAL_TOKENS[1]]
        x = torch.zeros(self.max_length, self.width)
        x[:len(tokens)] = torch.stack([self._word_vector(t) for t in tokens])
        states = x.cumsum(0) + self.positions
        return states / states.norm(dim=-1, keepdim=True)

    def readout(self, emb: Tensor) -> Tensor:
        """[N, width] the feature the prior matches captions by: the bag-of-words vector itself, or the mean of
        the token states scaled to unit norm (not linear in the states)."""
        if self.bag_of_words:
            return emb
        pooled = emb.float().mean(dim=-2)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        empty = (0, self.width) if self.bag_of_words else (0, self.max_length, self.width)
        return torch.stack([self.embed_one(t) for t in texts]) if texts else torch.zeros(empty)
