"""The NeRF field: hash grid -> density and albedo MLPs, with Magic3D's density blob."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from perpneg3d.errors import require
from perpneg3d.geometry.hash_grid import HashGridEncoding
from perpneg3d.validation import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, validated


def mlp(n_in: int, n_out: int, width: int, hidden_layers: int) -> nn.Sequential:
    layers, dim = [], n_in
    for _ in range(hidden_layers):
        layers += [nn.Linear(dim, width), nn.ReLU(inplace=True)]
        dim = width
    return nn.Sequential(*layers, nn.Linear(dim, n_out))


class ImplicitVolume(nn.Module):
    """Density and albedo over the box [-radius, radius]^3 (world units).

    density = softplus(raw + density_shift + blob(x)), blob(x) = blob_scale * (1 - |x| / blob_std)
    (Magic3D's initialisation: a soft ball at the origin); albedo = sigmoid(mlp). blob_radii [rx, ry, rz]
    makes the blob an ellipsoid, blob(x) = blob_scale * (1 - |x / radii|) (threestudio's and Fantasia3D's
    ellipsoid shape initialisation; docs/method.md, "Janus mechanisms").
    Normals point along -grad(density): autograd ("analytic", the config default as in threestudio) or
    finite differences.
    Coarse-to-fine: the first `start_level` levels are active, one more every `update_steps` after
    `start_step` (start_level = n_levels turns it off).
    """

    @validated("geometry")
    def __init__(
        self,
        radius: PositiveFloat = 2.0,
        n_levels: PositiveInt = 16,
        n_features_per_level: PositiveInt = 2,
        log2_hashmap_size: Annotated[int, Field(ge=4, le=30)] = 19,
        base_resolution: PositiveInt = 16,
        finest_resolution: PositiveInt = 2048,
        implementation: str = "auto",
        mlp_width: PositiveInt = 64,
        mlp_hidden_layers: NonNegativeInt = 1,
        blob_scale: NonNegativeFloat = 10.0,
        blob_std: PositiveFloat = 0.5,
        blob_radii: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None,
        density_shift: float = -1.0,  # runs made before this option existed used -1; configs set 0 (threestudio)
        normal_type: str = "finite_difference",
        finite_difference_eps: PositiveFloat = 0.01,
        start_level: PositiveInt = 16,
        start_step: NonNegativeInt = 0,
        update_steps: PositiveInt = 500,
    ):
        super().__init__()
        require(radius > 0, f"geometry.radius={radius} must be positive")
        require(normal_type in ("finite_difference", "analytic"), f"geometry.normal_type={normal_type!r}: use finite_difference or analytic")
        self.radius, self.blob_scale, self.blob_std, self.density_shift = radius, blob_scale, blob_std, density_shift
        self.normal_type, self.fd_eps = normal_type, finite_difference_eps
        # per-axis radii of an ellipsoid blob (a buffer: moves with .to(); not saved, so checkpoints load either way)
        radii = torch.tensor(list(blob_radii) if blob_radii else [], dtype=torch.float32)
        self.register_buffer("blob_radii", radii, persistent=False)
        self.start_level, self.start_step, self.update_steps = min(start_level, n_levels), start_step, max(1, update_steps)
        self.encoding = HashGridEncoding(n_levels, n_features_per_level, log2_hashmap_size, base_resolution,
                                         finest_resolution, implementation=implementation)
        self.density_mlp = mlp(self.encoding.n_output_dims, 1, mlp_width, mlp_hidden_layers)
        self.albedo_mlp = mlp(self.encoding.n_output_dims, 3, mlp_width, mlp_hidden_layers)
        self.update_step(0)

    def update_step(self, step: int) -> None:
        """Coarse-to-fine schedule of active hash-grid levels."""
        extra = 0 if step < self.start_step else (step - self.start_step) // self.update_steps
        self.encoding.set_active_levels(self.start_level + extra)

    def _encode(self, points: Tensor) -> Tensor:
        unit = ((points + self.radius) / (2 * self.radius)).clamp(0, 1)
        return self.encoding(unit)

    def _density_from(self, feats: Tensor, points: Tensor) -> Tensor:
        if len(self.blob_radii):
            blob = self.blob_scale * (1 - (points / self.blob_radii).norm(dim=-1))
        else:  # the ball, computed as before blob_radii existed: earlier runs stay bit-exact
            blob = self.blob_scale * (1 - points.norm(dim=-1) / self.blob_std)
        return F.softplus(self.density_mlp(feats).squeeze(-1) + self.density_shift + blob)

    def density(self, points: Tensor) -> Tensor:
        """[N,3] world -> [N] volume density."""
        return self._density_from(self._encode(points), points)

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """[N,3] world -> density [N], albedo [N,3] in [0,1]."""
        feats = self._encode(points)
        return self._density_from(feats, points), torch.sigmoid(self.albedo_mlp(feats))

    def albedo(self, points: Tensor) -> Tensor:
        return torch.sigmoid(self.albedo_mlp(self._encode(points)))

    def normals(self, points: Tensor) -> Tensor:
        """[N,3] unit normals, -grad(density) normalised."""
        if self.normal_type == "analytic":
            with torch.enable_grad():
                p = points if points.requires_grad else points.detach().requires_grad_(True)
                sigma = self.density(p)
                grad = torch.autograd.grad(sigma.sum(), p, create_graph=self.training)[0]
        else:
            eps = self.fd_eps
            offsets = torch.cat([torch.eye(3, device=points.device), -torch.eye(3, device=points.device)]) * eps
            sigma = self.density((points.unsqueeze(1) + offsets).reshape(-1, 3)).reshape(-1, 6)
            grad = (sigma[:, :3] - sigma[:, 3:]) / (2 * eps)
        return F.normalize(-grad, dim=-1)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups for per-group learning rates."""
        return {"encoding": list(self.encoding.parameters()), "density_mlp": list(self.density_mlp.parameters()),
                "albedo_mlp": list(self.albedo_mlp.parameters())}
