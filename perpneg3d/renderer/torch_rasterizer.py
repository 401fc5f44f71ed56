"""A vectorised triangle rasterizer in pure torch (CPU, and CUDA's fallback), in nvdiffrast's conventions.

Faces are binned into square tiles of pixels by their screen bounding boxes; every (tile, face) pair tests
the tile's pixel centres with the face's edge functions; a depth test (smallest z/w, then the smallest face
id) picks each pixel's face. Barycentrics are then recomputed for the chosen (pixel, face) pairs only, with
autograd, and made perspective-correct: b_i = (e_i / w_i) / sum_k (e_k / w_k) with e the screen-space ones.
Coverage and the depth test are not differentiable (as in any rasterizer); gradients reach vertex
positions through the barycentrics and the interpolated depth. Faces with a vertex behind the camera
(w <= 0) are not drawn (no clipping).
"""
from __future__ import annotations

import torch
from torch import Tensor

from perpneg3d.validation import PositiveInt, validated


WALK_STEPS = 64  # at most this many faces crossed between two pixel centres (foreshortened ones near a rim)


class TorchRasterizer:
    """rasterize() and interpolate() of the Rasterizer Protocol; `tile` pixels per tile side."""

    @validated("renderer.rasterizer")
    def __init__(self, tile: PositiveInt = 8):
        self.tile = tile

    def rasterize(self, clip: Tensor, faces: Tensor, resolution: tuple[int, int]) -> Tensor:
        height, width = resolution
        batch = clip.shape[0]
        out = clip.new_zeros(batch, height * width, 4)
        for b in range(batch):  # the images of a batch are independent; each is vectorised over faces and pixels
            pixel, face = self._visible(clip[b].detach(), faces, height, width)
            if pixel.numel():
                bary, depth = self._barycentrics(clip[b], faces[face], pixel, height, width)
                values = torch.cat([bary[:, :2], depth.unsqueeze(-1), (face + 1).to(clip.dtype).unsqueeze(-1)], -1)
                out[b] = out[b].index_put((pixel,), values)
        return out.view(batch, height, width, 4)

    def interpolate(self, attributes: Tensor, rast: Tensor, faces: Tensor) -> Tensor:
        batch, height, width, _ = rast.shape
        if attributes.dim() == 2:
            attributes = attributes.unsqueeze(0).expand(batch, -1, -1)
        face = rast[..., 3].long() - 1  # [B,H,W], -1 where empty
        covered = (face >= 0).unsqueeze(-1)
        corners = faces[face.clamp_min(0)]  # [B,H,W,3]
        u, v = rast[..., :1], rast[..., 1:2]
        weights = torch.cat([u, v, 1 - u - v], -1)  # [B,H,W,3]
        gathered = torch.stack([torch.gather(attributes, 1, corners[..., k].view(batch, -1, 1).expand(
            -1, -1, attributes.shape[-1])).view(batch, height, width, -1) for k in range(3)], -2)  # [B,H,W,3,C]
        return ((weights.unsqueeze(-1) * gathered).sum(-2)) * covered

    def antialias(self, color: Tensor, rast: Tensor, clip: Tensor, faces: Tensor) -> Tensor:
        """Blend across triangle boundaries so that gradients reach vertex positions through silhouettes.

        For each pair of horizontally or vertically adjacent pixels that show different faces (or a face and
        the background), the face in front is followed from its pixel centre towards the other: where its edge
        crosses that segment, at t in [0, 1] (0 at its own centre, 1 at the other), it covers its own pixel up to
        t and the other one beyond 0.5. The uncovered (t < 0.5) or covered (t > 0.5) share |t - 0.5| of a pixel
        moves that pixel's colour towards the other's; the x and y passes are averaged. t depends on the vertex positions, so the image does too
        (nvdiffrast's antialias does the same job with its own edge analysis). Only silhouette edges count (no
        face beyond, or one facing away): an edge between two faces of one visible surface is no boundary."""
        batch, height, width, channels = color.shape
        neighbour = edge_neighbours(faces)
        xy, z = self._screen(clip.reshape(-1, 4), height, width)
        xy, z = xy.view(batch, -1, 2), z.view(batch, -1)  # [B,V,2], [B,V]
        facing = torch.sign(_signed_area2(xy[:, faces].detach()))  # [B,F]
        # a silhouette edge: no face beyond it, or the one beyond faces the other way (front vs back; a
        # degenerate face, of zero screen area, decides nothing)
        beyond = torch.gather(facing, 1, neighbour.clamp_min(0).view(1, -1).expand(batch, -1)).view(batch, -1, 3)
        silhouette = (neighbour < 0) | (beyond * facing.unsqueeze(-1) < 0)  # [B,F,3]
        face = (rast[..., 3].long() - 1).reshape(-1)  # [B*H*W]
        flat = color.reshape(-1, channels)
        pixel = torch.arange(face.numel(), device=face.device)
        col, row = pixel % width, (pixel // width) % height
        # pairs along x (columns) and along y (rows), both from the unblended colours, averaged: either pass
        # alone moves a pixel's coverage by the whole of an edge's displacement (an edge at angle a crosses
        # |cos a| x-pairs per unit length, each moved by 1/|cos a|), so their sum would count it twice
        pairs = torch.cat([torch.stack([pixel[col < width - 1], pixel[col < width - 1] + 1], -1),
                           torch.stack([pixel[row < height - 1], pixel[row < height - 1] + width], -1)])
        pairs = pairs[face[pairs[:, 0]] != face[pairs[:, 1]]]  # [P,2] neighbours that show different faces
        image = pairs[:, 0] // (height * width)
        centre = torch.stack([col[pairs] + 0.5, row[pairs] + 0.5], -1).to(xy.dtype)  # [P,2,2]
        f_a, f_b = face[pairs[:, 0]], face[pairs[:, 1]]
        # one walk per direction: from a's centre towards b's, and from b's towards a's
        t = self._crossings(torch.cat([f_a, f_b]), torch.cat([image, image]), torch.cat([centre[:, 0], centre[:, 1]]),
                            torch.cat([centre[:, 1], centre[:, 0]]), xy, faces, silhouette, neighbour)
        t_a, t_b = t[:len(pairs)], t[len(pairs):]
        # the face in front at the crossing: a's if only a's leaves towards b, else the nearer of the two
        c_a, c_b = centre[:, 0], centre[:, 1]
        z_a = _depth_at(xy, z, image, faces, f_a, c_a + (c_b - c_a) * t_a.clamp(0, 1).unsqueeze(-1))
        z_b = _depth_at(xy, z, image, faces, f_b, c_b + (c_a - c_b) * t_b.clamp(0, 1).unsqueeze(-1))
        a_front = torch.isfinite(t_a) & (~torch.isfinite(t_b) | (f_b < 0) | ((f_a >= 0) & (z_a <= z_b)))
        b_front = torch.isfinite(t_b) & ~a_front
        col_a, col_b = flat[pairs[:, 0]], flat[pairs[:, 1]]
        share_a = (t_a - 0.5).where(a_front, torch.zeros_like(t_a)).unsqueeze(-1)  # a's face reaching into b (> 0)
        share_b = (t_b - 0.5).where(b_front, torch.zeros_like(t_b)).unsqueeze(-1)
        # a in front: beyond 0.5 it covers part of b (b moves towards a); short of 0.5 it leaves part of a to b
        to_b = share_a.clamp_min(0) * (col_a - col_b) + (-share_b).clamp_min(0) * (col_a - col_b)
        to_a = (-share_a).clamp_min(0) * (col_b - col_a) + share_b.clamp_min(0) * (col_b - col_a)
        delta = torch.zeros_like(flat).index_add(0, pairs[:, 1], to_b).index_add(0, pairs[:, 0], to_a)
        return (flat + 0.5 * delta).view(batch, height, width, channels)

    @staticmethod
    def _crossings(f_own: Tensor, image: Tensor, c_own: Tensor, c_other: Tensor, xy: Tensor, faces: Tensor,
                   silhouette: Tensor, neighbour: Tensor) -> Tensor:
        """t [N] where the surface of face f_own (in image `image`) ends on the way from c_own to c_other (inf: it
        does not end before c_other, or f_own is empty): leave the face where the segment does; an inner edge
        hands the walk to the face beyond it (small faces end between pixel centres long before the surface
        does). All walks advance together; the ones still open are gathered each round."""
        t = torch.full(f_own.shape, float("inf"), dtype=xy.dtype, device=xy.device)
        walk = torch.nonzero(f_own >= 0).squeeze(-1)
        current = f_own[walk]
        for _ in range(WALK_STEPS):
            if walk.numel() == 0:  # every walk has ended (a host read: this is the CPU rasterizer)
                break
            img = image[walk]
            tri = xy[img.unsqueeze(-1), faces[current]]  # [n,3,2]
            sign = torch.sign(_signed_area2(tri)).unsqueeze(-1)
            e_own, e_other = _edge_functions(tri, c_own[walk]) * sign, _edge_functions(tri, c_other[walk]) * sign
            falling = e_other < e_own  # edges the segment leaves through (their function decreases along it)
            t_edge = (e_own / (e_own - e_other).where(falling, torch.ones_like(e_own))).where(
                falling, torch.full_like(e_own, float("inf")))
            t_exit, edge = t_edge.min(-1)
            reaches = t_exit > 1  # the face reaches the other centre: no boundary on this segment
            at_silhouette = silhouette[img, current, edge]
            found = ~reaches & at_silhouette
            t = t.index_put((walk[found],), t_exit[found])
            going = ~reaches & ~at_silhouette
            walk, current = walk[going], neighbour[current, edge][going].clamp_min(0)
        return t

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _screen(clip: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Pixel coordinates [V,2] (pixel centres at integers + 0.5) and z/w [V] of clip-space vertices."""
        w = clip[:, 3:4]
        ndc = clip[:, :3] / w
        xy = torch.stack([(ndc[:, 0] + 1) * width / 2, (ndc[:, 1] + 1) * height / 2], -1)
        return xy, ndc[:, 2]

    def _visible(self, clip: Tensor, faces: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """For every covered pixel (flat index), the face drawn there: the nearest covering face."""
        xy, z = self._screen(clip, height, width)
        tri, tz = xy[faces], z[faces]  # [F,3,2], [F,3]
        front = (clip[faces][..., 3] > 0).all(-1)
        area = _signed_area2(tri)
        drawable = front & (area.abs() > 1e-12)
        t = self.tile
        tiles_x, tiles_y = -(-width // t), -(-height // t)
        lo = (tri.amin(1) - 0.5).floor().clamp_min(0)
        hi = (tri.amax(1) - 0.5).ceil()
        hi = torch.stack([hi[:, 0].clamp(max=width - 1), hi[:, 1].clamp(max=height - 1)], -1)
        drawable &= (hi >= lo).all(-1)
        ids = torch.nonzero(drawable).squeeze(-1)
        if ids.numel() == 0:
            return ids, ids
        t_lo, t_hi = (lo[ids] / t).long(), (hi[ids] / t).long()
        span = t_hi - t_lo + 1  # tiles per axis
        counts = span[:, 0] * span[:, 1]
        pair_face = ids.repeat_interleave(counts)  # one row per (face, tile) pair
        start = torch.cumsum(counts, 0) - counts
        k = torch.arange(int(counts.sum()), device=xy.device) - start.repeat_interleave(counts)
        sx = span[:, 0].repeat_interleave(counts)
        tile_x = t_lo[:, 0].repeat_interleave(counts) + k % sx
        tile_y = t_lo[:, 1].repeat_interleave(counts) + k // sx
        offs = torch.arange(t, device=xy.device)
        px = (tile_x.unsqueeze(-1) * t + offs).unsqueeze(1).expand(-1, t, -1)  # [P,t,t]
        py = (tile_y.unsqueeze(-1) * t + offs).unsqueeze(2).expand(-1, -1, t)
        inside_image = (px < width) & (py < height)
        centre = torch.stack([px + 0.5, py + 0.5], -1).to(xy.dtype)  # [P,t,t,2]
        e = _edge_functions(tri[pair_face].view(-1, 1, 1, 3, 2), centre)  # [P,t,t,3]
        sign = torch.sign(area[pair_face]).view(-1, 1, 1, 1)
        covered = ((e * sign) >= 0).all(-1) & inside_image
        pix = (py * width + px)[covered]
        fid = pair_face.view(-1, 1, 1).expand(-1, t, t)[covered]
        bary = e[covered] / area[fid].unsqueeze(-1)
        depth = (bary * tz[fid]).sum(-1)
        # depth test: the smallest z/w per pixel, then among equals the smallest face id
        best = torch.full((height * width,), float("inf"), dtype=depth.dtype, device=depth.device)
        best = best.scatter_reduce(0, pix, depth, reduce="amin")
        win = depth <= best[pix]
        pix, fid = pix[win], fid[win]
        first = torch.full((height * width,), faces.shape[0], dtype=torch.long, device=depth.device)
        first = first.scatter_reduce(0, pix, fid, reduce="amin")
        pixels = torch.nonzero(first < faces.shape[0]).squeeze(-1)
        return pixels, first[pixels]

    def _barycentrics(self, clip: Tensor, corners: Tensor, pixel: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Perspective-correct barycentrics [N,3] and z/w [N] at pixel centres, differentiable in clip."""
        xy, z = self._screen(clip, height, width)
        tri = xy[corners]  # [N,3,2]
        centre = torch.stack([pixel % width + 0.5, torch.div(pixel, width, rounding_mode="floor") + 0.5], -1).to(xy.dtype)
        e = _edge_functions(tri, centre)
        area = _signed_area2(tri).unsqueeze(-1)
        screen = e / area  # screen-space barycentrics: z/w is linear in them
        depth = (screen * z[corners]).sum(-1)
        inv_w = 1 / clip[corners][..., 3]
        persp = screen * inv_w
        return persp / persp.sum(-1, keepdim=True), depth


def _cross2(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _signed_area2(tri: Tensor) -> Tensor:
    """[...] twice the signed area of screen triangles [...,3,2] (positive counter-clockwise)."""
    return _cross2(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :])


def _edge_functions(tri: Tensor, point: Tensor) -> Tensor:
    """[...,3] e_i = twice the signed area of the triangle (point, v_{i+1}, v_{i+2}): the unnormalised
    barycentric of vertex i (e_0 + e_1 + e_2 = twice the triangle's signed area)."""
    v0, v1, v2 = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    return torch.stack([_cross2(v1 - point, v2 - point), _cross2(v2 - point, v0 - point),
                        _cross2(v0 - point, v1 - point)], -1)


def _depth_at(xy: Tensor, z: Tensor, image: Tensor, faces: Tensor, face: Tensor, point: Tensor) -> Tensor:
    """z/w [N] of `face` [N] of image `image` [N] (screen-linear; xy [B,V,2], z [B,V]) at screen points [N,2];
    +inf where face < 0."""
    corners = faces[face.clamp_min(0)]  # [N,3]
    tri = xy[image.unsqueeze(-1), corners]
    area = _signed_area2(tri).unsqueeze(-1)
    bary = _edge_functions(tri, point) / area.where(area.abs() > 1e-12, torch.ones_like(area))
    depth = (bary * z[image.unsqueeze(-1), corners]).sum(-1)
    return depth.where(face >= 0, torch.full_like(depth, float("inf")))


def edge_neighbours(faces: Tensor) -> Tensor:
    """[F,3] the face across each face's edge i (the edge opposite its vertex i), -1 where there is none or
    more than one (a mesh boundary, or a non-manifold edge: both treated as silhouettes)."""
    n_faces = faces.shape[0]
    ends = torch.stack([faces[:, [1, 2]], faces[:, [2, 0]], faces[:, [0, 1]]], 1).sort(-1).values  # [F,3,2]
    keys = (ends[..., 0] * (int(faces.max()) + 1) + ends[..., 1]).reshape(-1)
    order = torch.argsort(keys)
    ranked = keys[order]
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[1:] = ranked[1:] != ranked[:-1]
    group = torch.cumsum(starts.long(), 0) - 1
    size = torch.bincount(group)[group]
    pair_first = starts & (size == 2)  # the first of exactly two uses of an edge
    first = order[pair_first]
    second = order[torch.nonzero(pair_first).squeeze(-1) + 1]
    neighbour = torch.full((3 * n_faces,), -1, dtype=torch.long, device=faces.device)
    neighbour[first] = second // 3
    neighbour[second] = first // 3
    return neighbour.view(n_faces, 3)
