"""Tensors created without a device, found on a CPU (tests/device_check.py): the checker itself, then one
training step of each stage and the guidance step of each real prior under it. On CUDA each such tensor is a
crash the first time it meets the run's tensors; the refine stage's torch rasterizer had one (a clamp bound)."""
import pytest
import torch

from device_check import DeviceMix, strict_devices
from helpers import TINY_TOY
from perpneg3d.renderer import torch_rasterizer


def test_the_checker_flags_a_device_less_tensor_that_meets_the_run_s_tensors(monkeypatch):
    """Code under perpneg3d/ (here the rasterizer's module namespace runs the snippet) that makes a tensor
    without a device: mixing it with a run tensor raises, naming the line; the allowed cases pass."""
    run = torch.rand(4, 2)
    snippet = compile("bound = torch.tensor([1.0, 2.0])\nscalar = torch.tensor(2.0)\nidx = torch.arange(2)\n"
                      "placed = torch.ones(2, device=run.device)", torch_rasterizer.__file__, "exec")
    scope = dict(torch=torch, run=run)
    with strict_devices() as check:
        exec(snippet, scope)
        assert run * scope["scalar"] is not None  # a 0-dim host tensor: CUDA kernels take it as a scalar
        assert run[scope["idx"]].shape == (2, 2)  # host indices into a device tensor: allowed on CUDA
        assert (run + scope["placed"]).shape == (4, 2)  # made with device=
        assert (scope["bound"] * 2 + 1).tolist() == [3.0, 5.0]  # host tensors among themselves
        with pytest.raises(DeviceMix, match=r"torch_rasterizer.py:1 .*create it with device="):
            run.clamp(max=scope["bound"])
        with pytest.raises(DeviceMix, match=r"torch_rasterizer.py:1"):
            run + (scope["bound"] * 2)  # what is computed from a host tensor stays on the host
    assert {s.split(":")[1] for s in check.created} == {"1", "2", "3"}
    with strict_devices():  # the test's own creations are not perpneg3d's: never marked
        assert (run + torch.ones(2)).shape == (4, 2)


def one_step(setup, steps=(0, 1)):
    """Training steps of a built setup inside strict_devices(); the sites of host-made tensors."""
    run = setup.trainer.start(setup.geometry, setup.renderer, setup.guidance, setup.prompts, setup.cameras, seed=0)
    with strict_devices() as check:
        for step in steps:
            setup.trainer.train_step(step, run)
    return check.created


def test_a_nerf_training_step_makes_no_device_mix():
    """The first stage's step with every part on: the normals pass (lambda_orient), the sparsity loss."""
    from perpneg3d.training.step_benchmark import build_setup

    created = one_step(build_setup(TINY_TOY + ["trainer.lambda_orient=1.0", "trainer.lambda_sparsity=0.1"]))
    assert created <= {"perpneg3d/renderer/material.py:30"}  # the shading draw: a CPU generator, read on the host


def test_a_refine_training_step_makes_no_device_mix():
    """The second stage's step: marching tetrahedra, the torch rasterizer with its antialias, the surface
    regularisers. Today's code passes; the rasterizer's clamp bound made without a device failed here."""
    from perpneg3d.training.step_benchmark import build_setup, refine_config

    cfg = refine_config([o for o in TINY_TOY if not o.startswith("geometry.")] + ["stage=refine_toy",
                                                                                  "geometry.grid_resolution=16"])
    assert one_step(build_setup([], cfg=cfg)) <= {"perpneg3d/renderer/material.py:30"}


@pytest.mark.parametrize("prior", ["tiny_sd", "tiny_if"])
def test_the_guidance_step_of_each_real_prior_makes_no_device_mix(prior, request):
    """View prompts for a batch of azimuths and one Perp-Neg SDS step (K=2) on the tiny SD and IF models."""
    from perpneg3d.guidance.sds import ScoreDistillation
    from perpneg3d.prompts import ViewPrompts

    denoiser = request.getfixturevalue(prior)
    prompts = ViewPrompts("a corgi standing").bind(denoiser)
    rgb = torch.rand(2, 32, 32, 3).requires_grad_(True)
    with strict_devices() as check:
        batch = prompts(torch.tensor([30.0, 150.0]), torch.tensor([15.0, 10.0]))
        out = ScoreDistillation(denoiser, guidance_scale=7.5)(rgb, batch, 0, torch.Generator().manual_seed(0))
        out.loss.backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all()
    assert not check.created
