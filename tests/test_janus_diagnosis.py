"""The Janus diagnosis's measurements (issue 21): the density extent of an analytic field."""
import pytest
import torch

from perpneg3d.evaluation.layout import density_extent


class Ellipsoid(torch.nn.Module):
    """Density 10 inside the ellipsoid with semi-axes (0.5, 0.25, 0.3) centred at (0.1, 0, 0), 0 outside."""

    radius = 1.0

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([0.5, 0.25, 0.3]))

    def density(self, points):
        inside = (((points - torch.tensor([0.1, 0.0, 0.0])) / self.scale) ** 2).sum(-1) <= 1
        return inside.float() * 10


@pytest.mark.parametrize("resolution", [41, 81])
def test_density_extent_of_an_ellipsoid(resolution):
    extent = density_extent(Ellipsoid(), level=5.0, resolution=resolution)
    cell = 2.0 / (resolution - 1)
    # the occupied lattice points span the axis to within one cell at each end; the count adds one cell
    for axis, length in (("x", 1.0), ("y", 0.5), ("z", 0.6)):
        assert abs(extent[axis] - length) <= 2 * cell, (axis, extent[axis])
    assert density_extent(Ellipsoid(), level=20.0, resolution=resolution) == dict(x=0.0, y=0.0, z=0.0)
