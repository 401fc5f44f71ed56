"""The toy world's objects: a dog, a cat and a car of analytic primitives, front facing +x.

A horse, a rabbit and a chair were added later as held-out objects (issue 21): they were designed and
committed before any guidance change was tuned, and the benchmark's default world does not contain them.

Each has an unmistakable front (face with eyes and nose; headlights and grille) and back
(dark rump and tail; red tail lights and spoiler), so a view is recognisable at 32x32 pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.cameras import CameraBatch
from perpneg3d.errors import ConfigError
from perpneg3d.toy.shapes import Primitives, raycast

TAN, TAN_LIGHT, TAN_DARK = (0.78, 0.52, 0.28), (0.86, 0.62, 0.36), (0.66, 0.42, 0.22)
BROWN, CREAM, BLACK = (0.42, 0.23, 0.11), (0.97, 0.91, 0.80), (0.05, 0.05, 0.05)
GREY, GREY_LIGHT, GREY_DARK = (0.50, 0.50, 0.56), (0.62, 0.62, 0.68), (0.25, 0.25, 0.30)
BLUE, GLASS, YELLOW, RED = (0.15, 0.30, 0.80), (0.70, 0.85, 0.95), (1.0, 0.92, 0.30), (0.95, 0.10, 0.10)


def _mirror_y(specs):
    """Each spec plus its mirror image across the y = 0 plane (both sides of the object)."""
    out = []
    for (x, y, z), size, (rx, ry, rz), col in specs:
        out += [((x, y, z), size, (rx, ry, rz), col), ((x, -y, z), size, (-rx, ry, -rz), col)]
    return out


def _legs(x: float, y: float, z: float, size, col):
    return _mirror_y([((x, y, z), size, (0, 0, 0), col), ((-x, y, z), size, (0, 0, 0), col)])


DOG = {
    "ellipsoids": [
        ((0.0, 0.0, 0.0), (0.40, 0.20, 0.20), (0, 0, 0), TAN),  # body
        ((0.28, 0.0, 0.12), (0.14, 0.15, 0.17), (0, 0, 0), TAN),  # chest
        ((0.40, 0.0, 0.28), (0.17, 0.17, 0.16), (0, 0, 0), TAN_LIGHT),  # head
        ((0.56, 0.0, 0.23), (0.09, 0.10, 0.075), (0, 0, 0), CREAM),  # muzzle
        ((0.645, 0.0, 0.26), (0.03, 0.04, 0.03), (0, 0, 0), BLACK),  # nose
        ((-0.30, 0.0, 0.08), (0.12, 0.17, 0.14), (0, 0, 0), BROWN),  # dark rump
        ((-0.44, 0.0, 0.18), (0.05, 0.05, 0.15), (0, -35, 0), BROWN),  # tail
    ]
    + _mirror_y([((0.535, 0.075, 0.33), (0.025, 0.03, 0.03), (0, 0, 0), BLACK)])  # eyes
    + _mirror_y([((0.36, 0.14, 0.42), (0.05, 0.04, 0.10), (20, 0, 0), BROWN)])  # ears
    + _legs(0.24, 0.11, -0.24, (0.06, 0.06, 0.17), TAN_DARK),
    "boxes": [],
}

CAT = {
    "ellipsoids": [
        ((-0.02, 0.0, -0.02), (0.34, 0.16, 0.17), (0, 0, 0), GREY),  # body
        ((0.33, 0.0, 0.22), (0.15, 0.16, 0.14), (0, 0, 0), GREY_LIGHT),  # head
        ((0.46, 0.0, 0.18), (0.05, 0.08, 0.05), (0, 0, 0), (0.96, 0.96, 0.96)),  # white muzzle
        ((0.505, 0.0, 0.21), (0.02, 0.025, 0.02), (0, 0, 0), (0.95, 0.50, 0.60)),  # pink nose
        ((-0.25, 0.0, 0.10), (0.10, 0.15, 0.10), (0, 0, 0), GREY_DARK),  # dark back
        ((-0.40, 0.0, 0.05), (0.04, 0.04, 0.14), (0, -30, 0), (0.18, 0.18, 0.22)),  # tail, low
        ((-0.47, 0.0, 0.26), (0.04, 0.04, 0.12), (0, 10, 0), (0.18, 0.18, 0.22)),  # tail, raised
    ]
    + _mirror_y([((0.455, 0.07, 0.27), (0.02, 0.035, 0.035), (0, 0, 0), (0.55, 0.85, 0.15))])  # green eyes
    + _mirror_y([((0.31, 0.10, 0.38), (0.04, 0.05, 0.09), (15, 0, 0), GREY_DARK)])  # ears
    + _legs(0.20, 0.09, -0.26, (0.05, 0.05, 0.15), GREY),
    "boxes": [],
}

CAR = {
    "ellipsoids": _mirror_y([((0.3, 0.24, -0.24), (0.12, 0.05, 0.12), (0, 0, 0), BLACK),
                             ((-0.3, 0.24, -0.24), (0.12, 0.05, 0.12), (0, 0, 0), BLACK)])  # wheels
    + _mirror_y([((0.50, 0.15, -0.08), (0.02, 0.06, 0.04), (0, 0, 0), YELLOW)])  # headlights
    + _mirror_y([((-0.50, 0.15, -0.08), (0.02, 0.07, 0.04), (0, 0, 0), RED)]),  # tail lights
    "boxes": [
        ((0.0, 0.0, -0.12), (0.50, 0.24, 0.12), (0, 0, 0), BLUE),  # body
        ((-0.06, 0.0, 0.08), (0.26, 0.21, 0.10), (0, 0, 0), GLASS),  # cabin
        ((-0.06, 0.0, 0.185), (0.24, 0.20, 0.02), (0, 0, 0), BLUE),  # roof
        ((0.50, 0.0, -0.14), (0.01, 0.08, 0.04), (0, 0, 0), (0.25, 0.25, 0.25)),  # grille
        ((-0.46, 0.0, 0.03), (0.04, 0.22, 0.015), (0, 0, 0), (0.10, 0.10, 0.12)),  # spoiler
    ],
}

BAY, BAY_DARK, WHITE, PINK = (0.55, 0.32, 0.16), (0.30, 0.16, 0.08), (0.96, 0.96, 0.96), (0.95, 0.55, 0.62)
HORSE = {
    "ellipsoids": [
        ((0.0, 0.0, 0.02), (0.36, 0.14, 0.15), (0, 0, 0), BAY),  # body
        ((0.30, 0.0, 0.22), (0.08, 0.09, 0.20), (0, 35, 0), BAY),  # neck, leaning forward
        ((0.45, 0.0, 0.38), (0.16, 0.07, 0.075), (0, 30, 0), BAY),  # head, nose down
        ((0.55, 0.0, 0.34), (0.06, 0.035, 0.05), (0, 30, 0), WHITE),  # white blaze
        ((0.24, 0.0, 0.32), (0.05, 0.035, 0.17), (0, 35, 0), BLACK),  # mane
        ((-0.28, 0.0, 0.06), (0.11, 0.145, 0.13), (0, 0, 0), BAY_DARK),  # dark rump
        ((-0.40, 0.0, -0.04), (0.05, 0.05, 0.20), (0, -20, 0), BLACK),  # tail
    ]
    + _mirror_y([((0.47, 0.06, 0.43), (0.025, 0.02, 0.025), (0, 0, 0), BLACK)])  # eyes
    + _mirror_y([((0.38, 0.04, 0.50), (0.02, 0.02, 0.06), (0, 0, 0), BAY_DARK)])  # ears
    + _legs(0.24, 0.08, -0.30, (0.045, 0.045, 0.22), BAY_DARK),
    "boxes": [],
}

FAWN, FAWN_DARK = (0.70, 0.58, 0.45), (0.48, 0.38, 0.30)
RABBIT = {
    "ellipsoids": [
        ((-0.05, 0.0, -0.05), (0.26, 0.19, 0.20), (0, 0, 0), FAWN),  # body
        ((0.22, 0.0, 0.17), (0.13, 0.12, 0.12), (0, 0, 0), FAWN),  # head
        ((0.335, 0.0, 0.15), (0.02, 0.025, 0.02), (0, 0, 0), PINK),  # nose
        ((0.30, 0.0, 0.11), (0.05, 0.06, 0.04), (0, 0, 0), WHITE),  # white muzzle
        ((-0.22, 0.0, 0.0), (0.09, 0.16, 0.15), (0, 0, 0), FAWN_DARK),  # dark haunch
        ((-0.32, 0.0, 0.02), (0.07, 0.08, 0.07), (0, 0, 0), WHITE),  # white tail
    ]
    + _mirror_y([((0.31, 0.07, 0.21), (0.025, 0.02, 0.025), (0, 0, 0), BLACK)])  # eyes
    + _mirror_y([((0.17, 0.05, 0.40), (0.035, 0.05, 0.16), (15, -10, 0), FAWN_DARK)])  # long ears
    + _mirror_y([((0.15, 0.08, -0.22), (0.06, 0.04, 0.04), (0, 0, 0), FAWN),  # front paws
                 ((-0.10, 0.12, -0.23), (0.14, 0.05, 0.03), (0, 0, 0), FAWN_DARK)]),  # hind feet
    "boxes": [],
}

WOOD, CUSHION = (0.45, 0.28, 0.14), (0.80, 0.18, 0.18)
CHAIR = {
    "ellipsoids": [],
    "boxes": [
        ((0.0, 0.0, -0.05), (0.24, 0.24, 0.04), (0, 0, 0), CUSHION),  # seat
        ((-0.22, 0.0, 0.25), (0.03, 0.24, 0.27), (0, 0, 0), WOOD),  # backrest: plain wood from behind
        ((-0.185, 0.0, 0.27), (0.008, 0.19, 0.21), (0, 0, 0), CUSHION),  # its cushion, seen from the front
    ]
    + _legs(0.20, 0.20, -0.32, (0.025, 0.025, 0.23), WOOD),
}

OBJECTS = {"dog": DOG, "cat": CAT, "car": CAR, "horse": HORSE, "rabbit": RABBIT, "chair": CHAIR}

# Variants, named "<object>:<variant>": the same object in other colours or sizes (docs/janus.md). A ginger cat is
# no longer the average colour of the default world (the cat's grey is close to the mean of dog, cat and car).
GINGER, GINGER_LIGHT, GINGER_DARK = (0.92, 0.55, 0.18), (0.97, 0.70, 0.35), (0.62, 0.30, 0.08)
_GINGER = {GREY: GINGER, GREY_LIGHT: GINGER_LIGHT, GREY_DARK: GINGER_DARK}
VARIANTS = {
    "cat:ginger": {kind: [(c, s, r, _GINGER.get(col, col)) for c, s, r, col in specs] for kind, specs in CAT.items()},
    # 1.25 times larger: it covers more of the image than the dog and the car, instead of the least
    "cat:large": {kind: [(tuple(1.25 * x for x in c), tuple(1.25 * x for x in s), r, col) for c, s, r, col in specs]
                  for kind, specs in CAT.items()},
}


def base_name(name: str) -> str:
    """The object a (variant) name is: "cat:ginger" -> "cat" (what captions and prompts call it)."""
    return name.split(":", 1)[0]
LIGHT_DIR = F.normalize(torch.tensor([0.35, 0.25, 1.0]), dim=0)  # fixed in the world: shading is view-independent


def check_objects(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in OBJECTS and n not in VARIANTS]
    if unknown or not names:
        raise ConfigError(f"unknown toy objects {unknown or names}: choose from {', '.join([*OBJECTS, *VARIANTS])}")
    bases = [base_name(n) for n in names]
    if len(set(bases)) < len(bases):
        raise ConfigError(f"toy objects {names}: one variant per object (captions name the object, not the variant)")
    return names


def primitives(name: str) -> tuple[Primitives, Primitives]:
    spec = VARIANTS[name] if name in VARIANTS else OBJECTS[name]
    return Primitives.from_specs(spec["ellipsoids"]), Primitives.from_specs(spec["boxes"])


def render_objects(names: list[str], cameras: CameraBatch, supersample: int = 3, chunk: int = 32) -> Tensor:
    """Render object names[i] from camera i: [B,3,H,W] in [0,1] on white, antialiased by
    supersampling (supersample^2 rays per pixel, box-filtered)."""
    check_objects(set(names))
    s = supersample
    big = CameraBatch(cameras.c2w, cameras.fovy_deg, cameras.azimuth_deg, cameras.elevation_deg,
                      cameras.distance, cameras.light_position, cameras.height * s, cameras.width * s).to("cpu")
    out = torch.ones(cameras.batch_size, 3, cameras.height, cameras.width)
    for name in set(names):
        ell, box = primitives(name)
        idx = torch.tensor([i for i, n in enumerate(names) if n == name])
        for part in idx.split(chunk):
            origins, dirs = big[part].rays()
            rgb = raycast(ell, box, origins.reshape(-1, 3), dirs.reshape(-1, 3), LIGHT_DIR)
            rgb = rgb.reshape(len(part), big.height, big.width, 3).permute(0, 3, 1, 2)
            out[part] = F.avg_pool2d(rgb, s) if s > 1 else rgb
    return out
