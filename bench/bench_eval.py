"""Evaluation against training throughput of the same chain, printed as one JSON object (issue 14).

A chain trial spends its evaluation sampling ``eval.num_samples`` images top-down through its L levels
(``diffusion.sample_steps`` solver steps each, guidance doubling the batch) and scoring them; its
training fits each level for ``training.steps`` batches. This times both per image on this machine for
a U-ViT size: evaluation images/s through the whole chain (sampling, then every metric) and training
images/s (forward, backward and AdamW step of each level in turn, batch ``training.batch_size``), and
their ratio: how many training images one evaluated image costs, which says how much of a trial's time
its evaluation takes next to its training (a trial trains steps x batch images, evaluates num_samples).
Weights are random: the cost of a forward does not depend on them.

With ``--shards 1 2`` it also times the sweep's sharded evaluation (``nds.eval.evaluate.sample_shard``
as Ray tasks of one CPU each, the batches split as ``resources.eval_workers`` splits them) on a local
Ray instance: images/s per shard count and the speed-up over one shard.

Usage: python bench/bench_eval.py [key=value ...] [--threads N] [--sizes tiny small] [--samples N] [--shards 1 2]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nds.config import load_config, replace  # noqa: E402
from nds.diffusion.chain import sample_levels  # noqa: E402
from nds.diffusion.process import diffusion_loss, make_schedule  # noqa: E402
from nds.eval.data_classifier import DataClassifier  # noqa: E402
from nds.eval.metrics import images_quality, reference_stats  # noqa: E402
from nds.latents.hierarchy import add_condition_noise, images_from_level1  # noqa: E402
from nds.train.engine import build_level_model  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def training_images_per_s(cfg, models: dict, steps: int = 3) -> float:
    """One AdamW step per level per round, on random latents of each level's shape (first round: warm-up)."""
    alphas = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    batch, seconds = cfg.training.batch_size, 0.0
    for level, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr)
        shape = cfg.levels[level - 1]
        above = cfg.levels[level] if level < cfg.hierarchy.L else None
        for step in range(steps + 1):
            x0 = torch.randn(batch, shape.c, shape.h, shape.w)
            cond = None if above is None else add_condition_noise(torch.randn(batch, above.c, above.h, above.w),
                                                                   cfg.sigma(level + 1))

            def one_step():
                loss = diffusion_loss(lambda x, t: model(x, t, cond=cond), x0, alphas, prediction=cfg.diffusion.prediction)
                opt.zero_grad()
                loss.backward()
                opt.step()

            _, took = timed(one_step)
            seconds += took if step else 0.0
        model.eval()
    return batch * steps / seconds  # images through every level, per second


def run(cfg, samples: int) -> dict:
    torch.manual_seed(0)
    models = {level: build_level_model(cfg, level).eval() for level in range(1, cfg.hierarchy.L + 1)}
    reference = np.random.default_rng(0).integers(0, 256, size=(samples, 28, 28, 1), dtype=np.uint8)
    classifier = DataClassifier(1, 10, 28).eval()
    e = cfg.eval
    stats = reference_stats(reference, e.inception_dir, e.substitute_image_size, e.batch_size, classifier)
    with torch.no_grad():
        levels, sampling = timed(lambda: sample_levels(cfg, models, samples))
    images = images_from_level1(levels[1])
    _, scoring = timed(lambda: images_quality(images, stats, e.inception_dir, e.substitute_image_size, e.batch_size,
                                              classifier))
    train_rate = training_images_per_s(cfg, models)
    eval_rate = samples / (sampling + scoring)
    return {"size": cfg.model.size, "L": cfg.hierarchy.L, "cfg_scale": cfg.diffusion.cfg_scale,
            "sample_steps": cfg.diffusion.sample_steps, "samples": samples,
            "sampling_images_per_s": round(samples / sampling, 2), "scoring_images_per_s": round(samples / scoring, 2),
            "eval_images_per_s": round(eval_rate, 2), "train_images_per_s": round(train_rate, 2),
            # one evaluated image costs the time of training on this many images
            "eval_image_in_training_images": round(train_rate / eval_rate, 1)}


def shard_scaling(cfg, samples: int, shard_counts: list[int]) -> dict:
    """Sampling and scoring ``samples`` images in 1, 2, ... Ray tasks (one CPU each); a warm-up round
    first, so each worker process has imported torch and built its feature network once."""
    import ray

    from nds.diffusion.chain import sample_batches
    from nds.eval.evaluate import merge_shards, sample_shard

    cfg = replace(cfg, **{"eval.num_samples": samples})
    torch.manual_seed(0)
    models = {level: build_level_model(cfg, level).eval() for level in range(1, cfg.hierarchy.L + 1)}
    classifier = DataClassifier(1, 10, 28).eval()
    reference = np.random.default_rng(0).integers(0, 256, size=(samples, 28, 28, 1), dtype=np.uint8)
    e = cfg.eval
    state = {"classifier": classifier,
             "ref_stats": reference_stats(reference, e.inception_dir, e.substitute_image_size, e.batch_size, classifier)}
    ray.init(num_cpus=max(shard_counts), include_dashboard=False)
    try:
        shard = ray.remote(num_cpus=1)(sample_shard)
        refs = [ray.put(x) for x in (cfg, models, state)]

        def evaluate(shards: int):
            return merge_shards(ray.get([shard.remote(*refs, firsts)
                                         for firsts in sample_batches(samples, e.batch_size, shards)]))

        evaluate(max(shard_counts))  # warm-up
        rates = {}
        for shards in shard_counts:
            _, took = timed(lambda: evaluate(shards))
            rates[shards] = samples / took
    finally:
        ray.shutdown()
    base = rates[shard_counts[0]]
    return {"size": cfg.model.size, "samples": samples, "eval_batch_size": e.batch_size,
            "images_per_s": {str(k): round(v, 2) for k, v in rates.items()},
            "speedup_over_first": {str(k): round(v / base, 2) for k, v in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--shards", nargs="*", type=int, default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, ["hierarchy.L=2", *args.overrides])
    runs = [run(replace(cfg, **{"model.size": size}), args.samples) for size in args.sizes]
    out = {"threads": args.threads, "runs": runs}
    if args.shards:
        out["shards"] = [shard_scaling(replace(cfg, **{"model.size": size}), args.samples, args.shards)
                         for size in args.sizes]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
