"""How well text-conditional samples follow their captions (MDM Fig. 8c's axis): a real CLIPModel
directory (tiny, random, built here: no CLIP weights ship offline) and the data-classifier substitute."""
import numpy as np
import pytest
import torch

from nds.eval.data_classifier import DataClassifier
from nds.eval.metrics import CAPTION_CLASS_ACCURACY, CLIP_SCORE, clip_score, text_agreement
from nds.latents.text import minilm_path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A CLIPModel saved as transformers saves one, with MiniLM's tokenizer (its vocabulary sizes the text tower)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("clip")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def images(n: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, channels), dtype=np.uint8)


def test_clip_score_is_a_bounded_per_pair_mean_that_depends_on_the_captions(clip_dir):
    pictures, captions = images(5), [f"a photo of a {w}" for w in ("cat", "dog", "boot", "bag", "shirt")]
    score = clip_score(pictures, captions, clip_dir, batch_size=2)
    assert 0.0 <= score <= 100.0
    singles = [clip_score(pictures[i:i + 1], captions[i:i + 1], clip_dir) for i in range(5)]
    assert score == pytest.approx(np.mean(singles), abs=1e-4)  # batching and padding change nothing
    assert clip_score(pictures, captions[::-1], clip_dir) != pytest.approx(score, abs=1e-6)
    assert clip_score(images(2, channels=1), captions[:2], clip_dir) >= 0.0  # grey samples enter as RGB
    assert text_agreement(pictures, captions, None, clip_dir) == {CLIP_SCORE: pytest.approx(score)}
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(pictures, captions[:3], clip_dir)
    with pytest.raises(FileNotFoundError, match="no CLIP model at"):
        clip_score(pictures, captions, clip_dir + "-missing")


def test_without_clip_the_substitute_is_the_classifiers_caption_class_accuracy():
    torch.manual_seed(0)
    classifier = DataClassifier(1, 10, 16).eval()
    pictures = images(40, channels=1)
    predicted = classifier(pictures).argmax(1).numpy()
    captions = ["a photo of something"] * len(pictures)
    assert text_agreement(pictures, captions, predicted, "", classifier) == {CAPTION_CLASS_ACCURACY: 1.0}
    assert text_agreement(pictures, captions, (predicted + 1) % 10, "", classifier) == {CAPTION_CLASS_ACCURACY: 0.0}
    assert text_agreement(pictures, captions, None, "", classifier) == {}  # per-image captions name no class
