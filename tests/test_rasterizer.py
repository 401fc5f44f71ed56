"""The torch rasterizer (issue 20, first part): coverage, depth and barycentrics against hand-computed values
for a triangle and a cube, perspective correction, and vertex gradients against finite differences."""
import itertools

import pytest
import torch

from perpneg3d.contracts import Rasterizer
from perpneg3d.renderer.torch_rasterizer import TorchRasterizer

R = TorchRasterizer(tile=4)
CENTRES = [(2 * i + 1) / 8 - 1 for i in range(8)]  # NDC pixel centres of an 8-pixel side


def clip_of(xyz, w=None):
    xyz = torch.tensor(xyz, dtype=torch.float64)
    w = torch.ones(len(xyz), dtype=torch.float64) if w is None else torch.tensor(w, dtype=torch.float64)
    return torch.cat([xyz * w.unsqueeze(-1), w.unsqueeze(-1)], -1).unsqueeze(0)


def test_it_is_a_rasterizer():
    assert isinstance(R, Rasterizer)


def test_triangle_coverage_depth_and_barycentrics_by_hand():
    """(-0.5,-0.5), (0.5,-0.5), (-0.5,0.5) at z = 0.5 on 8x8: the centres with x, y >= -0.5 and x + y <= 0,
    10 of them (the one on the hypotenuse included); at the centre (-0.375, -0.375) the barycentrics are
    (0.75, 0.125, 0.125)."""
    rast = R.rasterize(clip_of([[-0.5, -0.5, 0.5], [0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]]), torch.tensor([[0, 1, 2]]), (8, 8))
    expected = {(j, i) for i, x in enumerate(CENTRES) for j, y in enumerate(CENTRES) if x >= -0.5 and y >= -0.5 and x + y <= 0}
    covered = {tuple(p) for p in torch.nonzero(rast[0, ..., 3] > 0).tolist()}
    assert covered == expected and len(expected) == 10
    assert torch.allclose(rast[0, 2, 2], torch.tensor([0.75, 0.125, 0.5, 1.0], dtype=torch.float64))
    assert (rast[0, ..., 2][rast[0, ..., 3] > 0] == 0.5).all()
    assert (rast[0][rast[0, ..., 3] == 0] == 0).all()  # empty pixels are all zero, as in nvdiffrast


def test_perspective_correct_barycentrics():
    """With w = (1, 2, 4) the barycentrics at a pixel are the screen-space ones divided by w, renormalised."""
    xyz, w = [[-0.9, -0.9, 0.0], [0.9, -0.9, 0.0], [-0.9, 0.9, 0.0]], [1.0, 2.0, 4.0]
    rast = R.rasterize(clip_of(xyz, w), torch.tensor([[0, 1, 2]]), (8, 8))
    x, y = CENTRES[2], CENTRES[1]  # pixel (row 1, column 2)
    s1, s2 = (x + 0.9) / 1.8, (y + 0.9) / 1.8
    screen = torch.tensor([1 - s1 - s2, s1, s2], dtype=torch.float64)
    persp = screen / torch.tensor(w, dtype=torch.float64)
    persp = persp / persp.sum()
    assert torch.allclose(rast[0, 1, 2, :2], persp[:2])


def cube(half=0.5):
    corners = torch.tensor(list(itertools.product([-half, half], repeat=3)), dtype=torch.float64)
    quads = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    faces = torch.tensor([[q[0], q[1], q[2]] for q in quads] + [[q[0], q[2], q[3]] for q in quads])
    return corners, faces


def test_cube_shows_its_near_face_over_a_square():
    """A cube [-0.5, 0.5]^3 seen along +z (orthographic, w = 1): the 16 centres inside the square, each
    showing the near face z = -0.5 (the two triangles of quad [0, 2, 6, 4]); interpolated positions are
    the pixel centres on that face."""
    corners, faces = cube()
    rast = R.rasterize(clip_of(corners.tolist()), faces, (8, 8))
    covered = rast[0, ..., 3] > 0
    expected = torch.tensor([[abs(y) < 0.5 and abs(x) < 0.5 for x in CENTRES] for y in CENTRES])
    assert torch.equal(covered, expected)
    assert (rast[0, ..., 2][covered] == -0.5).all()
    near = {i for i, f in enumerate(faces.tolist()) if all(corners[v, 2] == -0.5 for v in f)}
    assert {int(t) - 1 for t in rast[0, ..., 3][covered]} <= near
    positions = R.interpolate(corners, rast, faces)[0]
    grid = torch.tensor([[[x, y, -0.5] for x in CENTRES] for y in CENTRES], dtype=torch.float64)
    assert torch.allclose(positions[covered], grid[covered])


def test_vertex_gradients_match_finite_differences():
    """d/d(clip) of a weighted sum of interpolated colours, over pixels whose coverage does not change under
    the small perturbation: autograd against central differences."""
    gen = torch.Generator().manual_seed(0)
    clip = clip_of([[-0.7, -0.6, 0.2], [0.8, -0.5, 0.4], [-0.4, 0.7, 0.1], [0.6, 0.6, 0.9]], [1.0, 1.3, 0.8, 1.6])
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    colours = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    weights = torch.rand(1, 16, 16, 3, generator=gen, dtype=torch.float64)

    def loss(c):
        return (R.interpolate(colours, R.rasterize(c, faces, (16, 16)), faces) * weights).sum()

    clip = clip.clone().requires_grad_(True)
    loss(clip).backward()
    eps = 1e-6
    numeric = torch.zeros_like(clip)
    for idx in itertools.product(range(1), range(4), range(4)):
        plus, minus = clip.detach().clone(), clip.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (loss(plus) - loss(minus)) / (2 * eps)
    assert torch.allclose(clip.grad, numeric, rtol=1e-5, atol=1e-7)
    assert clip.grad.abs().sum() > 0


def test_faces_behind_the_camera_and_outside_the_image_are_not_drawn():
    rast = R.rasterize(clip_of([[-0.5, -0.5, 0.5], [0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]], [1.0, -1.0, 1.0]),
                       torch.tensor([[0, 1, 2]]), (8, 8))
    assert (rast == 0).all()
    far_away = R.rasterize(clip_of([[3.0, 3.0, 0.5], [4.0, 3.0, 0.5], [3.0, 4.0, 0.5]]), torch.tensor([[0, 1, 2]]), (8, 8))
    assert (far_away == 0).all()


@pytest.mark.parametrize("tile", [1, 3, 8, 16])
def test_the_tile_size_changes_nothing(tile):
    corners, faces = cube(0.6)
    rotation = torch.linalg.matrix_exp(torch.tensor([[0, -0.4, 0.3], [0.4, 0, -0.5], [-0.3, 0.5, 0]], dtype=torch.float64))
    clip = clip_of((corners @ rotation.T).tolist())
    assert torch.equal(TorchRasterizer(tile=tile).rasterize(clip, faces, (13, 11)), R.rasterize(clip, faces, (13, 11)))


def flat_image(clip, faces, size=32):
    rast = R.rasterize(clip, faces, (size, size))
    ones = torch.ones(clip.shape[1], 1, dtype=torch.float64)
    return R.antialias(R.interpolate(ones, rast, faces), rast, clip, faces)


def finite_differences(fn, clip, eps=1e-6):
    """Central differences of fn with respect to every vertex's clip x and y."""
    numeric = torch.zeros_like(clip)
    for idx in itertools.product(*(range(n) for n in clip.shape[:2]), range(2)):
        plus, minus = clip.clone(), clip.clone()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (fn(plus) - fn(minus)) / (2 * eps)
    return numeric


@pytest.mark.parametrize("xyz", [[[-0.63, -0.57, 0.3], [0.71, -0.42, 0.3], [-0.38, 0.66, 0.3]],
                                 [[0.52, 0.61, 0.3], [-0.44, 0.27, 0.3], [0.13, -0.71, 0.3]]])
def test_antialias_gives_silhouette_gradients_and_area_coverage(xyz):
    """A flat white triangle on black: without antialiasing its image does not depend on where its vertices
    are (within a pixel); with it, the image's gradient matches finite differences, and the image's sum is the
    triangle's area in pixels (within 1%), where the raw coverage counts whole pixels."""
    clip = clip_of(xyz)
    faces = torch.tensor([[0, 1, 2]])
    weights = torch.rand(1, 32, 32, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(c):
        return (flat_image(c, faces) * weights).sum()

    c = clip.clone().requires_grad_(True)
    loss(c).backward()
    assert torch.allclose(c.grad[..., :2], finite_differences(loss, clip)[..., :2], rtol=1e-5, atol=1e-6)
    assert c.grad[0, :, :2].abs().min() > 1  # every vertex moves the silhouette
    pixels = (clip[0, :, :2] + 1) * 16
    area = abs(float((pixels[1] - pixels[0])[0] * (pixels[2] - pixels[0])[1]
                     - (pixels[1] - pixels[0])[1] * (pixels[2] - pixels[0])[0])) / 2
    assert flat_image(clip, faces).sum().item() == pytest.approx(area, rel=0.01)


def test_antialias_moves_an_occluding_edge_over_another_face():
    """A small near triangle over a large far one, in two colours: the near one's vertices get gradients that
    match finite differences through its edges over the far face."""
    clip = clip_of([[-0.9, -0.9, 0.8], [0.9, -0.9, 0.8], [0.0, 0.9, 0.8],
                    [-0.31, -0.27, 0.1], [0.36, -0.22, 0.1], [0.04, 0.41, 0.1]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    colours = torch.tensor([[0.2], [0.2], [0.2], [0.9], [0.9], [0.9]], dtype=torch.float64)

    def loss(c):
        rast = R.rasterize(c, faces, (24, 24))
        return R.antialias(R.interpolate(colours, rast, faces), rast, c, faces).sum()

    c = clip.clone().requires_grad_(True)
    loss(c).backward()
    assert torch.allclose(c.grad[..., :2], finite_differences(loss, clip)[..., :2], rtol=1e-5, atol=1e-6)
    assert c.grad[0, 3:, :2].abs().min() > 0.05  # every coordinate of the near face moves an edge over the far one


def test_nvdiffrast_receives_float32_colours_and_clip_and_int32_faces():
    """nvdiffrast's kernels take float32 attributes, colours and positions and int32 triangles only; the adapter
    converts whatever the shading's dtype is (half under autocast) before each call. nvdiffrast itself needs
    CUDA, so a recorder stands in for its module here (its parity with the torch rasterizer is gpu_check's)."""
    from perpneg3d.renderer.nvdiffrast_rasterizer import NvdiffrastRasterizer

    calls = []

    class Recorder:
        def RasterizeCudaContext(self, device):  # noqa: N802  (nvdiffrast's name)
            return "context"

        def rasterize(self, context, clip, faces, resolution):
            calls.append(("rasterize", clip.dtype, faces.dtype))
            return clip.new_zeros(1, *resolution, 4), None

        def interpolate(self, attributes, rast, faces):
            calls.append(("interpolate", attributes.dtype, faces.dtype))
            return attributes, None

        def antialias(self, color, rast, clip, faces):
            calls.append(("antialias", color.dtype, clip.dtype, faces.dtype, color.is_contiguous()))
            return color

    rasterizer = NvdiffrastRasterizer(Recorder(), torch.device("cpu"))
    clip, faces = torch.rand(1, 3, 4, dtype=torch.float16), torch.tensor([[0, 1, 2]])
    rast = rasterizer.rasterize(clip, faces, (4, 4))
    rasterizer.interpolate(torch.rand(3, 3, dtype=torch.float16), rast, faces)
    colour = torch.rand(1, 4, 4, 3, dtype=torch.float16).transpose(1, 2)  # half and not contiguous
    assert rasterizer.antialias(colour, rast, clip, faces).dtype == torch.float32
    assert calls == [("rasterize", torch.float32, torch.int32), ("interpolate", torch.float32, torch.int32),
                     ("antialias", torch.float32, torch.float32, torch.int32, True)]
