"""3D Gaussians as a geometry (issue 30; docs/architecture.md, "Gaussian splatting").

N Gaussians, each a mean, three log standard deviations along its own axes, a rotation (a quaternion w, x, y, z),
a peak opacity (a logit) and an albedo (a logit). `gaussians()` gives them activated (contracts.Gaussians), which
is all a splatting renderer reads. Initialised as a ball of points (the volume's blob, as DreamGaussian and
GaussianDreamer start from a sphere or a point cloud), each Gaussian round, small and faint.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perpneg3d.contracts import Gaussians
from perpneg3d.errors import ConfigError
from perpneg3d.validation import NonNegativeInt, PositiveFloat, PositiveInt, Probability, validated


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """[N,4] quaternions (w, x, y, z), normalised here -> [N,3,3] rotation matrices (columns: the rotated axes)."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).view(-1, 3, 3)


class FixedGaussians:
    """Given Gaussians as a contracts.GaussianField, with no parameters of its own: what a check or a benchmark
    renders when it builds the tensors itself (gradients flow to them)."""

    def __init__(self, gaussians: Gaussians, radius: float = 1.0):
        self._gaussians, self.radius = gaussians, radius

    def gaussians(self) -> Gaussians:
        return self._gaussians

    def param_groups(self) -> dict:
        return {}

    def update_step(self, step: int) -> None:
        """Nothing changes with the step."""


class GaussianCloud(nn.Module):
    """N 3D Gaussians in [-radius, radius]^3 (a contracts.GaussianField).

    num_points: N; init_radius: the ball the means are drawn in (uniform in volume, seeded by `seed`);
    init_scale: each Gaussian's standard deviation (world units, the same along its three axes);
    init_opacity: its peak opacity; init_color: its albedo (grey by default).

    Densification (3D Gaussian splatting's adaptive control, Kerbl et al. 2023; on when densify_every > 0): every
    step adds each Gaussian's mean-gradient norm to a running sum; every `densify_every` steps from
    `densify_from` until `densify_until`, a Gaussian whose average is above `grad_threshold` is cloned when its
    largest scale is at most `split_scale` and split in two (positions drawn from itself, scales / 1.6) when larger;
    Gaussians below `prune_opacity` are removed; the sums restart. Never above `max_points`: the Gaussians with the
    largest averages go first. Draws come from a generator seeded by (seed, step), so a resumed run splits as the
    uninterrupted one did.
    """

    @validated("geometry")
    def __init__(self, radius: PositiveFloat = 1.0, num_points: PositiveInt = 4096, init_radius: PositiveFloat = 0.5,
                 init_scale: PositiveFloat = 0.04, init_opacity: Probability = 0.1,
                 init_color: tuple[float, float, float] = (0.5, 0.5, 0.5), seed: int = 0,
                 densify_every: NonNegativeInt = 0, densify_from: NonNegativeInt = 100, densify_until: NonNegativeInt = 3000,
                 grad_threshold: PositiveFloat = 0.01, split_scale: PositiveFloat = 0.05,
                 prune_opacity: Probability = 0.005, max_points: PositiveInt = 100_000):
        super().__init__()
        if init_radius > radius:
            raise ConfigError(f"geometry.init_radius={init_radius} must not exceed geometry.radius={radius}")
        if not 0 < init_opacity < 1 or not all(0 < c < 1 for c in init_color):
            raise ConfigError(f"geometry.init_opacity={init_opacity} and geometry.init_color={list(init_color)} must lie "
                              "strictly between 0 and 1 (they are sigmoids of the parameters)")
        self.radius = radius
        g = torch.Generator().manual_seed(seed)
        direction = F.normalize(torch.randn(num_points, 3, generator=g), dim=-1)
        distance = init_radius * torch.rand(num_points, 1, generator=g) ** (1 / 3)  # uniform in the ball's volume
        self.means = nn.Parameter(direction * distance)
        self.log_scales = nn.Parameter(torch.full((num_points, 3), math.log(init_scale)))
        self.rotations = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(num_points, 1))
        self.opacity_logits = nn.Parameter(torch.full((num_points,), math.log(init_opacity / (1 - init_opacity))))
        color = torch.tensor(init_color, dtype=torch.float32)
        self.color_logits = nn.Parameter(torch.log(color / (1 - color)).repeat(num_points, 1))
        self.seed, self.densify_every, self.densify_from, self.densify_until = seed, densify_every, densify_from, densify_until
        self.grad_threshold, self.split_scale, self.prune_opacity = grad_threshold, split_scale, prune_opacity
        self.max_points = max_points
        self.register_buffer("grad_sum", torch.zeros(num_points))  # densification statistics, checkpointed
        self.register_buffer("grad_count", torch.zeros(num_points))

    @property
    def num_points(self) -> int:
        return int(self.means.shape[0])

    def _rows(self) -> list[Tensor]:
        """Every per-Gaussian tensor: the parameters, then the statistics."""
        return [self.means, self.log_scales, self.rotations, self.opacity_logits, self.color_logits,
                self.grad_sum, self.grad_count]

    def gaussians(self) -> Gaussians:
        return Gaussians(self.means, self.log_scales.exp(), F.normalize(self.rotations, dim=-1),
                         torch.sigmoid(self.opacity_logits), torch.sigmoid(self.color_logits))

    def param_groups(self) -> dict[str, list]:
        """geometry.<name> learning rates: means, scales, rotations, opacities, colors."""
        return {"means": [self.means], "scales": [self.log_scales], "rotations": [self.rotations],
                "opacities": [self.opacity_logits], "colors": [self.color_logits]}

    def update_step(self, step: int) -> None:
        """No schedule of its own (densification is the trainer's call after each optimiser step: densify)."""

    # -- densification (contracts.Densifies) -------------------------------------------------------------------
    @torch.no_grad()
    def densify(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After optimiser step `step` (1-based): add this step's gradient norms; on the schedule, clone, split and
        prune (the class docstring), resizing the parameters and the optimiser's state in place."""
        if not self.densify_every or step > self.densify_until:
            return
        if self.means.grad is not None:
            self.grad_sum += self.means.grad.norm(dim=-1)
            self.grad_count += 1
        if step < self.densify_from or step % self.densify_every:
            return
        n = self.num_points
        average = self.grad_sum / self.grad_count.clamp_min(1)
        big = self.log_scales.exp().max(-1).values > self.split_scale
        keep = torch.sigmoid(self.opacity_logits) >= self.prune_opacity
        hot = (average > self.grad_threshold) & keep  # a Gaussian about to be pruned is neither cloned nor split
        room = max(self.max_points - n, 0)  # each clone or split adds one Gaussian
        if int(hot.sum()) > room:
            keep_hot = average.masked_fill(~hot, -1.0).topk(room).indices
            hot = torch.zeros_like(hot).index_fill_(0, keep_hot, True)
        clone, split = hot & ~big, hot & big
        source = torch.cat([torch.arange(n, device=hot.device)[keep & ~split], clone.nonzero().squeeze(-1),
                            split.nonzero().squeeze(-1).repeat(2)])  # each new row's source row
        fresh = torch.zeros(len(source), dtype=torch.bool, device=hot.device)
        kept = int((keep & ~split).sum())
        fresh[kept:] = True
        rows = [t[source] for t in self._rows()]
        n_split = int(split.sum())
        if n_split:  # two Gaussians drawn from each split one, 1.6 times smaller (3DGS)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            at = slice(len(source) - 2 * n_split, len(source))
            scales = rows[1][at].exp()
            offset = torch.randn(2 * n_split, 3, generator=g).to(scales) * scales
            rows[0][at] = rows[0][at] + (quaternion_to_matrix(rows[2][at]) @ offset.unsqueeze(-1)).squeeze(-1)
            rows[1][at] = rows[1][at] - math.log(1.6)
        rows[5].zero_()  # the statistics restart
        rows[6].zero_()
        for tensor, new in zip(self._rows(), rows):
            old_shape = tensor.shape
            tensor.data = new.contiguous()
            if isinstance(tensor, nn.Parameter):
                tensor.grad = None
                state = optimizer.state.get(tensor, {})
                for key, value in state.items():  # Adam's moments follow their rows; new Gaussians start at 0
                    if torch.is_tensor(value) and value.shape == old_shape:
                        moved = value[source].clone()
                        moved[fresh] = 0
                        state[key] = moved

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint holds as many Gaussians as the run had then: resize to it (in place) before loading."""
        for name in ("means", "log_scales", "rotations", "opacity_logits", "color_logits", "grad_sum", "grad_count"):
            saved = state_dict.get(prefix + name)
            tensor = getattr(self, name)
            if saved is not None and saved.shape != tensor.shape:
                tensor.data = torch.zeros(saved.shape, dtype=tensor.dtype, device=tensor.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- point queries: mesh export (the existing marching cubes and colour paths) ----------------------------
    def _weights(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussians that reach points [P,3], and their volume densities there [P,M]: kappa_i exp(-m_i(p) / 2)
        with m the squared Mahalanobis distance, cut beyond 3 standard deviations (m > 9, as the splats are), and
        kappa_i = -log(1 - opacity_i) / (sqrt(2 pi) sigma_i), sigma_i the geometric mean of its scales, so a ray
        through a round Gaussian's centre accumulates optical depth -log(1 - opacity): the density's renders are
        as opaque as the splats, and export.threshold=auto finds their surface. Only Gaussians whose 3-sigma box
        meets the points' bounding box are evaluated."""
        g = self.gaussians()
        reach = 3 * g.scales.max(-1).values.unsqueeze(-1)
        lo, hi = points.min(0).values, points.max(0).values
        near = ((g.means - reach <= hi) & (g.means + reach >= lo)).all(-1).nonzero().squeeze(-1)
        axes = quaternion_to_matrix(g.rotations[near])  # [M,3,3], columns the Gaussian's axes
        scales = g.scales[near]
        sigma = scales.prod(-1) ** (1 / 3)
        kappa = -torch.log1p(-g.opacities[near].clamp_max(1 - 1e-6)) / (math.sqrt(2 * math.pi) * sigma)
        local = torch.einsum("pnj,njk->pnk", points.unsqueeze(1) - g.means[near].unsqueeze(0), axes) / scales
        m = (local * local).sum(-1)
        return near, torch.where(m <= 9.0, kappa * torch.exp(-0.5 * m), torch.zeros_like(m))

    def _by_neighbourhood(self, points: Tensor, chunk: int, fn) -> Tensor:
        """fn applied to chunks of `chunk` points taken in Morton order (a z-order curve over a 32^3 lattice of
        the box): each chunk is a compact piece of space, so _weights meets only the Gaussians near it (render and
        texture points come scattered over the whole object); results back in the points' order."""
        q = ((points.detach() / self.radius + 1) * 16).long().clamp(0, 31)
        code = torch.zeros_like(q[:, 0])
        for bit in range(5):
            for axis in range(3):
                code |= ((q[:, axis] >> bit) & 1) << (3 * bit + axis)
        order = code.argsort()
        done = torch.cat([fn(part) for part in points[order].split(chunk)])
        return done[order.argsort()]

    def density(self, points: Tensor, chunk: int = 1024) -> Tensor:
        """[P] the sum of the Gaussians' volume densities (_weights) at points [P,3]."""
        if not len(points):
            return points.new_zeros(0)
        return self._by_neighbourhood(points, chunk, lambda part: self._weights(part)[1].sum(-1))

    def albedo(self, points: Tensor, chunk: int = 1024) -> Tensor:
        """[P,3] the density-weighted mean colour of the Gaussians at points [P,3] (grey where none reaches)."""
        if not len(points):
            return points.new_zeros(0, 3)
        colors = self.gaussians().colors

        def mean_colour(part):
            near, w = self._weights(part)
            return (w @ colors[near] + 0.5 * 1e-12) / (w.sum(-1, keepdim=True) + 1e-12)

        return self._by_neighbourhood(points, chunk, mean_colour)
