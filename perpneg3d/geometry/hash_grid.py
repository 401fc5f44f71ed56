"""Multiresolution hash encoding (Mueller et al. 2022): tiny-cuda-nn on CUDA, pure torch elsewhere.

tinycudann is imported only here, behind a guard, and only when asked for (implementation "tcnn",
or "auto" on a CUDA device). The torch version follows the same definition: level l has grid scale
s_l = base_resolution * b^l - 1 with b = per_level_scale; a point x in [0,1]^3 sits at x * s_l + 0.5;
the 8 surrounding vertices are looked up densely when the level's grid fits the table, else by the
spatial hash (x*1) xor (y*2654435761) xor (z*805459861) mod T; trilinear interpolation.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from perpneg3d.errors import ConfigError, first_line

log = logging.getLogger(__name__)
PRIMES = (1, 2654435761, 805459861)
CORNERS = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)])  # [8,3] offsets (x,y,z)


def import_tcnn():
    """tinycudann or None; never raises. Besides ImportError, a tcnn build without kernels for this
    GPU's architecture raises RuntimeError/OSError (or others) at import: any of them means None."""
    try:
        import tinycudann  # noqa: PLC0415  (optional CUDA dependency)

        return tinycudann
    except Exception as err:  # noqa: BLE001
        log.debug("tinycudann unavailable: %s", err)
        return None


def build_tcnn_encoding(tcnn, config: dict) -> nn.Module | None:
    """tcnn's encoding after one forward and backward on the current GPU, or None (with one logged
    line) when tcnn fails there: a build without kernels for this architecture often imports fine
    and fails only at construction or first use."""
    try:
        encoding = tcnn.Encoding(3, config, dtype=torch.float32)
        probe = torch.rand(128, 3, device="cuda", requires_grad=False)
        encoding.to("cuda")(probe).float().sum().backward()
        encoding.zero_grad(set_to_none=True)
        return encoding
    except Exception as err:  # noqa: BLE001
        log.warning("tinycudann fails on this GPU (%s); using the torch hash grid", first_line(err, 200))
        return None


def level_layout(n_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float):
    """Per level: grid scale s_l, vertex resolution r_l, table size, dense flag, table offset."""
    scales, resolutions, sizes, dense = [], [], [], []
    table = 2 ** log2_hashmap_size
    for level in range(n_levels):
        scale = base_resolution * per_level_scale ** level - 1.0
        res = int(math.ceil(scale)) + 1
        fits = res ** 3 <= table
        size = (res ** 3 + 7) // 8 * 8 if fits else table
        scales.append(scale), resolutions.append(res), sizes.append(size), dense.append(fits)
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + s)
    return scales, resolutions, sizes, dense, offsets


class TorchHashGrid(nn.Module):
    """Pure-torch hash grid: x [N,3] in [0,1] -> features [N, n_levels * n_features_per_level]."""

    def __init__(self, n_levels: int, n_features_per_level: int, log2_hashmap_size: int, base_resolution: int,
                 per_level_scale: float, init_scale: float = 1e-4):
        super().__init__()
        scales, res, sizes, dense, offsets = level_layout(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
        self.n_levels, self.n_features = n_levels, n_features_per_level
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.register_buffer("resolutions", torch.tensor(res, dtype=torch.long), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self.register_buffer("dense", torch.tensor(dense), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("primes", torch.tensor(PRIMES, dtype=torch.long), persistent=False)
        self.register_buffer("corners", CORNERS.clone(), persistent=False)
        self.embeddings = nn.Parameter(torch.empty(sum(sizes), n_features_per_level).uniform_(-init_scale, init_scale))
        self.n_dense = sum(dense)
        if list(dense) != [True] * self.n_dense + [False] * (n_levels - self.n_dense):
            raise ConfigError("hash grid levels must be dense first, then hashed (resolutions grow with the level)")

    def level_indices(self, gx: Tensor, gy: Tensor, gz: Tensor, dense: bool) -> Tensor:
        """Table rows [N,l] for integer vertex coordinates [N,l] of the dense or of the hashed levels.

        Dense levels index (x + y r + z r^2) mod T_l (the upper vertex of the last cell wraps, as in
        tiny-cuda-nn); hashed levels xor the coordinates times the primes and keep the low bits (their
        table sizes are powers of two, so that is the same modulo).
        """
        nd = self.n_dense
        if dense:
            res = self.resolutions[:nd]
            return torch.remainder(gx + gy * res + gz * (res * res), self.sizes[:nd]) + self.offsets[:nd]
        hashed = (gx * PRIMES[0]) ^ (gy * PRIMES[1]) ^ (gz * PRIMES[2])
        return (hashed & (self.sizes[nd:] - 1)) + self.offsets[nd:]

    def forward(self, x: Tensor) -> Tensor:
        """x [N,3] in [0,1] (clamped) -> [N, n_levels * n_features]."""
        x = x.float().clamp(0, 1)
        n, nd = x.shape[0], self.n_dense
        blocks = [(True, slice(0, nd))] if nd else []
        if nd < self.n_levels:
            blocks.append((False, slice(nd, self.n_levels)))
        out = []
        for dense, levels in blocks:  # contiguous [N, levels] tensors per axis: far faster than strided views
            pos = [x[:, i:i + 1] * self.scales[levels] + 0.5 for i in range(3)]
            base = [p.floor() for p in pos]
            frac = [p - b for p, b in zip(pos, base)]
            one_minus = [1 - f for f in frac]
            base = [b.long() for b in base]
            weights, rows = [], []
            for corner in CORNERS.tolist():  # the 8 cell vertices: a fixed loop, vectorised over points and levels
                w = [f if c else om for f, om, c in zip(frac, one_minus, corner)]
                weights.append(w[0] * w[1] * w[2])
                rows.append(self.level_indices(*(b + 1 if c else b for b, c in zip(base, corner)), dense=dense))
            if torch.is_grad_enabled() and self.embeddings.requires_grad:
                # one index_select for all vertices: its backward is a single index_add_ into one zeroed
                # table (embedding's sort-based backward is far slower on CPU)
                rows = torch.stack(rows)  # [8,N,l]
                feats = self.embeddings.index_select(0, rows.reshape(-1)).view(*rows.shape, self.n_features)
                out.append((torch.stack(weights).unsqueeze(-1) * feats).sum(0))
            else:  # inference: accumulate vertex by vertex, no [8,N,l,F] intermediate
                acc = torch.zeros(n, rows[0].shape[1], self.n_features, device=x.device)
                for w, r in zip(weights, rows):
                    acc += w.unsqueeze(-1) * self.embeddings.index_select(0, r.reshape(-1)).view(*r.shape, self.n_features)
                out.append(acc)
        return torch.cat(out, 1).flatten(1)  # [N, levels * features]; N may be 0 (nothing to encode)


class HashGridEncoding(nn.Module):
    """Hash-grid encoding with a coarse-to-fine level mask.

    implementation: "auto" (tcnn on CUDA when installed, else torch), "tcnn" or "torch".
    finest_resolution sets per_level_scale = (finest / base) ** (1 / (n_levels - 1)) unless given.
    """

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2, log2_hashmap_size: int = 19,
                 base_resolution: int = 16, finest_resolution: int = 2048, per_level_scale: float | None = None,
                 implementation: str = "auto"):
        super().__init__()
        if implementation not in ("auto", "tcnn", "torch"):
            raise ConfigError(f"geometry hash grid implementation={implementation!r}: use auto, tcnn or torch")
        if per_level_scale is None:
            per_level_scale = (finest_resolution / base_resolution) ** (1 / max(n_levels - 1, 1))
        self.n_levels, self.n_features = n_levels, n_features_per_level
        self.n_output_dims = n_levels * n_features_per_level
        tcnn = import_tcnn() if implementation in ("auto", "tcnn") and torch.cuda.is_available() else None
        if implementation == "tcnn" and tcnn is None:
            raise ConfigError("geometry implementation=tcnn needs CUDA and tinycudann (see README, GPU): "
                              "use implementation=torch or auto")
        config = dict(otype="HashGrid", n_levels=n_levels, n_features_per_level=n_features_per_level,
                      log2_hashmap_size=log2_hashmap_size, base_resolution=base_resolution, per_level_scale=per_level_scale)
        self.encoding = build_tcnn_encoding(tcnn, config) if tcnn is not None else None
        if self.encoding is None:
            if implementation == "tcnn":
                raise ConfigError("geometry implementation=tcnn: tinycudann fails on this GPU (see the log line above): "
                                  "use implementation=torch or auto")
            self.encoding = TorchHashGrid(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
        self.implementation = "torch" if isinstance(self.encoding, TorchHashGrid) else "tcnn"
        # The buffer goes into checkpoints; the Python int mirrors it so forward() never reads a
        # device tensor on the host (one synchronisation per call on CUDA).
        self.register_buffer("active_levels", torch.tensor(n_levels), persistent=True)
        self._active = n_levels

    def set_active_levels(self, levels: int) -> None:
        """Coarse-to-fine: levels past `levels` output zeros."""
        self._active = int(min(max(levels, 1), self.n_levels))
        self.active_levels.fill_(self._active)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of the other implementation (resume on another device): tcnn's flat `params`
        # and the torch grid's [rows, features] `embeddings` hold the same table in the same order
        # (gpu_check's parity section copies one into the other), so a reshape converts them.
        mine, theirs = ("params", "embeddings") if self.implementation == "tcnn" else ("embeddings", "params")
        other = f"{prefix}encoding.{theirs}"
        if other in state_dict and f"{prefix}encoding.{mine}" not in state_dict:
            table = state_dict.pop(other)
            target = getattr(self.encoding, mine)
            state_dict[f"{prefix}encoding.{mine}"] = table.reshape(target.shape) if table.numel() == target.numel() else table
            log.info("hash grid: loading a %s checkpoint into the %s implementation", "torch" if theirs == "embeddings"
                     else "tcnn", self.implementation)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "active_levels"
        if key in state_dict:
            self._active = int(state_dict[key])

    def forward(self, x: Tensor) -> Tensor:
        """x [N,3] in [0,1] -> [N, n_levels * n_features] (levels past active_levels zeroed)."""
        feats = self.encoding(x.float()).float()
        if self._active < self.n_levels:
            mask = (torch.arange(self.n_levels, device=x.device) < self._active).float()
            feats = feats * mask.repeat_interleave(self.n_features)
        return feats
