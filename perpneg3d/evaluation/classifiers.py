"""View classifiers for evaluation: the toy world's own, or CLIP zero-shot for Stable Diffusion."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.contracts import HasViewClassifier, device_of
from perpneg3d.errors import ModelNotFoundError
from perpneg3d.prompts.views import view_labels


def projected(features):
    """CLIP's projected embeddings: a tensor (transformers 4) or the output's pooler_output (5)."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class ClipViewClassifier:
    """Zero-shot view classifier: CLIP similarity of an image to "<prompt>, <view> view" texts and
    to a few non-object texts (a blank or blurry image is classified as no object, index -1).

    Returns the same ViewPrediction as the toy classifier; azimuth is the view's nominal angle.
    """

    NOMINAL_AZIMUTH = {"front": 0.0, "side": 90.0, "back": 180.0}
    DISTRACTORS = ("a blank white image", "a blurry blob", "random noise")

    def __init__(self, prompt: str, model_name_or_path: str = DEFAULT_CLIP, device: str = "cpu",
                 views: Sequence[str] = ("front", "side", "back")):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model_name_or_path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model_name_or_path)
        except OSError:
            raise ModelNotFoundError(
                f"cannot load CLIP '{model_name_or_path}' for view classification: download it once or pass a local "
                "folder with classifier.model_name_or_path=/path; offline without weights use guidance=toy") from None
        self.device, self.views, self.objects = device, list(views), [prompt]
        texts = [f"a photo of {prompt}, {v} view" for v in self.views] + list(self.DISTRACTORS)
        with torch.no_grad():
            tok = self.processor(text=texts, return_tensors="pt", padding=True).to(device)
            self.text_features = F.normalize(projected(self.model.get_text_features(**tok)), dim=-1)

    def object_index(self, prompt: str) -> int:
        return 0

    @torch.no_grad()
    def __call__(self, rgb: Tensor):
        from perpneg3d.toy.classifier import ViewPrediction

        size = self.processor.image_processor.crop_size["height"]
        x = F.interpolate(rgb.float().clamp(0, 1), (size, size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.processor.image_processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.processor.image_processor.image_std).view(1, 3, 1, 1)
        feats = F.normalize(projected(self.model.get_image_features(pixel_values=((x - mean) / std).to(self.device))), dim=-1)
        probs = (100 * feats @ self.text_features.T).softmax(-1).cpu()
        best = probs.argmax(-1)
        is_view = best < len(self.views)
        az = torch.tensor([self.NOMINAL_AZIMUTH[self.views[min(i, len(self.views) - 1)]] for i in best.tolist()])
        obj = torch.where(is_view, torch.zeros_like(best), torch.full_like(best, -1))
        return ViewPrediction(obj, az, view_labels(az, torch.zeros_like(az)), probs.max(-1).values)


def classifier_for(denoiser, prompt: str, clip_model: str = DEFAULT_CLIP):
    """The one choice of view classifier: the prior's own when it has one (HasViewClassifier: the
    toy world), else CLIP zero-shot (on the denoiser's device; None: no denoiser at hand, CPU)."""
    if isinstance(denoiser, HasViewClassifier):
        return denoiser.view_classifier()
    return ClipViewClassifier(prompt, clip_model, device=str(device_of(denoiser)))

