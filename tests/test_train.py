import dataclasses
import math

import pytest
import torch
from conftest import needs_fashion, write_coco

from nds.config import REPO_ROOT, load_config
from nds.config.specs import patch_size_for
from nds.diffusion.chain import nested_sample
from nds.diffusion.process import make_schedule
from nds.train.engine import EMA, build_level_model, deepspeed_config
from nds.train.inputs import LevelData


def test_patch_size_keeps_token_grid_small():
    assert patch_size_for(28, 28, 8) == 4
    assert patch_size_for(32, 32, 16) == 2
    assert patch_size_for(4, 4, 8) == 1
    assert patch_size_for(6, 6, 8) == 1
    with pytest.raises(ValueError, match="9x16"):
        patch_size_for(9, 16, 8)  # no common divisor but 1, and 16 > 8


def test_each_level_model_matches_its_spec():
    cfg = load_config(None, ["hierarchy.spec='28x28x1, 4x4x32, 2x2x16'", "hierarchy.L=3", "model.width=32",
                             "model.depth=2", "model.heads=2"])
    bottom, middle, top = (build_level_model(cfg, level) for level in (1, 2, 3))
    assert bottom.input_shape == (28, 28, 1) and bottom.cond_shape == (4, 4, 32)
    assert middle.input_shape == (4, 4, 32) and middle.cond_shape == (2, 2, 16)
    assert top.input_shape == (2, 2, 16) and top.cond_shape is None
    out = bottom(torch.randn(2, 1, 28, 28), torch.tensor([1, 500]), cond=torch.randn(2, 32, 4, 4))
    assert out.shape == (2, 1, 28, 28)


def test_deepspeed_config_follows_training_config():
    cfg = load_config(None, ["training.zero_stage=3", "training.batch_size=8", "training.lr=0.01"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["optimizer"]["params"]["lr"] == 0.01 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["scheduler"]["params"]["warmup_max_lr"] == 0.01


def test_ema_warms_up_tracks_and_round_trips():
    module = torch.nn.Linear(2, 2)
    ema = EMA(0.999)
    ema.update(module)
    assert torch.equal(ema.shadow["weight"], module.weight.detach())
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)  # decay (1+2)/(10+2) = 0.25 early on, not 0.999
    expected = module.weight.detach() - 1.0 + 0.75
    torch.testing.assert_close(ema.shadow["weight"], expected)
    clone = EMA(0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 2 and torch.equal(clone.shadow["weight"], ema.shadow["weight"])
    last = EMA(0.0)
    last.update(module)
    assert torch.equal(last.shadow["weight"], module.weight.detach())


def test_auto_precision_is_measured_once_and_leaves_the_random_state(tmp_path):
    from nds.config import replace
    from nds.diffusion.process import diffusion_loss
    from nds.train.engine import PRECISION_MARGIN, resolve_precision

    cfg = load_config(None, ["hierarchy.spec='8x8x1, 2x2x8'", "hierarchy.L=1", "model.width=16", "model.depth=2",
                             "model.heads=2", "training.batch_size=4", f"paths.runs_dir={tmp_path}"])
    model = build_level_model(cfg, 1)
    x0 = torch.randn(4, 1, 8, 8)
    alphas = make_schedule("linear", 1000)

    def probe(module, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return diffusion_loss(lambda x, t: module(x, t), x0, alphas, generator=torch.Generator().manual_seed(0))

    state = torch.get_rng_state()
    first = resolve_precision(cfg, model, probe, torch.device("cpu"), rank=0)
    assert torch.equal(torch.get_rng_state(), state)  # a measured fit draws what an unmeasured one would
    assert first["precision"] in ("fp32", "bf16") and first["fp32_s"] > 0 and first["bf16_s"] > 0
    assert (first["precision"] == "bf16") == (first["bf16_s"] <= PRECISION_MARGIN * first["fp32_s"])
    again = resolve_precision(cfg, model, probe, torch.device("cpu"), rank=0)
    assert again == {**first, "cached": True}
    assert resolve_precision(replace(cfg, **{"training.precision": "fp32"}), model, probe, torch.device("cpu"), 0) == \
        {"precision": "fp32"}


@pytest.mark.slow
@pytest.mark.parametrize("data", [pytest.param("fashion_mnist", marks=needs_fashion), "coco2014"])
def test_text_conditional_level_trains_on_ray_deepspeed_and_samples_with_captions(data, tmp_path):
    """Level 1 of a two-level chain, conditioned on ẑ_2 and on MiniLM captions, made from the class
    names (Fashion-MNIST) or each image's own (a tiny COCO tree, encoded in the Train worker): the
    real path (a Ray Train worker running DeepSpeed ZeRO-2 on gloo), two steps."""
    import ray

    from nds.latents.prepare import prepare_latents
    from nds.latents.text import prepare_text_condition
    from nds.sweep.runtime import init_ray
    from nds.train.engine import train_level

    if data == "fashion_mnist":
        dataset, shape, groups = [], (28, 28, 1), torch.tensor([0, 7, 9])  # T-shirt/top, sneaker, ankle boot
    else:
        write_coco(tmp_path / "coco")
        dataset, shape, groups = [f"data.root={tmp_path / 'coco'}"], (8, 8, 3), torch.tensor([0, 1, 2])  # images
    h, w, c = shape
    cfg = load_config(None, [
        f"data.name={data}", *dataset, "data.train_limit=64", "data.eval_limit=8", "encoder.name=random_cnn",
        "encoder.image_size=32", f"hierarchy.spec='{h}x{w}x{c}, 4x4x8'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]",
        "model.width=32", "model.depth=2", "model.heads=2", "model.text_encoder=minilm",
        "training.steps=2", "training.batch_size=8", "training.warmup_steps=1", "training.log_every=2",
        "training.checkpoint_every=2", "diffusion.sample_steps=3", "diffusion.cfg_scale=2.0",
        f"paths.runs_dir={tmp_path}", f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}",
    ])
    prepared = prepare_latents(cfg)
    bank = prepare_text_condition(cfg, prepared.class_names, prepared.captions)
    init_ray(cfg)
    try:
        refs = LevelData({level: ray.put(z) for level, z in prepared.latents.items()}, ray.put(prepared.labels))
        with pytest.raises(ValueError, match="model.text_encoder='minilm' but the level data has no caption bank"):
            train_level(cfg, 1, refs, run_name="text-level1")
        result = train_level(cfg, 1, dataclasses.replace(refs, text=ray.put(bank)), run_name="text-level1")
    finally:
        ray.shutdown()

    model = result.model
    assert result.level == 1 and math.isfinite(result.final_loss)
    assert model.text_dim == bank.example()[0].shape[-1] == 384 and model.cond_shape == (4, 4, 8)
    alphas = make_schedule("linear", cfg.diffusion.timesteps)
    chain = {1: model, 2: build_level_model(cfg, 2).eval()}
    samples = nested_sample(chain, {2: 0.5}, 3, alphas, 3, cfg_scale=2.0, seed=(0,),
                            text=bank.sample(groups, torch.Generator().manual_seed(0))[:2])
    assert samples[1].shape == (3, c, h, w) and torch.isfinite(samples[1]).all()
    x, t, cond = torch.randn(3, c, h, w), torch.full((3,), 500), torch.randn(3, 8, 4, 4)
    keep = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        outs = [model(x, t, cond=cond, drop_cond=keep, text=tokens, text_mask=mask)
                for tokens, mask, _ in (bank.sample(groups), bank.sample(groups.flip(0)))]
    assert not torch.allclose(outs[0], outs[1])  # the trained level listens to the caption


def test_each_rank_and_step_has_its_own_draws():
    from nds.train.engine import step_generator

    def draws(rank, step):
        return torch.randn(4, generator=step_generator(0, 1, rank, step))

    assert torch.equal(draws(0, 5), draws(0, 5))  # a resumed step draws what the first attempt drew
    assert not torch.equal(draws(0, 5), draws(1, 5)) and not torch.equal(draws(0, 5), draws(0, 6))


@pytest.mark.slow
def test_a_resumed_fit_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    """Two workers; the drilled fit dies at step 4 and resumes from the step-4 checkpoint. Every draw
    (batch, t, ε, σ-noise, condition drops) is keyed by (seed, level, rank, step), so the resumed fit
    repeats nothing and misses nothing: its EMA weights equal the uninterrupted fit's exactly, under
    ZeRO-2 and under ZeRO-3 (where each rank averages only its partition and the checkpoint holds
    that rank's share). With the EMA off, the weights a ZeRO-3 fit exports from its partitions are
    the ones DeepSpeed's own zero_to_fp32 rebuilds from the checkpoint."""
    import ray
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from nds.config import replace
    from nds.latents.prepare import prepare_latents
    from nds.sweep.runtime import init_ray
    from nds.train.engine import train_level

    cfg = load_config(None, [
        "data.name=digits", "data.train_limit=64", "data.eval_limit=8", "encoder.name=random_cnn",
        "encoder.image_size=32", "hierarchy.spec='8x8x1, 2x2x8'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]",
        "model.width=16", "model.depth=2", "model.heads=2", "training.steps=6", "training.batch_size=8",
        "training.warmup_steps=1", "training.log_every=2", "training.checkpoint_every=2",
        "resources.workers_per_level=2", "resources.cpus_per_worker=0.45",
        f"paths.runs_dir={tmp_path}", f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}",
    ])
    prepared = prepare_latents(cfg)
    init_ray(cfg)
    weights = {}
    try:
        refs = LevelData({level: ray.put(z) for level, z in prepared.latents.items()}, ray.put(prepared.labels))
        for stage in (2, 3):
            staged = replace(cfg, **{"training.zero_stage": stage})
            drill = replace(staged, **{"training.fail_once_at_step": 4, "training.max_failures": 1})
            for name, run_cfg in (("plain", staged), ("drilled", drill)):
                weights[name, stage] = train_level(run_cfg, 1, refs, run_name=f"{name}-zero{stage}").model.state_dict()
        last = train_level(replace(cfg, **{"training.zero_stage": 3, "training.ema_decay": 0.0}), 1, refs,
                           run_name="last-zero3")
    finally:
        ray.shutdown()
    for stage in (2, 3):
        for name, value in weights["plain", stage].items():
            assert torch.equal(value, weights["drilled", stage][name]), (stage, name)
    rebuilt = get_fp32_state_dict_from_zero_checkpoint(last.checkpoint_path, tag="ckpt")
    exported = last.model.state_dict()
    assert rebuilt.keys() == exported.keys()
    for name, value in rebuilt.items():
        assert torch.equal(value, exported[name]), name


def test_progress_lines_say_how_far_a_fit_is_and_ray_trains_report_lines_are_quieted():
    import logging

    from ray.train.v2._internal.execution import context

    from nds.train.engine import progress_line, quiet_worker_logs

    line = progress_line("level1", 300, 1500, 100, 0.27341, 100.0)  # 200 steps in 100 s, 1,200 to go
    assert line == "[nds] level1: step 300/1500 (20%), loss 0.2734, 2.0 steps/s, ETA 10.0 min"
    assert progress_line("level1", 1500, 1500, 0, 0.2, 60.0).endswith("25.0 steps/s, done")
    quiet_worker_logs()
    assert not logging.getLogger(context.__file__).isEnabledFor(logging.INFO)


def test_resume_takes_the_newest_checkpoint_every_rank_finished(tmp_path):
    from nds.train.engine import newest_complete_checkpoint

    def checkpoint(name: str, ranks: list[int], latest: bool = True) -> None:
        ckpt = tmp_path / name / "ckpt"
        ckpt.mkdir(parents=True)
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x")
        for r in ranks:
            (ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
        if latest:
            (tmp_path / name / "latest").write_text("ckpt")

    assert newest_complete_checkpoint(tmp_path, world_size=2) is None
    checkpoint("checkpoint_2026-12-02_04-28-46.615509", [0, 1])
    checkpoint("checkpoint_2026-12-02_04-29-10.000001", [0])  # rank 1 died before its shard was written
    checkpoint("checkpoint_2026-12-02_04-29-20.000001", [0, 1], latest=False)  # still being written
    assert newest_complete_checkpoint(tmp_path, 2).name == "checkpoint_2026-12-02_04-28-46.615509"
    checkpoint("checkpoint_2026-12-02_04-30-00.000001", [0, 1])
    assert newest_complete_checkpoint(tmp_path, 2).name == "checkpoint_2026-12-02_04-30-00.000001"
