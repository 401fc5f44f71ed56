"""The parts satisfy the Protocols of perpneg3d.contracts, and the optional capabilities are told apart."""
import torch

from helpers import TINY_TOY, compose_train
from perpneg3d.config import instantiate
from perpneg3d.contracts import (Denoiser, Geometry, HasImageSize, HasSchedulerConfig, HasViewClassifier, OnDevice,
                                 Renderer, ViewClassifier, device_of)
from perpneg3d.evaluation.classifiers import ClipViewClassifier, classifier_for
from perpneg3d.guidance.stable_diffusion import StableDiffusion
from perpneg3d.toy.prior import ToyPrior


def test_toy_parts_satisfy_the_contracts(tmp_path):
    cfg = compose_train(TINY_TOY, tmp_path)
    prior = instantiate(cfg.guidance.denoiser)
    assert isinstance(prior, Denoiser) and isinstance(prior, HasViewClassifier)
    assert isinstance(prior.view_classifier(), ViewClassifier)
    assert isinstance(instantiate(cfg.geometry), Geometry) and isinstance(instantiate(cfg.renderer), Renderer)
    assert issubclass(ToyPrior, HasViewClassifier) and not issubclass(StableDiffusion, HasViewClassifier)


def test_stable_diffusion_capabilities(tiny_sd):
    assert isinstance(tiny_sd, Denoiser) and isinstance(tiny_sd, OnDevice)
    assert isinstance(tiny_sd, HasSchedulerConfig) and isinstance(tiny_sd, HasImageSize)
    assert not isinstance(tiny_sd, HasViewClassifier)


def test_the_one_classifier_choice(tmp_path, monkeypatch):
    """The prior's own classifier when it has one; CLIP otherwise (built here with a stand-in loader)."""
    cfg = compose_train(TINY_TOY, tmp_path)
    prior = instantiate(cfg.guidance.denoiser)
    assert type(classifier_for(prior, "a toy dog")).__name__ == type(prior.view_classifier()).__name__
    made = []
    monkeypatch.setattr(ClipViewClassifier, "__init__", lambda self, prompt, model, device="cpu": made.append(
        (prompt, model, device)))
    assert isinstance(classifier_for(object(), "a corgi", "clip-x"), ClipViewClassifier)
    assert made == [("a corgi", "clip-x", "cpu")]


def test_renderer_names_its_parameter_groups(tmp_path):
    renderer = instantiate(compose_train([], tmp_path).renderer)  # the neural environment map background
    groups = renderer.param_groups()
    assert list(groups) == ["background"] and len(groups["background"]) > 0
    assert all(p is q for p, q in zip(groups["background"], renderer.background.parameters()))
    assert device_of(object()) == torch.device("cpu")
