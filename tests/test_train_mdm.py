"""Matryoshka Diffusion training: the mdm config section, and the real progressive run
(Ray Train + DeepSpeed ZeRO on gloo, MLflow sqlite) at tiny size on the 8x8 digits."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from nds.config import REPO_ROOT, ConfigError, flatten, load_config, replace
from nds.config.specs import Phase, baseline_phases, mdm_phases, mdm_spec
from nds.models.nested_unet import NestedUNet
from nds.tracking import RunKind, Tag
from nds.train.mdm import generate_images, model_costs, model_input, phase_module, prepare_images

TINY = [
    "data.name=digits", "data.train_limit=64",
    "mdm.resolutions=[4,8]", "mdm.core_widths=[16,32]", "mdm.stage_widths=[8]", "mdm.heads=2",
    "mdm.num_classes=10", "mdm.phase_steps=[4,4]",
    "training.batch_size=8", "training.lr=0.0005", "training.warmup_steps=2",
    "training.log_every=2", "training.checkpoint_every=2",
    "resources.workers_per_level=2", "resources.cpus_per_worker=0.45",
    "diffusion.sample_steps=4", "eval.grid_size=2",
    "eval.classifier_steps=50",
    f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}",  # DeepSpeed's comm op compiled once
]


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"paths.runs_dir={tmp_path}", *overrides])


def test_defaults_are_fashion_mnist_14_to_28():
    cfg = load_config()
    assert cfg.mdm.resolutions[-1] == 28
    assert mdm_phases(cfg) == [Phase(1, 200), Phase(2, 200)]
    assert flatten(cfg)["mdm.phase_steps"] == "[200, 200]"
    torch.manual_seed(0)
    model = NestedUNet(mdm_spec(cfg)).eval()
    outs = model([torch.zeros(1, 1, 14, 14), torch.zeros(1, 1, 28, 28)], torch.zeros(1))
    assert [tuple(o.shape) for o in outs] == [(1, 1, 14, 14), (1, 1, 28, 28)]


def test_zero_phase_steps_skip_phases():
    cfg = load_config(None, ["mdm.resolutions=[8,16,32]", "mdm.stage_widths=[16,8]", "mdm.phase_steps=[0,5,7]"])
    assert mdm_phases(cfg) == [Phase(2, 5), Phase(3, 7)]


@pytest.mark.parametrize("overrides, names", [
    (["mdm.resolutions=[14,21]", "mdm.phase_steps=[1,1]"], "mdm.resolutions[1] = 21"),
    (["mdm.resolutions=[28,14]"], "mdm.resolutions[1] = 14"),
    (["mdm.resolutions=[]"], "mdm.resolutions"),
    (["mdm.phase_steps=[5]"], "mdm.phase_steps needs one entry per resolution"),
    (["mdm.phase_steps=[5,0]"], "mdm.phase_steps: the last entry"),
    (["mdm.phase_steps=[-1,5]"], "mdm.phase_steps[0]"),
    (["mdm.loss_weights=[1.0]"], "mdm.loss_weights"),
    (["mdm.loss_weights=[1.0,-1.0]"], "mdm.loss_weights[1]"),
    (["mdm.prediction=x0"], "mdm.prediction"),
    (["mdm.sampler=euler"], "mdm.sampler"),
    (["mdm.cond_drop_prob=1.0"], "mdm.cond_drop_prob"),
    (["mdm.heads=3"], "mdm: .*heads=3"),
    (["mdm.stage_widths=[]"], "mdm: stage_widths"),
    (["mdm.core_widths=[8,8,8,8]"], "mdm: base resolution 14 is not divisible"),
    (["mdm.channels=many"], "mdm.channels"),
])
def test_bad_mdm_config_is_named(overrides, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_images_at_the_full_resolution_and_channels_checked(tmp_path):
    cfg = tiny_config(tmp_path)
    data = prepare_images(cfg)
    images, labels = data["images"], data["labels"]
    assert images.shape == (64, 8, 8, 1) and images.dtype == np.uint8 and labels.shape == (64,)
    assert data["text"] is None and data["text_groups"] is None
    x = model_input(images[:5], 16)  # a batch as the workers see it, at the full resolution
    assert x.shape == (5, 1, 16, 16) and x.dtype == np.float32 and -1.0 <= x.min() < x.max() <= 1.0
    assert prepare_images(tiny_config(tmp_path, "mdm.num_classes=0"))["labels"] is None
    with pytest.raises(ConfigError, match="mdm.channels=3"):
        prepare_images(tiny_config(tmp_path, "mdm.channels=3"))


def test_baselines_train_on_the_nested_schedules_budget():
    cfg = load_config()  # 14 -> 28, phase_steps [200, 200]
    assert baseline_phases(cfg, "nested") == [Phase(1, 200), Phase(2, 200)]
    assert baseline_phases(cfg, "plain") == [Phase(2, 400)]
    assert baseline_phases(cfg, "cascaded") == [Phase(1, 200), Phase(2, 200)]
    three = load_config(None, ["mdm.resolutions=[7,14,28]", "mdm.core_widths=[32]", "mdm.stage_widths=[16,8]",
                               "mdm.phase_steps=[100,50,250]"])
    assert baseline_phases(three, "cascaded") == [Phase(1, 150), Phase(3, 250)]
    with pytest.raises(ConfigError, match="cascaded baseline.*phase_steps=\\[0, 400\\]"):
        baseline_phases(load_config(None, ["mdm.phase_steps=[0,400]"]), "cascaded")
    assert baseline_phases(cfg, "latent") == [Phase(1, 400)]
    with pytest.raises(ConfigError, match="unknown MDM baseline 'ldm'"):
        baseline_phases(cfg, "ldm")
    assert cfg.mdm.baseline == "nested"
    with pytest.raises(ConfigError, match="mdm.baseline=cascaded: the cascaded baseline"):
        load_config(None, ["mdm.phase_steps=[0,400]", "mdm.baseline=cascaded"])
    with pytest.raises(ConfigError, match=r"mdm.baseline='ldm' must be one of \['nested', 'cascaded', 'plain', 'latent'\]"):
        load_config(None, ["mdm.baseline=ldm"])


def test_baseline_models_and_their_costs():
    cfg = load_config()
    nested = phase_module(cfg, "nested", 1)
    plain = phase_module(cfg, "plain", 0)
    low, sr = phase_module(cfg, "cascaded", 0), phase_module(cfg, "cascaded", 1)
    assert nested.io_resolutions == (14, 28) and plain.io_resolutions == (28,) and not plain.spec.nested
    assert low.io_resolutions == (14,) and sr.io_resolutions == (28,) and sr.spec.cond_channels == 1
    costs = {name: model_costs(*models) for name, models in
             {"nested": [nested], "plain": [plain], "cascaded": [low, sr]}.items()}
    assert costs["plain"]["mdm/params"] == costs["plain"]["unet/params"] == costs["nested"]["unet/params"]
    assert costs["plain"]["unet/params"] < costs["nested"]["mdm/params"] < 1.01 * costs["plain"]["unet/params"]
    # a cascade holds two models: more parameters than the NestedUNet, which shares them (MDM §4.2)
    assert costs["cascaded"]["mdm/params"] > 1.5 * costs["nested"]["mdm/params"]
    assert costs["cascaded"]["mdm/gflops"] > costs["cascaded"]["unet/gflops"] == costs["nested"]["unet/gflops"]


def test_every_baseline_generates_full_resolution_images(tmp_path):
    cfg = tiny_config(tmp_path, "eval.batch_size=3")
    torch.manual_seed(0)
    low, sr = phase_module(cfg, "cascaded", 0).eval(), phase_module(cfg, "cascaded", 1).eval()
    cascaded = replace(cfg, **{"mdm.baseline": "cascaded"})
    first = generate_images(cascaded, [low], 5)  # stage 1 only: its 4px samples, upsampled
    both = generate_images(cascaded, [low, sr], 5)
    assert first.shape == both.shape == (5, 8, 8, 1) and first.dtype == np.uint8
    assert not np.array_equal(first, both)
    assert np.array_equal(first, generate_images(cfg, [low], 5))
    plain = replace(cfg, **{"mdm.baseline": "plain"})
    assert generate_images(plain, [phase_module(cfg, "plain", 0).eval()], 4).shape == (4, 8, 8, 1)


def test_cli_dry_run_lists_phases_and_starts_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "experiments/train_mdm.py", "--dry-run", *TINY, f"paths.runs_dir={tmp_path}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "phase1 (4, 4 steps), phase2 (4->8, 4 steps)" in proc.stdout
    assert not any(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "experiments/train_mdm.py", "--dry-run", "mdm.phase_steps=[5]"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "mdm.phase_steps" in proc.stderr


@pytest.mark.slow
def test_progressive_training_end_to_end(tmp_path):
    """Two phases (4, then 4 -> 8), two ZeRO-2 workers each. The fault drill kills each phase's
    workers once after its step-2 checkpoint; a phase that restarted from scratch would hit it
    again and fail, so finishing proves each phase resumes from its own checkpoint."""
    import ray

    from nds.sweep.mdm import run_mdm
    from nds.sweep.runtime import init_ray

    cfg = tiny_config(tmp_path, "training.fail_once_at_step=2", "training.max_failures=1")
    init_ray(cfg)
    try:
        outcome = run_mdm(cfg)
    finally:
        ray.shutdown()

    first, second = outcome.phases
    assert (first.phase, second.phase) == (Phase(1, 4), Phase(2, 4))
    assert first.model.io_resolutions == (4,) and second.model.io_resolutions == (4, 8)
    assert "-phase1" in first.checkpoint_path and "-phase2" in second.checkpoint_path
    assert math.isfinite(first.final_loss) and math.isfinite(second.final_loss)

    # Phase 2 grew from phase 1's EMA weights: its inner part moved at most a few Adam steps
    # (lr 5e-4) away from them, while a fresh initialisation is far off.
    inner = first.model.state_dict()
    grown = second.model.state_dict()
    fresh = NestedUNet(mdm_spec(cfg), 2).state_dict()
    assert set(inner) < set(grown)
    drift = max((grown[k] - v).abs().max().item() for k, v in inner.items())
    fresh_gap = max((fresh[k] - v).abs().max().item() for k, v in inner.items())
    assert drift < 0.02 < fresh_gap

    assert outcome.images.shape == (cfg.eval.grid_size ** 2, 8, 8, 1) and outcome.images.dtype == np.uint8

    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[Tag.KIND] == RunKind.MDM
    params, metrics = run.data.params, run.data.metrics
    assert params["mdm.phase_steps"] == "[4, 4]" and params["mdm.resolutions"] == "[4, 8]"
    histories = {name: client.get_metric_history(outcome.run_id, name)
                 for name in ("phase1/train_loss", "phase2/train_loss", "phase2/train_loss_8")}
    for history in histories.values():
        assert max(m.step for m in history) == 4 and all(math.isfinite(m.value) for m in history)
    assert "phase1/train_loss_8" not in metrics
    assert max(m.timestamp for m in histories["phase1/train_loss"]) <= \
        min(m.timestamp for m in histories["phase2/train_loss"])
    assert math.isfinite(metrics["phase1/final_loss"]) and math.isfinite(metrics["phase2/final_loss"])
    assert metrics["unet/params"] < metrics["mdm/params"]
    assert 0 < metrics["unet/gflops"] < metrics["mdm/gflops"] < 1.25 * metrics["unet/gflops"]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"samples.png", "config.yaml"} <= artifacts


def test_dynamic_thresholding_bounds_every_resolution(tmp_path):
    """App. C: the x0 of every resolution is thresholded at a percentile while sampling; an untrained
    NestedUNet's samples run far outside [-1, 1] without it."""
    from nds.train.mdm import sample_images

    cfg = tiny_config(tmp_path, "diffusion.cfg_scale=1.0")
    torch.manual_seed(0)
    model = phase_module(cfg, "nested", 1).eval()
    free = sample_images(cfg, model, 6)
    bounded = sample_images(replace(cfg, **{"mdm.threshold": 0.995}), model, 6)
    assert max(x.abs().max() for x in free) > 1.0
    assert all(x.abs().max() <= 1.0 + 1e-5 for x in bounded)


@pytest.fixture(scope="module")
def digits_vae(tmp_path_factory) -> Path:
    """A small KL autoencoder fitted on the digits (8 px -> 4x4x4 codes), saved as the latent baseline reads it."""
    from nds.data import load_dataset
    from nds.latents.vae import VAEConfig, save_autoencoder, train_autoencoder

    images = load_dataset("digits", None, "train", limit=256).images
    vae_cfg = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        in_channels=1)
    path = tmp_path_factory.mktemp("vae") / "digits_vae.safetensors"
    save_autoencoder(train_autoencoder(images, vae_cfg, image_size=8, steps=150, batch_size=32, lr=3e-3), path)
    return path


def latent_config(tmp_path: Path, vae: Path, *overrides: str):
    return tiny_config(tmp_path, "mdm.baseline=latent", f"mdm.vae_weights={vae}", "mdm.latent_downsample=2",
                       "mdm.latent_channels=4", *overrides)


def test_latent_baseline_is_checked_before_training(tmp_path, digits_vae):
    from nds.sweep.preflight import check_latent_vae

    with pytest.raises(ConfigError, match="mdm.baseline=latent needs mdm.vae_weights"):
        tiny_config(tmp_path, "mdm.baseline=latent")
    with pytest.raises(ConfigError, match="mdm.latent_downsample=3 must divide the top resolution 8"):
        latent_config(tmp_path, digits_vae, "mdm.latent_downsample=3")
    with pytest.raises(ConfigError, match="mdm.vae_weights: no AutoencoderKL weights file"):
        check_latent_vae(latent_config(tmp_path, tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="makes 4-channel codes at 1/2.*mdm.latent_channels=3"):
        check_latent_vae(latent_config(tmp_path, digits_vae, "mdm.latent_channels=3"))
    check_latent_vae(latent_config(tmp_path, digits_vae))
    proc = subprocess.run([sys.executable, "experiments/train_mdm.py", *TINY, "mdm.baseline=latent",
                           f"mdm.vae_weights={tmp_path / 'missing.safetensors'}", "mdm.latent_downsample=2",
                           "mdm.latent_channels=4", f"paths.runs_dir={tmp_path / 'cli'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "mdm.vae_weights: no AutoencoderKL" in proc.stderr
    assert not (tmp_path / "cli").exists()  # stopped before any run was made


def test_latent_baseline_models_codes_and_decodes_them_to_images(tmp_path, digits_vae):
    """The innermost UNet at the code size; sampling ends in the decoder, so the images are full size."""
    cfg = latent_config(tmp_path, digits_vae)
    model = phase_module(cfg, "latent", 0).eval()
    assert model.io_resolutions == (4,) and model.spec.channels == 4 and not model.spec.stage_widths
    assert model_costs(model)["mdm/gflops"] < model_costs(phase_module(cfg, "plain", 0))["mdm/gflops"]
    images = generate_images(cfg, [model], 5)
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8


@pytest.mark.slow
def test_latent_baseline_trains_on_codes_end_to_end(tmp_path, digits_vae):
    """The real run: two ZeRO-2 workers encode each batch and fit the code model; its loss is on
    codes (4x4x4), and the run logs the UNet's cost and a sample grid of decoded images."""
    import ray

    from nds.sweep.mdm import run_mdm
    from nds.sweep.runtime import init_ray

    cfg = latent_config(tmp_path, digits_vae, "mdm.phase_steps=[4,8]")
    init_ray(cfg)
    try:
        outcome = run_mdm(cfg)
    finally:
        ray.shutdown()
    (phase,) = outcome.phases
    assert phase.phase == Phase(1, 12) and phase.model.io_resolutions == (4,) and math.isfinite(phase.final_loss)
    assert outcome.images.shape == (cfg.eval.grid_size ** 2, 8, 8, 1)
    client = MlflowClient(cfg.tracking_uri)
    history = client.get_metric_history(outcome.run_id, "phase1/train_loss_4")
    assert max(m.step for m in history) == 12
    assert client.get_run(outcome.run_id).data.params["mdm.baseline"] == "latent"


def test_text_conditional_nested_unet_trains_and_samples_on_captions(tmp_path):
    """model.text_encoder conditions the NestedUNet on caption tokens (the digits' class captions):
    the workers get the bank and each image's class, sampling records the captions it used, and the
    captions change the samples."""
    from nds.train.mdm import caption_tokens, generate, sample_images

    cfg = tiny_config(tmp_path, "model.text_encoder=minilm", "mdm.num_classes=0", "diffusion.cfg_scale=1.0")
    data = prepare_images(cfg)
    bank, groups = data["text"], data["text_groups"]
    assert data["labels"] is None and not bank.groups_are_images and groups.shape == (64,)
    torch.manual_seed(0)
    model = phase_module(cfg, "nested", 1).eval()
    assert model.spec.text_dim == bank.tokens.shape[-1] > 0
    assert model_costs(model)["mdm/gflops"] > model_costs(phase_module(tiny_config(tmp_path), "nested", 1))["mdm/gflops"]
    samples = generate(cfg, [model], 6, bank)
    assert samples.images.shape == (6, 8, 8, 1) and len(samples.captions) == 6
    assert all(c in bank.captions[k] for c, k in zip(samples.captions, samples.caption_classes))
    g = torch.Generator().manual_seed(1)
    zeros, ones = (caption_tokens(bank, torch.full((3,), k), g)[0] for k in (0, 1))
    same_noise = [sample_images(cfg, model, 3, generator=torch.Generator().manual_seed(2), **text)[-1]
                  for text in (zeros, ones)]
    assert not torch.allclose(*same_noise)
