"""Matryoshka Diffusion: one NestedUNet trained progressively through Ray Train + DeepSpeed ZeRO,
and MDM's controlled baselines trained the same way (MDM §4.1).

The phase schedule (``mdm.phase_steps``) runs as one TorchTrainer fit per phase, in order. Phase k
builds its model by ``grow``ing the previous phase's EMA weights (the new outer stage starts fresh
and joins the inner network through zero-initialised convs, so what was learned is kept), trains its
steps with a fresh optimiser and warm-up, and reports checkpoints exactly as a U-ViT level does
(nds.train.engine): the run name is stable per phase, so a restarted worker resumes its own phase.

What ``mdm.baseline`` trains, at the NestedUNet's size and iteration budget (``baseline_phases``):

- ``nested``: the NestedUNet on the progressive schedule above.

- ``plain``: the plain UNet of the same blocks (spec ``nested=False``: input and output at the full
  resolution only), one phase of all the schedule's iterations. MDM's "Simple DM".
- ``cascaded``: a two-stage cascade (Ho et al. 2022b, as MDM App. E.1 builds it). Stage 1 is the
  NestedUNet's innermost UNet alone, trained on downsampled images for the iterations the schedule
  spends before its last phase (MDM's cascade starts from the same low-resolution model). Stage 2,
  trained separately for the last phase's iterations, is the plain UNet of the same size with the
  low-resolution image, upsampled and noise-augmented, as an extra input (spec ``cond_channels``)
  and its noise level embedded. Sampling runs stage 1, then stage 2 conditioned on its samples
  noised to a fixed level (``CASCADE_NOISE_LEVEL``), so a cascade takes twice the steps.
- ``latent``: MDM's LDM (App. E.2): the NestedUNet's innermost UNet (its "64x64 low resolution
  model") at the code size of a frozen autoencoder (``mdm.vae_weights``), one phase of all the
  schedule's iterations on the codes (the posterior mean: the same codes the paper precomputes,
  computed per batch on the worker here), decoded to images after sampling.

A whole run under MLflow (``run_mdm``) and the MDM trial kind of a sweep live in ``nds.sweep.mdm``:
trainers know nothing of sweeps.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nds.config import Config, ConfigError, from_dict, to_dict
from nds.config.specs import LevelShape, Phase, baseline_phases, latent_spec, mdm_spec
from nds.data import load_config_split
from nds.diffusion.chain import noise_schedule, seeded_batches
from nds.diffusion.process import draw_timesteps
from nds.latents.hierarchy import image_level, images_from_level1
from nds.latents.text import MAX_CAPTION_TOKENS, TextBank, prepare_text_condition, sampling_groups, text_width
from nds.latents.vae import load_autoencoder
from nds.models.nested_unet import (
    NestedUNet,
    downsample_pyramid,
    grow,
    mdm_sample,
    multires_loss,
    noised_upsample,
    resolution_schedules,
)
from nds.models.uvit import count_params, forward_flops
from nds.train.engine import (
    batch_indices,
    bf16_autocast,
    condition_drops,
    fit,
    load_ema_weights,
    quiet_worker_logs,
    step_generator,
    train_worker,
    worker_device,
)

# The cascade's conditioning noise at sampling time, as a fraction of diffusion.timesteps. MDM App. E.1
# sweeps {1, 100, 500, 700, 1000} of 1000 and finds that 500 or 700 is needed; one level is used here.
CASCADE_NOISE_LEVEL = 0.5


def phase_name(phase: Phase) -> str:
    """Named by its position in mdm.phase_steps, so skipped phases do not renumber the others."""
    return f"phase{phase.levels}"


def caption_width(cfg: Config) -> int:
    """The width of the caption tokens a config's NestedUNet attends to (0: no text)."""
    encoder = cfg.model.text_encoder
    return text_width(encoder, cfg.model.text_encoder_path or None) if encoder else 0


def phase_module(cfg: Config, baseline: str, index: int) -> NestedUNet:
    """A freshly initialised model of the architecture that phase ``index`` of ``baseline`` trains."""
    spec, phase = mdm_spec(cfg, caption_width(cfg)), baseline_phases(cfg, baseline)[index]
    if baseline == "plain":
        return NestedUNet(dataclasses.replace(spec, nested=False))
    if baseline == "cascaded" and index == 1:
        return NestedUNet(dataclasses.replace(spec, nested=False, cond_channels=spec.channels))
    if baseline == "latent":
        return NestedUNet(latent_spec(cfg, caption_width(cfg)))
    return NestedUNet(spec, phase.levels)


@functools.lru_cache(maxsize=2)
def latent_autoencoder(path: str):
    """The latent baseline's frozen autoencoder (loaded once per process)."""
    return load_autoencoder(Path(path).expanduser())


def encode_images(vae, x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [B, C, R, R] -> scaled codes; grey images enter an RGB autoencoder as RGB."""
    if x.shape[1] == 1 and vae.config.in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    with torch.no_grad():
        return vae.encode(x)


def decode_codes(vae, z: torch.Tensor, channels: int) -> torch.Tensor:
    """Scaled codes -> [-1, 1] images with the data's channels (an RGB autoencoder's output averaged to grey)."""
    with torch.no_grad():
        x = vae.decode(z).clamp(-1, 1)
    return x.mean(dim=1, keepdim=True) if channels == 1 and x.shape[1] != 1 else x


def prepare_images(cfg: Config) -> dict:
    """What the workers train on: ``images``, uint8 [N, H, W, C] (file datasets: decoded lazily, per
    batch, in the workers; ``model_input`` brings a batch to the full resolution); ``labels`` (None
    when unconditional); with ``model.text_encoder``, ``text``, the caption bank
    (nds.latents.text.prepare_text_condition: each image's own captions, or captions of its class), and
    ``text_groups``, the class of each image for a class-caption bank (else None)."""
    d, m = cfg.data, cfg.mdm
    data = load_config_split(cfg, "train", d.train_limit, d.image_size or m.resolutions[-1])
    channels = data.images.shape[-1]
    if channels != m.channels:
        raise ConfigError(f"mdm.channels={m.channels}, but data.name={d.name} has {channels}-channel images")
    if m.num_classes and data.labels.max() >= m.num_classes:
        raise ConfigError(f"mdm.num_classes={m.num_classes}, but data.name={d.name} has label {data.labels.max()}")
    bank = prepare_text_condition(cfg, data.class_names, data.captions)
    by_class = bank is not None and not bank.groups_are_images
    return {"images": data.images, "labels": data.labels.astype(np.int64) if m.num_classes else None,
            "text": bank, "text_groups": data.labels.astype(np.int64) if by_class else None}


def caption_tokens(bank: TextBank, groups: np.ndarray | torch.Tensor, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], list[str]]:
    """``text``/``text_mask`` of one caption per example of ``groups`` (classes or image indices), and the captions."""
    tokens, mask, captions = bank.sample(torch.as_tensor(groups, device=device), generator)
    return {"text": tokens, "text_mask": mask}, captions


def model_input(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, C, R, R] in [-1, 1] at the full resolution R."""
    images = np.asarray(images)
    return image_level(images, LevelShape(resolution, resolution, images.shape[-1]))


def reference_images(cfg: Config) -> np.ndarray:
    """The metric's reference: data.eval_limit images of eval.reference_split at the full resolution,
    uint8 [M, R, R, C]."""
    d, top = cfg.data, cfg.mdm.resolutions[-1]
    images = load_config_split(cfg, cfg.eval.reference_split, d.eval_limit, d.image_size or top).images
    if images.shape[1:3] == (top, top):
        return images
    return np.concatenate([images_from_level1(model_input(images[i : i + 1024], top)) for i in range(0, len(images), 1024)])


def phase_loop(loop_config: dict) -> None:
    """Runs inside each Ray Train worker: one phase of a baseline's schedule, up to step ``stop``."""
    import ray
    import ray.train

    quiet_worker_logs()
    cfg = from_dict(loop_config["config"])
    baseline, index = cfg.mdm.baseline, loop_config["phase"]
    phase = baseline_phases(cfg, baseline)[index]
    rank = ray.train.get_context().get_world_rank()
    device = worker_device(cfg)
    images, labels, bank, text_groups = (ray.get(loop_config[k]) if loop_config.get(k) is not None else None
                                         for k in ("images", "labels", "text", "text_groups"))

    torch.manual_seed(cfg.seed + 1000 * index)  # the same fresh outer stage on every rank
    if loop_config["previous_weights"] is not None:
        previous = phase_module(cfg, baseline, index - 1)
        previous.load_state_dict(ray.get(loop_config["previous_weights"]))
        model = grow(previous, phase.levels)
    else:
        model = phase_module(cfg, baseline, index)
    m = cfg.mdm
    top = m.resolutions[-1]
    alphas = noise_schedule(cfg).to(device)
    weights = [w for r, w in zip(m.resolutions, m.loss_weights or []) if r in model.io_resolutions] or None
    # a super-resolution stage's condition is noised on its own (full-resolution) schedule
    cond_schedule = resolution_schedules(alphas, [top], m.resolutions[0], m.snr_power)[0] if model.spec.cond_channels else None
    batch = cfg.training.batch_size
    vae = latent_autoencoder(m.vae_weights).to(device) if baseline == "latent" else None

    def batch_loss(module, step: int, bf16: bool):
        idx = batch_indices(cfg.seed, index, rank, step, len(images), batch)
        draws = step_generator(cfg.seed, index, rank, step)
        x = torch.as_tensor(model_input(images[idx], top), device=device)
        if vae is not None:
            x = encode_images(vae, x)
        conditions = {"labels": torch.as_tensor(labels[idx], device=device) if labels is not None else None,
                      "drop_cond": condition_drops(len(idx), m.cond_drop_prob, draws, device)}
        if bank is not None:  # a caption per example; the same drop nulls it, for guidance
            conditions.update(caption_tokens(bank, idx if bank.groups_are_images else text_groups[idx], draws, device)[0])
        if cond_schedule is not None:  # noise augmentation: a random level per example
            level = draw_timesteps(len(x), len(alphas), x, draws)
            low = downsample_pyramid(x, m.resolutions[:1], m.downsample)[0]
            conditions.update(cond_image=noised_upsample(low, top, level, cond_schedule, draws), cond_t=level)
        with bf16_autocast(bf16, device):
            loss, per_res = multires_loss(module, x, alphas, m.snr_power, weights, m.prediction, generator=draws,
                                          downsample=m.downsample, **conditions)
        return loss, {f"loss_{r}": float(v.detach()) for r, v in zip(model.io_resolutions, per_res)}

    train_worker(cfg, model, batch_loss, loop_config, device=device, rank=rank, name=phase_name(phase),
                 tags={"levels": phase.levels}, steps=loop_config["stop"])


@dataclass
class PhaseResult:
    phase: Phase
    model: NestedUNet  # the EMA weights, on CPU, in eval mode
    final_loss: float
    checkpoint_path: str


Evaluate = Callable[[int, list[NestedUNet]], None]


def train_phases(cfg: Config, data_refs: dict, run_prefix: str, mlflow_run: dict | None = None,
                 eval_at: Sequence[int] = (), evaluate: Evaluate | None = None) -> list[PhaseResult]:
    """Fit the phases of ``mdm.baseline`` in order; each phase's run is ``{run_prefix}-{phase_name}``, stable across retries.

    ``data_refs``: Ray object refs of what ``prepare_images`` returns (None where it returns None). A phase is
    fitted in pieces ending at the total iteration counts in ``eval_at`` that fall inside it; each
    piece is a fit of the phase's run that resumes the last piece's checkpoint (optimiser and EMA
    included), and ``evaluate(done, models)`` then gets the EMA models after ``done`` iterations in
    all: the latest of every phase so far.
    """
    import ray

    baseline = cfg.mdm.baseline
    results: list[PhaseResult] = []
    before = 0  # iterations of the earlier phases
    for index, phase in enumerate(baseline_phases(cfg, baseline)):
        grows = baseline == "nested" and index > 0
        loop_config = {
            "config": to_dict(cfg),
            "phase": index,
            **{k: data_refs.get(k) for k in ("images", "labels", "text", "text_groups")},
            "previous_weights": ray.put(results[-1].model.state_dict()) if grows else None,
            "mlflow": mlflow_run,
        }
        name = phase_name(phase)
        stops = sorted({s - before for s in eval_at if 0 < s - before < phase.steps} | {phase.steps})
        for stop in stops:
            result = fit(cfg, phase_loop, {**loop_config, "stop": stop}, f"{run_prefix}-{name}", what=f"MDM {name}")
            model = load_ema_weights(phase_module(cfg, baseline, index), result)
            if evaluate is not None and before + stop in eval_at:
                evaluate(before + stop, [r.model for r in results] + [model])
        results.append(PhaseResult(phase, model, float(result.metrics["loss"]), result.checkpoint.path))
        before += phase.steps
    return results


def forward_cost(net: NestedUNet) -> tuple[float, float]:
    """GFLOPs of one forward per example, and parameters. Counted at batch 2: a GroupNorm with one
    channel per group cannot normalise a single 1x1 feature map (a deep core's bottleneck)."""
    spec, top, b = net.spec, net.resolutions[-1], 2
    xs = [torch.zeros(b, spec.channels, r, r) for r in net.io_resolutions]
    conditions = {"labels": torch.zeros(b, dtype=torch.long)} if spec.num_classes else {}
    if spec.text_dim:  # captions padded to CLIP's context length
        conditions.update(text=torch.zeros(b, MAX_CAPTION_TOKENS, spec.text_dim),
                          text_mask=torch.ones(b, MAX_CAPTION_TOKENS, dtype=torch.bool))
    if spec.cond_channels:
        conditions.update(cond_image=torch.zeros(b, spec.cond_channels, top, top), cond_t=torch.zeros(b))
    return forward_flops(net, xs, torch.zeros(b), **conditions) / b / 1e9, float(count_params(net))


def model_costs(*models: NestedUNet) -> dict[str, float]:
    """GFLOPs of one forward (per example) and parameters of a trial's models together (``mdm/``: a
    cascade counts both stages, as every sample runs both) and of the plain UNet the size of the
    last one (``unet/``: the same blocks, input and output at the top resolution only)."""
    costs = [forward_cost(m) for m in models]
    last = models[-1]
    plain = NestedUNet(dataclasses.replace(last.spec, nested=False, cond_channels=0), last.levels)
    unet_gflops, unet_params = forward_cost(plain)
    return {"mdm/gflops": sum(c[0] for c in costs), "mdm/params": sum(c[1] for c in costs),
            "unet/gflops": unet_gflops, "unet/params": unet_params}


def sample_images(cfg: Config, model: NestedUNet, n: int, labels: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, **conditions: torch.Tensor) -> list[torch.Tensor]:
    """n samples of every resolution (innermost first); by default with a fixed seed and labels
    cycling over the classes. ``conditions``: a super-resolution stage's cond_image and cond_t."""
    d, m = cfg.diffusion, cfg.mdm
    alphas = noise_schedule(cfg)
    if labels is None and m.num_classes:
        labels = torch.arange(n) % m.num_classes
    extra = {"eta": d.eta} if m.sampler == "ddim" else {}
    pixels = m.baseline != "latent"  # thresholding bounds pixels in [-1, 1]; codes have no such range
    return mdm_sample(model, n, alphas, d.sample_steps, sampler=m.sampler, power=m.snr_power,
                      prediction=m.prediction, cfg_scale=d.cfg_scale, labels=labels,
                      threshold=(m.threshold or None) if pixels else None,
                      generator=generator or torch.Generator().manual_seed(cfg.seed), **conditions, **extra)


@dataclass
class Samples:
    images: np.ndarray  # uint8 [n, R, R, C]
    captions: list[str] | None  # what each image was conditioned on (text-conditional models)
    caption_classes: np.ndarray | None  # the class each caption names (a class-caption bank), else None


def generate_images(cfg: Config, models: list[NestedUNet], n: int, text_bank: TextBank | None = None) -> np.ndarray:
    """The images of :func:`generate`."""
    return generate(cfg, models, n, text_bank).images


def generate(cfg: Config, models: list[NestedUNet], n: int, text_bank: TextBank | None = None,
             firsts: Sequence[int] | None = None) -> Samples:
    """n full-resolution uint8 [n, R, R, C] images from ``mdm.baseline``'s latest models, in eval.batch_size
    batches, on the models' device (labels drawn at random, as MDM's FID protocol does; a
    text-conditional model gets a caption of a random class, or of a random training image for
    per-image captions). A model that does not reach the full resolution yet (an early phase, a
    cascade without its second stage) shows its top resolution upsampled: what it can offer at that
    point of training.

    Batch b's draws are keyed by (seed, b's first index), as a chain's are
    (``nds.diffusion.chain.sample_levels``): ``firsts`` (of ``sample_batches``) samples only those
    batches of the n, the same images as in the whole, so evaluation shards add up to one sampling."""
    d, m = cfg.diffusion, cfg.mdm
    top = m.resolutions[-1]
    alphas = noise_schedule(cfg)
    cond_schedule = resolution_schedules(alphas, [top], m.resolutions[0], m.snr_power)[0]
    cond_level = min(round(CASCADE_NOISE_LEVEL * d.timesteps), d.timesteps - 1)
    cascaded = cfg.mdm.baseline == "cascaded"
    first_model = models[0] if cascaded else models[-1]
    device = next(first_model.parameters()).device
    batches, captions, classes = [], [], []
    for _, size, generator in seeded_batches(cfg, n, firsts):
        labels = torch.randint(m.num_classes, (size,), generator=generator) if m.num_classes else None
        text = {}
        if text_bank is not None:
            groups = sampling_groups(text_bank, labels, size, generator)
            text, batch_captions = caption_tokens(text_bank, groups, generator, device)
            captions += batch_captions
            classes += [] if text_bank.groups_are_images else groups.tolist()
        labels = None if labels is None else labels.to(device)
        x = sample_images(cfg, first_model, size, labels, generator, **text)[-1]
        if m.baseline == "latent":
            x = decode_codes(latent_autoencoder(m.vae_weights).to(device), x, m.channels)
        else:
            x = x.clamp(-1, 1)
        if cascaded and len(models) == 2:
            level = torch.full((size,), cond_level, device=device)
            cond = noised_upsample(x, top, level, cond_schedule, generator)
            x = sample_images(cfg, models[1], size, labels, generator, cond_image=cond, cond_t=level, **text)[-1]
        if x.shape[-1] < top:
            x = F.interpolate(x, size=(top, top), mode="bilinear", align_corners=False)
        batches.append(images_from_level1(x))
    return Samples(np.concatenate(batches), captions or None, np.asarray(classes, dtype=np.int64) if classes else None)
