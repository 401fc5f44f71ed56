"""DMTet's foundations (issue 20, first part): the tetrahedral grid and marching tetrahedra, checked against
geometry: volumes, shared faces, the box's surface, an analytic sphere's area and volume, and gradients."""
import math

import pytest
import torch

from perpneg3d.geometry.marching_tets import marching_tets, mesh_area_volume
from perpneg3d.geometry.tet_grid import build_tet_grid, cached_tet_grid, tet_volumes


def faces_of(tets):
    """Every tet's 4 faces as sorted vertex triples [4T,3]."""
    local = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    return tets[:, local].reshape(-1, 3).sort(-1).values


@pytest.mark.parametrize("resolution, radius", [(3, 1.0), (8, 0.7)])
def test_tet_grid_is_a_conforming_positive_cover_of_the_box(resolution, radius):
    grid = build_tet_grid(resolution, radius)
    assert grid.tets.shape == (6 * resolution ** 3, 4) and grid.vertices.shape == ((resolution + 1) ** 3, 3)
    volumes = tet_volumes(grid.vertices.double(), grid.tets)
    assert (volumes > 0).all()  # every tet positively oriented, none degenerate
    assert volumes.sum().item() == pytest.approx((2 * radius) ** 3, rel=1e-6)  # they fill the box (no overlap: all > 0)
    unique, counts = torch.unique(faces_of(grid.tets), dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}  # a face is shared by two tets inside, owned by one on the boundary
    boundary = grid.vertices.double()[unique[counts == 1]]  # [Fb,3,3]
    on_a_side = ((boundary.abs() - radius).abs() < 1e-6).all(1).any(-1)  # all 3 vertices on one box face
    assert on_a_side.all()
    area = torch.linalg.cross(boundary[:, 1] - boundary[:, 0], boundary[:, 2] - boundary[:, 0]).norm(dim=-1).sum() / 2
    assert area.item() == pytest.approx(6 * (2 * radius) ** 2, rel=1e-6)
    # each cube's 6 tets share its main diagonal, so an inner face is cut along the same diagonal from both sides
    assert (counts == 1).sum().item() == 6 * 2 * resolution ** 2


def test_tet_grid_cache_round_trip(tmp_path):
    built = cached_tet_grid(4, 0.5, cache_dir=tmp_path)
    assert (tmp_path / "tets" / "grid_4.pt").is_file()
    loaded = cached_tet_grid(4, 0.5, cache_dir=tmp_path)
    fresh = build_tet_grid(4, 0.5)
    assert torch.equal(loaded.tets, fresh.tets) and torch.allclose(loaded.vertices, fresh.vertices)
    assert torch.equal(built.tets, loaded.tets)


def edge_uses(faces):
    """How often each directed and each undirected edge of a triangle mesh is used."""
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    undirected = directed.sort(-1).values
    return (torch.unique(directed, dim=0, return_counts=True)[1], torch.unique(undirected, dim=0, return_counts=True)[1])


def test_marching_tets_sphere_is_closed_manifold_with_the_right_area_and_volume():
    grid = build_tet_grid(128, 1.0)
    r = 0.6
    vertices, faces = marching_tets(grid.vertices, grid.tets, grid.vertices.norm(dim=-1) - r)
    directed, undirected = edge_uses(faces)
    assert (undirected == 2).all()  # closed: every edge borders exactly two faces
    assert (directed == 1).all()  # consistently oriented: neighbours traverse their edge in opposite directions
    assert vertices.shape[0] - undirected.numel() + faces.shape[0] == 2  # Euler characteristic of a sphere
    area, volume = mesh_area_volume(vertices.double(), faces)
    assert area.item() == pytest.approx(4 * math.pi * r ** 2, rel=0.02)
    assert volume.item() == pytest.approx(4 / 3 * math.pi * r ** 3, rel=0.02)  # positive: normals point outward


def test_marching_tets_gradients_move_the_surface():
    """A plane's signed distance x - 0.1 + c is linear along every edge, so each surface vertex sits at
    x = 0.1 - c exactly: d(sum of x)/dc = -(number of vertices). Translating every grid vertex by d along y
    translates every surface vertex by d: d(sum of y)/dd = number of vertices."""
    grid = build_tet_grid(24, 1.0)
    base = grid.vertices.double()
    shift = torch.zeros((), dtype=torch.float64, requires_grad=True)
    plane, _ = marching_tets(base, grid.tets, base[:, 0] - 0.1 + shift)
    assert torch.allclose(plane[:, 0], torch.full((plane.shape[0],), 0.1, dtype=torch.float64))
    plane[:, 0].sum().backward()
    assert shift.grad.item() == pytest.approx(-plane.shape[0], rel=1e-9)

    move = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    mesh, _ = marching_tets(base + move, grid.tets, base.norm(dim=-1) - 0.5)
    mesh[:, 1].sum().backward()
    assert move.grad.tolist() == pytest.approx([0.0, mesh.shape[0], 0.0], abs=1e-6)


def test_marching_tets_on_a_single_tet_by_hand():
    """One tet, vertex 0 inside (s = -1), the others outside (s = 1, 1, 3): the triangle's vertices are the
    edge midpoints toward 1 and 2 and the point a quarter of the way toward 3, and its normal points away
    from vertex 0."""
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    points, faces = marching_tets(vertices, torch.tensor([[0, 1, 2, 3]]), torch.tensor([-1.0, 1.0, 1.0, 3.0]))
    assert faces.shape == (1, 3)
    got = sorted(points[faces[0]].tolist())
    assert got == sorted([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.25]])
    tri = points[faces[0]]
    normal = torch.linalg.cross(tri[1] - tri[0], tri[2] - tri[0])
    assert (normal * (tri.mean(0) - vertices[0])).sum() > 0
    none = marching_tets(vertices, torch.tensor([[0, 1, 2, 3]]), torch.ones(4))
    assert none[0].shape == (0, 3) and none[1].shape == (0, 3)


def tetrahedron():
    """A regular tetrahedron centred at the origin, outward faces."""
    v = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    return v, torch.tensor([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])


def test_regularisers_by_hand_on_a_regular_tetrahedron():
    """Vertex normals of a regular tetrahedron point from its centre: two of them meet at arccos(-1/3), so
    every edge has 1 - cos = 4/3. A vertex's neighbours' mean is -v/3, so |v - mean| = 4/3 |v| = 4/3 sqrt(3)."""
    from perpneg3d.geometry.dmtet import laplacian_smoothness, normal_consistency

    v, f = tetrahedron()
    area, volume = mesh_area_volume(v, f)
    assert volume.item() == pytest.approx(8 / 3)  # outward: the faces are oriented as a mesh should be
    assert normal_consistency(v, f).item() == pytest.approx(4 / 3)
    assert laplacian_smoothness(v, f).item() == pytest.approx(4 / 3 * math.sqrt(3))
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float64)
    square = torch.tensor([[0, 1, 2], [1, 3, 2]])
    assert normal_consistency(flat, square).item() == pytest.approx(0.0, abs=1e-12)


def dmtet(resolution=32, **kw):
    from perpneg3d.geometry import ImplicitVolume
    from perpneg3d.geometry.dmtet import DMTetGeometry

    colour = ImplicitVolume(radius=1.0, n_levels=2, log2_hashmap_size=8, finest_resolution=32, implementation="torch")
    return DMTetGeometry(colour, radius=1.0, grid_resolution=resolution, **kw)


def test_dmtet_starts_as_a_sphere_and_its_offsets_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("PERPNEG3D_CACHE", str(tmp_path))
    geometry = dmtet(init_radius=0.5)
    vertices, faces = geometry.mesh()
    area, volume = mesh_area_volume(vertices.double(), faces)
    assert area.item() == pytest.approx(4 * math.pi * 0.25, rel=0.02) and volume.item() == pytest.approx(
        4 / 3 * math.pi * 0.125, rel=0.03)
    with torch.no_grad():
        geometry.deform.fill_(100.0)  # saturated: every vertex moves deform_scale cells along each axis
    moved = geometry.vertices() - geometry.grid_vertices
    assert torch.allclose(moved, torch.full_like(moved, 0.25 * 2 / 32))
    assert set(geometry.param_groups()) == {"sdf", "deform", "color_encoding", "color_density_mlp", "color_albedo_mlp"}


def test_dmtet_takes_a_coarse_runs_surface_and_colour(tmp_path, monkeypatch):
    """initialise_from: the surface is the volume's level set at the threshold (a density 10 (1 - |x| / 0.6)
    above 4 is a ball of radius 0.36), and the colour field is the volume's own state."""
    from perpneg3d.geometry import ImplicitVolume

    monkeypatch.setenv("PERPNEG3D_CACHE", str(tmp_path))

    class Coarse(ImplicitVolume):
        def density(self, points):
            return 10 * (1 - points.norm(dim=-1) / 0.6)

    coarse = Coarse(radius=1.0, n_levels=2, log2_hashmap_size=8, finest_resolution=32, implementation="torch")
    with torch.no_grad():
        for p in coarse.parameters():
            p.add_(0.5)
    from perpneg3d.geometry.dmtet import DMTetGeometry

    fresh = Coarse(radius=1.0, n_levels=2, log2_hashmap_size=8, finest_resolution=32, implementation="torch")
    geometry = DMTetGeometry(fresh, radius=1.0, grid_resolution=48)  # a colour field of the source's kind
    points = torch.rand(16, 3) - 0.5
    assert not torch.equal(geometry.albedo(points), coarse.albedo(points))
    geometry.initialise_from(coarse, threshold=4.0)
    vertices, faces = geometry.mesh()
    assert vertices.norm(dim=-1).mean().item() == pytest.approx(0.36, rel=0.01)
    assert torch.equal(geometry.albedo(points), coarse.albedo(points))
    # the signed distance is clamped to [-1, 1] (the density ranges over [-6.7, 10] here, sdf over [-6, 10.7])
    raw = 4.0 - coarse.density(geometry.grid_vertices)
    assert raw.min() < -5 and raw.max() > 10
    assert torch.equal(geometry.sdf.detach(), raw.clamp(-1, 1))


class Ball:
    """A coarse field whose density 10 (1 - |x| / 0.6) is above 4 inside the ball of radius 0.36."""

    def density(self, points):
        return 10 * (1 - points.norm(dim=-1) / 0.6)


def test_the_grid_is_fitted_to_the_source_surface_with_a_margin(tmp_path, monkeypatch):
    """fit_grid by hand: the 64-cell probe lattice over [-1, 1] (spacing 1/32) has its outermost points above
    level 4 at 11/32 = 0.34375; one probe cell more is 0.375, and 10 % of the extent 0.75 on each side gives the
    box [-0.45, 0.45]^3. The same 48 cells then land on the ball: its surface is kept (radius 0.36) with about
    (2 / 0.9)^2 = 4.9 times the faces."""
    monkeypatch.setenv("PERPNEG3D_CACHE", str(tmp_path))
    whole, fitted = dmtet(48), dmtet(48)
    fitted.fit_grid(Ball(), 4.0)
    assert torch.allclose(fitted.bbox, torch.tensor([[-0.45] * 3, [0.45] * 3]), atol=1e-6)
    assert fitted.grid_vertices.abs().max().item() == pytest.approx(0.45, abs=1e-6)
    for geometry in (whole, fitted):
        geometry.initialise_from(Ball(), 4.0)
    (v_whole, f_whole), (v_fit, f_fit) = whole.mesh(), fitted.mesh()
    assert v_fit.norm(dim=-1).mean().item() == pytest.approx(0.36, rel=0.005)
    assert 4.0 < len(f_fit) / len(f_whole) < 6.0
    with torch.no_grad():
        fitted.deform.fill_(100.0)  # the offsets are bounded by the fitted cells: 0.25 * 0.9 / 48
    assert torch.allclose(fitted.vertices() - fitted.grid_vertices, torch.full((1, 3), 0.25 * 0.9 / 48), atol=1e-6)
    # nothing above the level, or fit_margin null: the whole box
    empty, off = dmtet(48), dmtet(48, fit_margin=None)
    empty.fit_grid(Ball(), 20.0)
    off.fit_grid(Ball(), 4.0)
    assert torch.equal(empty.bbox, whole.bbox) and torch.equal(off.bbox, whole.bbox)
    assert torch.equal(whole.bbox, torch.tensor([[-1.0] * 3, [1.0] * 3]))


def test_the_fitted_box_is_saved_and_an_older_state_loads_as_the_whole_box(tmp_path, monkeypatch):
    monkeypatch.setenv("PERPNEG3D_CACHE", str(tmp_path))
    fitted = dmtet(16)
    fitted.fit_grid(Ball(), 4.0)
    loaded = dmtet(16)
    loaded.load_state_dict(fitted.state_dict())
    assert torch.equal(loaded.grid_vertices, fitted.grid_vertices)
    older = {k: v for k, v in fitted.state_dict().items() if k != "bbox"}  # a checkpoint made before the fit
    loaded.load_state_dict(older)
    assert torch.equal(loaded.bbox, torch.tensor([[-1.0] * 3, [1.0] * 3]))


def test_the_colour_field_keeps_the_source_s_levels_through_the_refine_steps(tmp_path, monkeypatch):
    """A source whose coarse-to-fine band had opened all 8 levels: after initialise_from and the stage's
    update_step calls from step 0 on, all 8 stay active and the albedo is the source's (the stage has no band;
    restarting the source's band switched levels 5-8 off again)."""
    from perpneg3d.geometry import ImplicitVolume
    from perpneg3d.geometry.dmtet import DMTetGeometry

    monkeypatch.setenv("PERPNEG3D_CACHE", str(tmp_path))
    kw = dict(radius=1.0, n_levels=8, log2_hashmap_size=10, finest_resolution=128, implementation="torch",
              start_level=4, start_step=0, update_steps=1)
    torch.manual_seed(0)
    source = ImplicitVolume(**kw)
    with torch.no_grad():
        source.encoding.encoding.embeddings.uniform_(-1, 1)
    source.update_step(10)  # the band is open: 4 + 10 levels, capped at 8
    geometry = DMTetGeometry(ImplicitVolume(**kw), radius=1.0, grid_resolution=16)
    assert int(geometry.color_field.encoding.active_levels) == 4
    geometry.initialise_from(source, 4.0, torch.zeros(len(geometry.unit_vertices)))
    points = torch.rand(256, 3) * 2 - 1
    expected = source.albedo(points)
    for step in (0, 1, 2, 500):
        geometry.update_step(step)
        assert int(geometry.color_field.encoding.active_levels) == 8
        assert torch.equal(geometry.albedo(points), expected)
    source.update_step(0)  # the difference the band would make: the source itself with 4 levels
    assert (source.albedo(points) - expected).abs().mean() > 0.01


def test_mesh_quality_counts_by_hand():
    import trimesh

    from perpneg3d.evaluation.mesh_quality import mesh_quality

    cube = mesh_quality(trimesh.creation.box())
    # 12 triangles, 18 edges: 6 face diagonals between coplanar triangles (0 deg), 12 cube edges (90 deg)
    assert cube == dict(components=1, non_manifold_edges=0, watertight=True, faces=12,
                        mean_normal_angle_deg=pytest.approx(12 * 90 / 18))
    two = trimesh.util.concatenate([trimesh.creation.box(), trimesh.creation.box().apply_translation([3, 0, 0])])
    assert mesh_quality(two)["components"] == 2
    fan = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], [[0, 1, 2], [1, 0, 3], [0, 1, 4]],
                          process=False)
    quality = mesh_quality(fan)  # edge 0-1 is used by three faces; the other 6 edges by one (open borders)
    assert quality["non_manifold_edges"] == 7 and not quality["watertight"]
