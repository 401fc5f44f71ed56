"""Coloured meshes for Blender (GLB, OBJ, PLY) from any density/albedo field.

Axes: perpneg3d's world is z up with the object's front facing +x. Blender is z up and its Front
view (numpad 1) looks along +Y, so the front must face -Y: Blender = (y, -x, z). glTF and OBJ are
y up (Blender's importers map file (x, y, z) to Blender (x, -z, y)), so those files store
(B.x, B.z, -B.y); PLY is read by Blender as z up and stores Blender coordinates. The object stands on
z = 0, centred on the z axis, `height_m` metres tall.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Sequence

import numpy as np
import torch
from pydantic import Field

from perpneg3d.contracts import Surface
from perpneg3d.errors import ConfigError, ExportError, require
from perpneg3d.export.extraction import (
    clean_mesh,
    marching_cubes,
    occupied_bounds,
    resolve_threshold,
    sample_grid,
    sample_grid_near_level,
)
from perpneg3d.export.texture import bake_texture, unwrap
from perpneg3d.validation import PositiveFloat, PositiveInt, Probability, validated

log = logging.getLogger(__name__)
FORMATS = ("glb", "obj", "ply")
# Peak memory of an export, measured by scripts/benchmark_export.py (docs/benchmarks.md, "Speed"): the fine
# grid's passes hold about this many bytes per voxel at once, above the process's own footprint.
BYTES_PER_VOXEL = 28
BASE_BYTES = 1 << 30
WORLD_TO_BLENDER = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
BLENDER_TO_YUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def field_device(field) -> torch.device:
    """Where a field's parameters live (cpu for a parameter-free analytic field: any object with
    density() and albedo() exports, a torch Module or not)."""
    params = field.parameters() if isinstance(field, torch.nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


def estimate_peak_bytes(resolution: int, texture: str = "vertex", texture_size: int = 1024) -> int:
    """Rough peak memory of MeshExporter at `resolution` (the fine grid dominates; a uv bake adds the
    texture and one face chunk, see texture.bake_texture)."""
    n_fine = -(-(resolution - 1) // 4) * 4 + 1
    bake = texture_size ** 2 * 3 * 4 * 4 + (1 << 22) * 100 if texture == "uv" else 0
    return BASE_BYTES + BYTES_PER_VOXEL * n_fine ** 3 + bake


def check_memory(resolution: int, texture: str, texture_size: int, available: int | None = None) -> None:
    """ExportError (one line, with the setting that fits) when the export would need more memory than
    is free. The estimate is the export's peak RSS, BASE_BYTES of it the process's own footprint,
    which is already allocated and so not part of `available` (the free memory)."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    need = estimate_peak_bytes(resolution, texture, texture_size) - BASE_BYTES
    if need <= available:
        return
    options = [(f"export.resolution={r}", estimate_peak_bytes(r, texture, texture_size))
               for r in (512, 384, 256, 192, 128, 96, 64) if r < resolution]
    if texture == "uv":
        options += [(f"export.texture_size={s}", estimate_peak_bytes(resolution, texture, s))
                    for s in (4096, 2048, 1024, 512, 256) if s < texture_size]
    fits = sorted((n, o) for o, n in options if n - BASE_BYTES <= available)
    best = fits[-1] if fits else None  # the fitting setting that keeps the most detail (the largest estimate)
    fix = f"use {best[1]} (about {(best[0] - BASE_BYTES) / 2**30:.1f} GB)" if best else "free memory or export on a larger machine"
    raise ExportError(f"export.resolution={resolution} with texture={texture}"
                      f"{f' texture_size={texture_size}' if texture == 'uv' else ''} needs about {need / 2**30:.1f} GB "
                      f"more memory and {available / 2**30:.1f} GB is free: {fix}", (best[1],) if best else ())


def to_blender(vertices: np.ndarray, height_m: float) -> np.ndarray:
    """World (z up, front +x) -> Blender (z up, front -y), standing on z=0, height_m tall, centred."""
    v = vertices @ WORLD_TO_BLENDER.T
    lo, hi = v.min(0), v.max(0)
    scale = height_m / max(hi[2] - lo[2], 1e-9)
    centre = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
    return (v - centre) * scale


class MeshExporter:
    """Marching cubes on the field's density, coloured by its albedo, written for Blender.

    threshold: a density value or "auto" (median density where renders turn 50% opaque, see
    extraction.auto_threshold), found on a first pass at `coarse_resolution` over the whole box.
    tight_bbox: the fine pass covers only the occupied box (else the whole box); it evaluates the
    field at full `resolution` only near the surface (extraction.sample_grid_near_level).
    texture: "vertex" colours or "uv" (xatlas atlas + baked PNG, for OBJ+MTL and GLB).
    uv_max_faces: a uv-textured mesh is decimated to this many faces before unwrapping: xatlas's time
    grows faster than the face count (docs/export.md), and the texture, not the faces, carries colour.
    """

    @validated("export")
    def __init__(self, formats: Sequence[str] = ("glb",), resolution: Annotated[int, Field(ge=8)] = 256, threshold="auto",
                 tight_bbox: bool = True, coarse_resolution: Annotated[int, Field(ge=8)] = 64,
                 chunk_size: PositiveInt = 262144, min_component_ratio: Probability = 0.05,
                 max_faces: Annotated[int, Field(ge=4)] | None = None, texture: str = "vertex",
                 texture_size: Annotated[int, Field(ge=16)] = 1024, uv_max_faces: Annotated[int, Field(ge=4)] | None = 100000,
                 height_m: PositiveFloat = 1.0, file_name: str = "mesh"):
        formats = [formats] if isinstance(formats, str) else list(formats)
        bad = [f for f in formats if f not in FORMATS]
        require(not bad and formats, f"export.formats={formats}: choose from {', '.join(FORMATS)}")
        require(texture in ("vertex", "uv"), f"export.texture={texture!r}: use vertex or uv")
        if threshold != "auto":
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                raise ConfigError(f"export.threshold={threshold!r}: use a number or auto") from None
        self.formats, self.resolution, self.threshold, self.tight_bbox = formats, resolution, threshold, tight_bbox
        self.coarse_resolution = min(coarse_resolution, resolution)
        self.chunk_size, self.min_component_ratio, self.max_faces = chunk_size, min_component_ratio, max_faces
        self.texture, self.texture_size, self.height_m, self.file_name = texture, texture_size, height_m, file_name
        self.uv_max_faces = uv_max_faces

    def extract(self, geometry):
        """World-space trimesh of the field's surface (before axis conversion), plus the iso-level. A Surface
        (a refine run's DMTet) is its own mesh: no marching cubes, level 0 of its signed distance."""
        if isinstance(geometry, Surface):
            import trimesh

            with torch.no_grad():
                vertices, faces = geometry.mesh()
            require(len(faces) > 0, "the refined surface is empty (no grid vertex has a negative signed distance): "
                                    "refine from an earlier checkpoint or lower the refine run's learning rates")
            mesh = trimesh.Trimesh(vertices.double().cpu().numpy(), faces.cpu().numpy(), process=False)
            return clean_mesh(mesh, self.min_component_ratio, self.max_faces), 0.0
        device = field_device(geometry)
        grid, level, lo, hi = self.level(geometry)
        if self.tight_bbox:
            lo, hi = occupied_bounds(grid, level, lo, hi)
            side = float((hi - lo).max())
            centre = (lo + hi) / 2
            lo, hi = centre - side / 2, centre + side / 2  # cubic voxels
        grid = sample_grid_near_level(geometry.density, lo, hi, self.resolution, level, chunk_size=self.chunk_size, device=device)
        mesh = marching_cubes(grid, level, lo, hi)
        return clean_mesh(mesh, self.min_component_ratio, self.max_faces), level

    def level(self, geometry):
        """(coarse grid, iso-level, lo, hi): the density on the whole box at coarse_resolution and the level the
        export meshes (export.threshold, or auto); a refine run's DMTet starts from this level set."""
        r = float(geometry.radius)
        lo, hi = torch.full((3,), -r), torch.full((3,), r)
        grid = sample_grid(geometry.density, lo, hi, self.coarse_resolution, self.chunk_size, field_device(geometry))
        return grid, resolve_threshold(grid, 2 * r / (self.coarse_resolution - 1), self.threshold), lo, hi

    @torch.no_grad()
    def _albedo(self, geometry, points: torch.Tensor) -> torch.Tensor:
        device = field_device(geometry)
        return torch.cat([geometry.albedo(points[i:i + self.chunk_size].to(device)).float().cpu()
                          for i in range(0, len(points), self.chunk_size)])

    def __call__(self, geometry, out_dir: str | Path) -> list[Path]:
        """Export every format into out_dir; returns the written paths."""
        import trimesh

        module = isinstance(geometry, torch.nn.Module)
        was_training = module and geometry.training
        if module:
            geometry.eval()
        # a surface has no grid to sample: only a uv bake's memory counts (the smallest grid stands for none)
        check_memory(8 if isinstance(geometry, Surface) else self.resolution, self.texture, self.texture_size)
        t0 = time.perf_counter()
        try:
            mesh, level = self.extract(geometry)
            verts = np.asarray(mesh.vertices, dtype=np.float64)
            faces = np.asarray(mesh.faces, dtype=np.int64)
            if self.texture == "uv":
                if self.uv_max_faces and len(faces) > self.uv_max_faces:
                    mesh = mesh.simplify_quadric_decimation(face_count=int(self.uv_max_faces))
                    verts = np.asarray(mesh.vertices, dtype=np.float64)
                    faces = np.asarray(mesh.faces, dtype=np.int64)
                vmap, faces, uvs = unwrap(verts, faces, self.texture_size)
                verts = verts[vmap]
                image = bake_texture(verts, faces, uvs, lambda p: self._albedo(geometry, p), self.texture_size, self.chunk_size)
                colors = None
            else:
                rgb = self._albedo(geometry, torch.from_numpy(verts).float()).numpy()
                colors = np.concatenate([(rgb.clip(0, 1) * 255 + 0.5).astype(np.uint8), np.full((len(rgb), 1), 255, np.uint8)], 1)
        finally:
            if module:
                geometry.train(was_training)
        blender = to_blender(verts, self.height_m)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for fmt in self.formats:
            coords = blender if fmt == "ply" else blender @ BLENDER_TO_YUP.T
            out = trimesh.Trimesh(coords, faces, process=False)
            if colors is not None:
                out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=colors)
            else:
                from PIL import Image

                material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(image))
                out.visual = trimesh.visual.TextureVisuals(uv=uvs, image=Image.fromarray(image), material=material)
            path = out_dir / f"{self.file_name}.{fmt}"
            if fmt == "obj":
                self._write_obj(out, path)
            else:
                out.export(path, file_type=fmt)
            written.append(path)
        log.info("exported %d vertices, %d faces (iso-level %.3g) to %s in %.1fs", len(blender), len(faces), level,
                 ", ".join(p.name for p in written), time.perf_counter() - t0)
        return written

    @staticmethod
    def _write_obj(mesh, path: Path) -> None:
        """OBJ with vertex colours, or OBJ + MTL + PNG for a textured mesh."""
        from trimesh.exchange.obj import export_obj

        text, files = export_obj(mesh, include_color=True, include_texture=True, return_texture=True,
                                 mtl_name=f"{path.stem}.mtl")
        path.write_text(text)
        for name, data in (files or {}).items():
            (path.parent / name).write_bytes(data)
