"""Packaging for perpneg3d: text-to-3D with Perp-Neg score distillation."""
from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="perpneg3d",
    version="0.1.0",
    description="Text-to-3D (DreamFusion-style) with the Perp-Neg algorithm against the Janus problem",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # hydra_plugins/perpneg3d_sweeps: the sweep launchers (Hydra loads launchers from that namespace only)
    packages=find_packages(include=["perpneg3d", "perpneg3d.*"]) + find_namespace_packages(include=["hydra_plugins.*"]),
    install_requires=[
        # torch is installed first by the Makefile (CPU: torch==2.13.0); any CUDA build >= 2.1 works.
        "torch>=2.1",
        "numpy",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors",
        "accelerate",
        "sentencepiece",  # DeepFloyd IF's T5 tokenizer (spiece.model)
        "hydra-core>=1.3,<1.4",
        "hydra-submitit-launcher>=1.2",
        "nerfacc==0.5.3",
        "imageio",
        "imageio-ffmpeg",
        "pillow",
        "trimesh>=4",
        "PyMCubes",
        "scipy",
        "xatlas",
        "fast-simplification",
        "tensorboard",
        "tqdm",
        "pydantic>=2",             # option types and ranges (perpneg3d/validation.py)
        "psutil",                  # free memory, checked before an export (perpneg3d/export/mesh.py)
    ],
    extras_require={
        # clip-anytorch (the real CLIP BPE vocabulary for the tiny test pipeline) is installed
        # with --no-deps by the Makefile: its declared deps would pull torchvision.
        "test": ["pytest>=7", "pytest-xdist>=3"],   # make test runs the suite in 2 workers
        # the gallery's tests drive the system's Chromium (scripts/install_chromium.sh) with Playwright
        "browser": ["playwright>=1.40"],
        # nvdiffrast's CUDA rasterizer for the refine stage (its kernels build on first use; NVIDIA's
        # non-commercial licence, so optional: without it meshes are rasterized in torch)
        "nvdiffrast": ["diffrp-nvdiffrast==0.3.3"],
        # gsplat's CUDA rasterizer for 3D Gaussians (Apache-2.0; kernels build on first use on CUDA). The CPU
        # tests use its torch reference of the projection to pin the cameras handed to it. gsplat imports
        # `packaging` without declaring it.
        "gsplat": ["gsplat==1.5.3", "packaging"],
    },
)
