"""The contracts between perpneg3d's parts, in one module (docs/architecture.md).

Every part is written against these Protocols, not against a class: Stable Diffusion, the toy prior
and a class of your own are all Denoisers; the trainer never asks what concrete geometry or renderer
it holds. Optional capabilities are Protocols too, checked with isinstance(obj, Capability) rather
than by probing attribute names here and there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

# -- the prior ----------------------------------------------------------------------------------


@runtime_checkable
class Denoiser(Protocol):
    """An epsilon-prediction diffusion model with text conditioning (VP process).

    num_train_timesteps: T; alphas_cumprod: [T] float32 alpha-bar_t of the forward process. eps()
    returns epsilon whatever the model predicts (a v-prediction model converts inside).
    """

    num_train_timesteps: int
    alphas_cumprod: Tensor

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Text embeddings [N, ...] for N strings (cached per string)."""

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B,3,H,W] in [0,1] -> latents [B,C,h,w]; differentiable w.r.t. rgb."""

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B,C,h,w] -> rgb [B,3,H,W] in [0,1] (2D sampling and previews only)."""

    def eps(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        """Predicted noise [N,C,h,w] for noisy latents [N,C,h,w], integer timesteps [N], embeddings [N,...]."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image of height x width pixels."""


@runtime_checkable
class SamplesLatents(Protocol):
    """A denoiser whose encoder samples (a VAE's posterior): SDS passes the run's device generator,
    so a resumed run draws the same latents as an uninterrupted one."""

    def encode_sample(self, rgb: Tensor, generator: torch.Generator) -> Tensor:
        """As encode(), drawing the posterior sample from `generator`."""


@runtime_checkable
class MultiView(Protocol):
    """A denoiser conditioned on each image's camera that denoises groups of `views_per_group` consecutive images
    jointly (MVDream, docs/architecture.md, "A multi-view prior"): guided_eps calls eps_views, and SDS draws one
    timestep per group."""

    views_per_group: int

    def eps_views(self, latents_t: Tensor, t: Tensor, text_emb: Tensor, c2w: Tensor) -> Tensor:
        """As Denoiser.eps, with each row's camera-to-world matrix c2w [N,4,4] (perpneg3d's convention; the prior
        turns it into its own)."""


@runtime_checkable
class OnDevice(Protocol):
    """A denoiser that runs on a given device (the trainer puts the field there); else the CPU."""

    device: torch.device


@runtime_checkable
class HasSchedulerConfig(Protocol):
    """A denoiser with a diffusers scheduler config: the 2D sampler builds its DDIM from it (else
    from alphas_cumprod)."""

    scheduler_config: dict


@runtime_checkable
class HasImageSize(Protocol):
    """A denoiser with a native image size in pixels (2D sampling's default size)."""

    image_size: int


@runtime_checkable
class LinearTextEmbedding(Protocol):
    """A prior whose log-prior is linear in a bag-of-words text embedding (the toy prior): there, moving an
    embedding along e(view text) - e(prompt) is exactly a product of experts, so embedding-space view emphasis
    (prompts.view_emphasis) means what score-space emphasis means. False or absent: refused."""

    linear_text_embedding: bool


@runtime_checkable
class HasViewClassifier(Protocol):
    """A prior that can say which view an image shows (the toy world): Janus metrics use it instead of CLIP."""

    def view_classifier(self) -> "ViewClassifier":
        ...


class ViewPrediction(NamedTuple):
    """A view classifier's answer for N images."""

    object_idx: Tensor  # [N] index of the recognised object, -1 when nothing matches well enough
    azimuth_deg: Tensor  # [N] azimuth of the predicted view
    view_idx: Tensor  # [N] index into prompts.views.VIEWS
    similarity: Tensor  # [N] the classifier's confidence (cosine similarity or probability)


@runtime_checkable
class ViewClassifier(Protocol):
    def __call__(self, rgb: Tensor) -> ViewPrediction:
        """rgb [N,3,H,W] in [0,1]."""

    def object_index(self, prompt: str) -> int:
        """The object index a correct render of `prompt` is recognised as."""


@runtime_checkable
class HasReferenceCamera(Protocol):
    """A classifier trained on renders from one camera: {distance, fovy_deg, resolution}."""

    camera: dict


def device_of(denoiser) -> torch.device:
    """Where a denoiser runs: its device when it says, else the CPU."""
    return denoiser.device if isinstance(denoiser, OnDevice) else torch.device("cpu")


# -- the scene ----------------------------------------------------------------------------------


@runtime_checkable
class Geometry(Protocol):
    """A density and albedo field over [-radius, radius]^3 (world units, docs/conventions.md)."""

    radius: float

    def density(self, points: Tensor) -> Tensor:
        """[N] non-negative density at world points [N,3]."""

    def albedo(self, points: Tensor) -> Tensor:
        """[N,3] colour in [0,1]."""

    def normals(self, points: Tensor) -> Tensor:
        """[N,3] unit outward normals."""

    def __call__(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(density [N], albedo [N,3]) in one pass."""

    def param_groups(self) -> dict[str, list]:
        """Named parameter groups: the trainer gives each its own learning rate (geometry.<name>)."""

    def update_step(self, step: int) -> None:
        """Training-step schedules (coarse-to-fine levels)."""


@runtime_checkable
class Surface(Protocol):
    """A triangle-mesh geometry (the second stage, DMTet): the smallest contract a rasterizing renderer and the
    trainer need. The volume Geometry's density() has no counterpart on a mesh, so a surface is not a Geometry;
    the renderer asks for its mesh, and the trainer for the regularisers of the mesh that step rendered."""

    radius: float

    def mesh(self) -> tuple[Tensor, Tensor]:
        """(vertices [M,3] world, differentiable; faces [F,3] long, outward)."""

    def albedo(self, points: Tensor) -> Tensor:
        """[N,3] colour in [0,1] at surface points."""

    def regularizers(self, vertices: Tensor, faces: Tensor) -> dict[str, Tensor]:
        """Named surface regularisers of a mesh (trainer.lambda_<name> weighs each)."""

    def param_groups(self) -> dict[str, list]:
        ...

    def update_step(self, step: int) -> None:
        ...


class Gaussians(NamedTuple):
    """N anisotropic 3D Gaussians, activated (what a splatting renderer draws; issue 30)."""

    means: Tensor  # [N,3] world
    scales: Tensor  # [N,3] standard deviations along the Gaussian's own axes, > 0
    rotations: Tensor  # [N,4] unit quaternions (w, x, y, z): the Gaussian's axes in the world
    opacities: Tensor  # [N] peak opacity in (0, 1)
    colors: Tensor  # [N,3] albedo in [0, 1]


@runtime_checkable
class GaussianField(Protocol):
    """A geometry made of 3D Gaussians (docs/architecture.md, "Gaussian splatting"): a splatting renderer asks
    for its Gaussians; like a Surface it has no density() to march, so it is not a Geometry."""

    radius: float

    def gaussians(self) -> Gaussians:
        """The current Gaussians, differentiable in every field."""

    def param_groups(self) -> dict[str, list]:
        ...

    def update_step(self, step: int) -> None:
        ...


@runtime_checkable
class Densifies(Protocol):
    """A geometry that changes its own size while it trains (3D Gaussians: clone, split, prune). The trainer calls
    densify after every optimiser step; the geometry resizes its parameters in place (the same Parameter objects)
    and the optimiser's per-parameter state with them, and keeps what it accumulates in its state_dict."""

    def densify(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        ...


@dataclass
class RaySamples:
    """What a ray sampler (the CUDA marcher or the stratified CPU sampler) hands to compositing:
    S packed samples over the batch's rays."""

    ray_ids: Tensor  # [S] which ray each sample belongs to
    t_pos: Tensor  # [S] distance along the ray
    points: Tensor  # [S,3] world position
    weights: Tensor  # [S] volume-rendering weight
    albedo: Tensor  # [S,3] the field's colour there


@runtime_checkable
class Renderer(Protocol):
    """Renders a Geometry from a CameraBatch; knows nothing of guidance (docs/architecture.md)."""

    def update(self, step: int, geometry: Geometry) -> None:
        """Per-step state (the occupancy grid)."""

    def choose_shading(self, step: int, generator: torch.Generator) -> str:
        """The shading of this training step (albedo, lambertian, textureless)."""

    def param_groups(self) -> dict[str, list]:
        """Named trainable parameter groups (renderer.<name> in trainer.learning_rates)."""


@runtime_checkable
class Rasterizer(Protocol):
    """Triangle rasterization in nvdiffrast's conventions (docs/architecture.md, "Second stage"): clip-space
    vertices, pixel (i, j) centred at NDC x = (2i + 1) / W - 1, y = (2j + 1) / H - 1 (row 0 at y = -1)."""

    def rasterize(self, clip: Tensor, faces: Tensor, resolution: tuple[int, int]) -> Tensor:
        """clip [B,V,4], faces [F,3] int -> rast [B,H,W,4]: (u, v, z/w, triangle id + 1; 0 where empty), u and v
        the perspective-correct barycentrics of the face's vertices 0 and 1 (vertex 2 gets 1 - u - v),
        differentiable with respect to clip."""

    def interpolate(self, attributes: Tensor, rast: Tensor, faces: Tensor) -> Tensor:
        """attributes [V,C] or [B,V,C] -> [B,H,W,C] at each pixel's barycentrics (0 where empty)."""

    def antialias(self, color: Tensor, rast: Tensor, clip: Tensor, faces: Tensor) -> Tensor:
        """color [B,H,W,C] blended across face boundaries, differentiable with respect to clip: the gradients
        through silhouettes (a flat-coloured shape moves only by them)."""
