"""The torch hash grid against a direct per-point reference, and the field's basic contracts."""
import math

import pytest
import torch

from perpneg3d.geometry import HashGridEncoding, ImplicitVolume, TorchHashGrid
from perpneg3d.geometry.hash_grid import PRIMES, level_layout


def reference_encoding(grid: TorchHashGrid, x: torch.Tensor, n_levels, log2_t, base, b) -> torch.Tensor:
    """Instant-NGP's definition, one point, one level, one corner at a time, in Python integers."""
    scales, res, sizes, dense, offsets = level_layout(n_levels, log2_t, base, b)
    table = grid.embeddings.detach()
    out = []
    for p in x.tolist():
        feats = []
        for lvl in range(n_levels):
            pos = [c * scales[lvl] + 0.5 for c in p]
            cell = [math.floor(c) for c in pos]
            frac = [c - f for c, f in zip(pos, cell)]
            acc = torch.zeros(table.shape[1])
            for dx in (0, 1):
                for dy in (0, 1):
                    for dz in (0, 1):
                        v = (cell[0] + dx, cell[1] + dy, cell[2] + dz)
                        if dense[lvl]:
                            idx = v[0] + v[1] * res[lvl] + v[2] * res[lvl] ** 2
                        else:
                            idx = (v[0] * PRIMES[0]) ^ (v[1] * PRIMES[1]) ^ (v[2] * PRIMES[2])
                        idx = idx % sizes[lvl] + offsets[lvl]
                        w = (frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1]) * (frac[2] if dz else 1 - frac[2])
                        acc += w * table[idx]
            feats.append(acc)
        out.append(torch.cat(feats))
    return torch.stack(out)


def test_torch_hash_grid_matches_reference():
    torch.manual_seed(0)
    args = (6, 2, 10, 4, 1.8)  # levels, features, log2 table, base resolution, per-level scale
    grid = TorchHashGrid(*args, init_scale=1.0)
    assert any(level_layout(6, 10, 4, 1.8)[3]) and not all(level_layout(6, 10, 4, 1.8)[3])  # dense and hashed levels
    x = torch.rand(7, 3)
    ref = reference_encoding(grid, x, 6, 10, 4, 1.8)
    assert torch.allclose(grid(x), ref, atol=1e-5)


def test_hash_grid_is_continuous_and_differentiable():
    torch.manual_seed(0)
    enc = HashGridEncoding(n_levels=8, log2_hashmap_size=12, base_resolution=8, finest_resolution=128, implementation="torch")
    x = torch.rand(64, 3) * 0.98 + 0.01
    a, b = enc(x), enc(x + 1e-5)
    assert (a - b).abs().max() < 1e-3
    enc(x).sum().backward()
    grads = enc.encoding.embeddings.grad
    assert grads is not None and (grads != 0).sum() > 0


def test_coarse_to_fine_masks_levels():
    field = ImplicitVolume(radius=1.0, n_levels=6, log2_hashmap_size=10, finest_resolution=64, implementation="torch",
                           start_level=2, start_step=10, update_steps=5)
    x = torch.rand(16, 3)
    assert int(field.encoding.active_levels) == 2
    feats = field.encoding(x)
    assert feats[:, 4:].abs().sum() == 0 and feats[:, :4].abs().sum() > 0
    field.update_step(20)
    assert int(field.encoding.active_levels) == 4
    field.update_step(10**6)
    assert int(field.encoding.active_levels) == 6


@pytest.mark.parametrize("normal_type", ["finite_difference", "analytic"])
def test_blob_density_and_outward_normals(normal_type):
    field = ImplicitVolume(radius=1.0, n_levels=4, log2_hashmap_size=10, finest_resolution=32, implementation="torch",
                           normal_type=normal_type, finite_difference_eps=1e-3)
    with torch.no_grad():  # zero the learned part: the density is the blob alone
        for p in field.density_mlp.parameters():
            p.zero_()
    centre, edge = field.density(torch.zeros(1, 3)), field.density(torch.tensor([[0.9, 0.0, 0.0]]))
    assert centre.item() > 5 and edge.item() < 0.1
    pts = torch.tensor([[0.3, 0.0, 0.0], [0.0, -0.3, 0.0], [0.0, 0.0, 0.3]])
    n = field.normals(pts)
    assert torch.allclose(n, pts / 0.3, atol=1e-2)  # -grad(density) points away from the blob centre
    density, albedo = field(pts)
    assert density.shape == (3,) and albedo.shape == (3, 3) and ((albedo >= 0) & (albedo <= 1)).all()


def test_tcnn_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from perpneg3d.errors import ConfigError

    with pytest.raises(ConfigError, match="implementation=tcnn needs CUDA and tinycudann"):
        HashGridEncoding(implementation="tcnn")
