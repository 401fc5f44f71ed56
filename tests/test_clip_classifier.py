"""The CLIP zero-shot view classifier used with Stable Diffusion, on a tiny random CLIP built here."""
import torch

from tiny_sd import write_clip_tokenizer


def tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / "_tok")))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_view_classifier_runs_and_is_deterministic(tmp_path):
    from perpneg3d.evaluation.classifiers import ClipViewClassifier

    clf = ClipViewClassifier("a corgi", str(tiny_clip(tmp_path / "clip")))
    images = torch.rand(5, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    a, b = clf(images), clf(images)
    assert torch.equal(a.view_idx, b.view_idx) and a.view_idx.shape == (5,)
    assert set(a.object_idx.tolist()) <= {0, -1} and ((a.similarity > 0) & (a.similarity <= 1)).all()
    assert set(a.view_idx[a.object_idx == 0].tolist()) <= {0, 1, 2}
    assert clf.object_index("a corgi") == 0


def test_missing_clip_weights_is_one_line(tmp_path):
    import pytest

    from perpneg3d.errors import ModelNotFoundError
    from perpneg3d.evaluation.classifiers import ClipViewClassifier

    with pytest.raises(ModelNotFoundError, match="cannot load CLIP") as err:
        ClipViewClassifier("a corgi", str(tmp_path / "nothing"))
    assert "\n" not in str(err.value)
