"""Mesh export round trips: write every format, read it back with trimesh, check what Blender will see."""
import numpy as np
import pytest
import torch
import trimesh

from perpneg3d.export import MeshExporter
from perpneg3d.export.extraction import EmptyFieldError, auto_threshold

RED, GREY = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.5, 0.5, 0.5])


class SnoutedBlob(torch.nn.Module):
    """A closed asymmetric shape: an ellipsoid body (x in [-0.6, 0.6]) with a snout reaching x = 0.75
    at the front (+x, azimuth 0); front colour red, the rest grey. Height 0.8, depth 0.6, length 1.35."""

    radius = 1.0

    def density(self, p):
        body = (p[:, 0] / 0.6) ** 2 + (p[:, 1] / 0.3) ** 2 + (p[:, 2] / 0.4) ** 2
        snout = ((p - torch.tensor([0.6, 0.0, 0.1])).norm(dim=-1) / 0.15) ** 2
        return 50 * torch.sigmoid((1 - torch.minimum(body, snout)) * 20)

    def albedo(self, p):
        return torch.where((p[:, 0] > 0.45).unsqueeze(-1), RED, GREY).expand(len(p), 3)


def yup_to_blender(v):
    """Blender's glTF/OBJ importers: file (x, y, z) -> Blender (x, -z, y)."""
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)


def is_red(colors):
    c = np.asarray(colors)[:, :3].astype(float)
    return (c[:, 0] > 180) & (c[:, 1] < 80)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    paths = MeshExporter(formats=["glb", "obj", "ply"], resolution=64, height_m=1.0)(SnoutedBlob(), out)
    return out, paths


def check_blender_frame(verts_blender, colors, n_faces, mesh):
    assert mesh.is_watertight and len(mesh.faces) == n_faces
    lo, hi = verts_blender.min(0), verts_blender.max(0)
    assert abs(lo[2]) < 1e-6 and abs(hi[2] - 1.0) < 1e-6  # stands on z=0, 1 m tall
    assert abs(lo[0] + hi[0]) < 1e-6 and abs(lo[1] + hi[1]) < 1e-6  # centred on the z axis
    scale = 1.0 / 0.8
    assert abs((hi[1] - lo[1]) - 1.35 * scale) < 0.06  # object length runs along Blender's y
    assert abs((hi[0] - lo[0]) - 0.6 * scale) < 0.06
    red = is_red(colors)
    assert red.sum() > 10 and (~red).sum() > 100
    # the front (red) faces Blender's -Y: what numpad 1 (Front view, looking along +Y) shows
    assert verts_blender[red, 1].max() < verts_blender[~red, 1].mean()
    assert verts_blender[red, 1].mean() < lo[1] + 0.25 * (hi[1] - lo[1])


def test_glb_round_trip(exported):
    out, _ = exported
    mesh = trimesh.load(out / "mesh.glb", force="mesh", process=False)
    ref = trimesh.load(out / "mesh.ply", process=False)
    assert len(mesh.vertices) == len(ref.vertices) > 1000
    check_blender_frame(yup_to_blender(np.asarray(mesh.vertices)), mesh.visual.vertex_colors, len(ref.faces), mesh)


def test_obj_round_trip(exported):
    out, _ = exported
    mesh = trimesh.load(out / "mesh.obj", process=False)
    ref = trimesh.load(out / "mesh.ply", process=False)
    check_blender_frame(yup_to_blender(np.asarray(mesh.vertices)), mesh.visual.vertex_colors, len(ref.faces), mesh)


def test_ply_is_z_up_blender_frame(exported):
    out, _ = exported
    mesh = trimesh.load(out / "mesh.ply", process=False)
    check_blender_frame(np.asarray(mesh.vertices), mesh.visual.vertex_colors, len(mesh.faces), mesh)
    # outward normals: every vertex normal points away from the centroid on a convex-ish blob
    centre = np.asarray(mesh.vertices).mean(0)
    outward = ((np.asarray(mesh.vertex_normals) * (np.asarray(mesh.vertices) - centre)).sum(1) > 0).mean()
    assert outward > 0.95


def test_uv_texture_export(tmp_path):
    paths = MeshExporter(formats=["glb", "obj"], resolution=48, texture="uv", texture_size=256)(SnoutedBlob(), tmp_path)
    assert {p.name for p in paths} == {"mesh.glb", "mesh.obj"}
    assert (tmp_path / "mesh.mtl").exists() and list(tmp_path.glob("*.png"))
    mesh = trimesh.load(tmp_path / "mesh.glb", force="mesh", process=False)
    colors = mesh.visual.to_color().vertex_colors  # texture sampled at each vertex's uv
    welded = trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)  # uv seams split vertices; weld by position
    check_blender_frame(yup_to_blender(np.asarray(mesh.vertices)), colors, len(mesh.faces), welded)


def test_auto_threshold_is_the_surface_density():
    # a slab of density 10 inside |x| < 0.5: every axis ray crossing it turns 50% opaque inside it
    grid = torch.zeros(32, 32, 32)
    grid[8:24] = 10.0
    assert auto_threshold(grid, voxel_size=0.1) == pytest.approx(10.0)
    assert auto_threshold(torch.full((8, 8, 8), 0.01), voxel_size=0.1) is None


def test_empty_field_gives_a_clear_error(tmp_path):
    class Empty(SnoutedBlob):
        def density(self, p):
            return torch.zeros(len(p))

    with pytest.raises(EmptyFieldError, match=r"density ranges 0..0"):
        MeshExporter(resolution=16)(Empty(), tmp_path)
    with pytest.raises(EmptyFieldError, match=r"outside the density range .*try export.threshold="):
        MeshExporter(resolution=16, threshold=500)(SnoutedBlob(), tmp_path)
    assert not list(tmp_path.iterdir())  # no empty file written


def test_decimation_to_a_face_budget(tmp_path):
    full = MeshExporter(formats=["ply"], resolution=64)(SnoutedBlob(), tmp_path / "full")[0]
    small = MeshExporter(formats=["ply"], resolution=64, max_faces=800)(SnoutedBlob(), tmp_path / "small")[0]
    n_full, mesh = len(trimesh.load(full).faces), trimesh.load(small, process=False)
    assert n_full > 3000 and 400 <= len(mesh.faces) <= 800
    assert abs(mesh.bounds[1][2] - 1.0) < 1e-6  # still standing 1 m tall on z = 0
