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


def test_view_prompts_posterior_shows_inert_view_words_and_what_emphasis_does():
    """diagnose_janus.py parts=[views] on the toy preset's prior (docs/janus.md, section 3): as written, the three view
    prompts put nearly the same mass on front images (the view words barely move the posterior); at emphasis 8 the
    named view gains the plurality."""
    import importlib.util
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("diagnose_janus", root / "scripts" / "diagnose_janus.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    cfg = OmegaConf.create(dict(objects=["cat"], view_emphases=[1, 8], view_timesteps=[950], view_noise_draws=32,
                                overrides=["experiment=toy"]))
    shares = {k: v[950] for k, v in diag.views_part(cfg, root).items()}
    fronts = [shares[f"cat|{v}|1"][0] for v in ("front", "side", "back")]
    assert max(fronts) - min(fronts) < 0.1 and min(fronts) > 0.5
    side, back = shares["cat|side|8"], shares["cat|back|8"]
    assert side[1] == max(side) and side[1] > shares["cat|side|1"][1] + 0.2
    assert back[2] > shares["cat|back|1"][2] + 0.2
    assert all(abs(sum(s) - 1) < 1e-3 for s in shares.values())  # the prior puts all its mass on the cat
