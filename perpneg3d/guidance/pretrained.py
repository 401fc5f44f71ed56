"""What every diffusers-based prior shares: dtype and source resolution, the text-embedding cache,
truncation warnings and random per-string embeddings for random-weight benchmarks.

Stable Diffusion (stable_diffusion.py) and DeepFloyd IF (deepfloyd_if.py) both build on these.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from perpneg3d.devices import resolve_device
from perpneg3d.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(torch_dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> float16 on CUDA, float32 elsewhere."""
    if torch_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if torch_dtype not in DTYPES:
        raise ConfigError(f"unknown torch_dtype '{torch_dtype}': use auto, {', '.join(DTYPES)}")
    return DTYPES[torch_dtype]


def looks_like_path(name: str) -> bool:
    """A hub id is 'owner/name'; anything else (or an existing folder) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def offline_note() -> str:
    return " (offline mode: HF_HUB_OFFLINE=1)" if hub_offline() else ""


def model_source(name: str, local_files_only: bool | None) -> tuple[str, bool, str | None]:
    """(what to pass to from_pretrained, local_files_only, why it cannot load or None).

    local_files_only None follows HF_HUB_OFFLINE; a path that is not a folder is reported at once."""
    if looks_like_path(name) and not Path(name).expanduser().is_dir():
        return name, True, "no such folder"
    if local_files_only is None:
        local_files_only = hub_offline()
    return (str(Path(name).expanduser()) if looks_like_path(name) else name), local_files_only, None


def prepare_load(name: str, device: str, torch_dtype: str, local_files_only: bool | None, revision: str | None,
                 missing_message: Callable[[str, str], str]) -> tuple[torch.device, torch.dtype, str, dict]:
    """(device, dtype, source, from_pretrained kwargs) of a prior to load; a path that is not a folder raises
    ModelNotFoundError(missing_message(name, reason)) before anything is read."""
    dev = resolve_device(device)
    src, local_files_only, problem = model_source(name, local_files_only)
    if problem:
        raise ModelNotFoundError(missing_message(name, problem))
    return dev, resolve_dtype(torch_dtype, dev), src, {"revision": revision, "local_files_only": local_files_only}


def warn_if_truncated(tokenizer, texts: Sequence[str], max_len: int) -> None:
    """One warning per prompt the text encoder will cut, with how many tokens it drops."""
    for text in texts:
        n_tokens = len(tokenizer(text, truncation=False).input_ids)
        if n_tokens > max_len:
            log.warning(
                "prompt %r is %d tokens long; the last %d are dropped (the text encoder reads %d, "
                "special tokens included): shorten it", text, n_tokens, n_tokens - max_len, max_len)


def embed_cached(cache: dict[str, Tensor], texts: Sequence[str], encode: Callable[[list[str]], Tensor]) -> Tensor:
    """Embeddings [N, ...] of N texts; each distinct text is encoded once (one batched encode call for
    all new ones) and kept in `cache`."""
    texts = list(texts)
    missing = list(dict.fromkeys(t for t in texts if t not in cache))
    if missing:
        for text, emb in zip(missing, encode(missing)):
            cache[text] = emb
    return torch.stack([cache[t] for t in texts])


def random_text_embedding(texts: Sequence[str], length: int, dim: int) -> Tensor:
    """A fixed random [N, length, dim] tensor per string (seeded by its hash): stands in for a text
    encoder in random-weight benchmarks, where text encoding is cached and never part of a step."""
    out = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        out.append(torch.randn(length, dim, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(out)
