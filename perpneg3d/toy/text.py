"""Deterministic toy text embeddings: no download, object words stronger than view words.

Known concepts (objects and views) get orthonormal directions; every other word gets a fixed
pseudo-random direction (seeded by a hash of the word) in the remaining dimensions, with a small
weight. e(text) = sum of its words' weighted directions; the empty text embeds to zero.

The held-out objects (horse, rabbit, chair: issue 21's evaluation on objects nothing was tuned on) get
directions after the first `dim` dimensions, so every text of the original world (dog, cat, car) embeds
exactly as before, padded with zeros: its prior, and every number measured with it, is unchanged.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

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


class ToyTextEncoder:
    """Maps texts to [N, dim + 3] vectors; <e(p), e(c)> is large when p and c name the same things."""

    bag_of_words = True  # e(text) is the sum of its words' vectors (order and position play no part)

    @validated("guidance.denoiser.text_encoder")
    def __init__(self, dim: PositiveInt = 64, object_weight: NonNegativeFloat = 1.0, view_weight: NonNegativeFloat = 0.2,
                 other_weight: NonNegativeFloat = 0.05):
        if dim <= len(CONCEPTS):
            raise ConfigError(f"text dim={dim} must exceed the {len(CONCEPTS)} concept directions")
        self.dim, self.width = dim, dim + len(HELD_OUT)
        self.object_weight, self.view_weight, self.other_weight = object_weight, view_weight, other_weight
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
            self._cache[text] = sum((self._word_vector(w) for w in words(text)), torch.zeros(self.width))
        return self._cache[text]

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return torch.stack([self.embed_one(t) for t in texts]) if texts else torch.zeros(0, self.width)
