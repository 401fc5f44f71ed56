"""Mesh export round trips: write every format, read it back with trimesh, check what Blender will see."""
import numpy as np
import pytest
import torch
import trimesh

from perpneg3d.errors import ConfigError
from perpneg3d.export import MeshExporter
from perpneg3d.export.extraction import EmptyFieldError, auto_threshold
from perpneg3d.export.mesh import check_memory, estimate_peak_bytes
from perpneg3d.export.texture import bake_texture, face_chunks, place_unplaced, unwrap

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


def test_face_chunks_respect_the_texel_budget():
    # texel boxes of 1, 4, 9 and 4 texels (size 8): budget 5 -> [0,2) (5), [2,3) (9, alone), [3,4) (4)
    size = 8
    corner = lambda x, y, w: [[(x + 0.5) / size, (y + 0.5) / size], [(x + w - 0.5) / size, (y + 0.5) / size],
                              [(x + 0.5) / size, (y + w - 0.5) / size]]
    uv = torch.tensor([corner(0, 0, 1), corner(2, 2, 2), corner(0, 4, 3), corner(5, 0, 2)]).reshape(-1, 2)
    faces = torch.arange(12).reshape(4, 3)
    assert face_chunks(uv, faces, size, texel_budget=5) == [(0, 2), (2, 3), (3, 4)]
    assert face_chunks(uv, faces, size, texel_budget=100) == [(0, 4)]


def test_chunked_bake_equals_one_pass():
    verts, faces = trimesh.creation.icosphere(subdivisions=2).vertices, trimesh.creation.icosphere(subdivisions=2).faces
    vmap, new_faces, uvs = unwrap(np.asarray(verts), np.asarray(faces), 128)
    colour = lambda p: (p + 1) / 2  # position as colour: every texel's 3D point shows in the texture
    one = bake_texture(np.asarray(verts)[vmap], new_faces, uvs, colour, 128, texel_budget=1 << 30)
    many = bake_texture(np.asarray(verts)[vmap], new_faces, uvs, colour, 128, texel_budget=64)
    assert len(face_chunks(torch.from_numpy(uvs), torch.from_numpy(new_faces), 128, 64)) > 20
    np.testing.assert_array_equal(one, many)
    assert (one.reshape(-1, 3).std(0) > 20).all()  # a real bake, not a flat fill


def test_unplaced_slivers_become_points_in_uv():
    # two placed faces and one sliver xatlas left at uv (0,0), nearest (by its centre) to vertex 2
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0.1, 1.0, 0], [0.05, 1.05, 0]], float)
    vmapping = np.arange(6)
    indices = np.array([[0, 1, 2], [1, 3, 2], [2, 4, 5]])
    uvs = np.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.9], [0, 0], [0, 0]], np.float32)
    uvs_sliver = uvs.copy()
    uvs_sliver[2] = [0.1, 0.9]  # vertex 2 is shared: only faces whose three uvs are (0,0) count as unplaced
    vm, idx, uv = place_unplaced(vertices, vmapping, indices, uvs_sliver)
    np.testing.assert_array_equal(idx, indices)  # nothing unplaced: unchanged
    uvs[2] = [0, 0]
    vertices[2] = [0.0, 0.9, 0.0]  # alone, vertex 2 is nearest vertex 0: per-vertex placement would stretch the face
    indices = np.array([[0, 1, 3], [4, 5, 2]])  # face 1 is all (0,0): vertices 4, 5, 2
    vm, idx, uv = place_unplaced(vertices, vmapping, indices, uvs)
    np.testing.assert_array_equal(idx, [[0, 1, 3], [6, 7, 8]])
    np.testing.assert_array_equal(vm[6:], [4, 5, 2])  # new vertices keep their 3D source
    np.testing.assert_array_equal(uv[6:], uvs[[3, 3, 3]])  # centre (0.05, 0.98) is nearest vertex 3 of the placed 0, 1, 3


def test_memory_estimate_refuses_with_a_setting_that_fits():
    need_512 = estimate_peak_bytes(512, "uv", 1024)
    assert need_512 == (1 << 30) + 28 * 513 ** 3 + 1024 ** 2 * 48 + (1 << 22) * 100
    check_memory(512, "uv", 1024, available=need_512 - (1 << 30))  # exactly what the export adds: no error
    with pytest.raises(ConfigError, match=r"^export.resolution=512 with texture=uv texture_size=1024 needs about 4.0 GB "
                                          r"more memory and 3.0 GB is free: use export.resolution=384 \(about 1.9 GB\)$"):
        check_memory(512, "uv", 1024, available=3 << 30)
    with pytest.raises(ConfigError, match="free memory or export on a larger machine"):
        check_memory(512, "uv", 1024, available=1 << 20)


def test_memory_estimate_against_a_measured_export(tmp_path):
    """What the estimate says an export adds to its process (estimate - BASE_BYTES), against the peak
    RSS an export of a 256^3 grid really adds, measured in a fresh process: it must not be below the
    measurement (the check would let a too-large export start) nor far above it (it would refuse
    exports that fit)."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import subprocess_env
    from perpneg3d.export.mesh import BASE_BYTES

    # the process's RSS polled during the export, against its RSS just before (ru_maxrss would count an
    # import-time peak as the baseline)
    code = ("import sys, threading, time, psutil; from pathlib import Path; from test_export import SnoutedBlob; "
            "from perpneg3d.export import MeshExporter; me = psutil.Process(); peak = [0]; done = [False]\n"
            "def poll():\n    while not done[0]:\n        peak[0] = max(peak[0], me.memory_info().rss); time.sleep(0.005)\n"
            "before = me.memory_info().rss; t = threading.Thread(target=poll); t.start()\n"
            "MeshExporter(formats=['ply'], resolution=256)(SnoutedBlob(), Path(sys.argv[1])); done[0] = True; t.join()\n"
            "print(before // 1024, peak[0] // 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parent, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before_kb, peak_kb = map(int, done.stdout.split()[-2:])
    added = (peak_kb - before_kb) * 1024
    estimated = estimate_peak_bytes(256, "vertex") - BASE_BYTES
    assert added <= estimated <= 1.5 * added, (added / 2**20, estimated / 2**20)


def test_uv_export_decimates_to_uv_max_faces(tmp_path):
    full = MeshExporter(formats=["ply"], resolution=48)(SnoutedBlob(), tmp_path / "full")
    n_full = len(trimesh.load(full[0], process=False).faces)
    paths = MeshExporter(formats=["obj"], resolution=48, texture="uv", texture_size=128, uv_max_faces=1000)(
        SnoutedBlob(), tmp_path / "uv")
    assert n_full > 3000
    assert 900 <= len(trimesh.load(paths[0], force="mesh", process=False).faces) <= 1000
