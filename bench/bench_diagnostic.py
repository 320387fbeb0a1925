"""What the chain diagnostic (nds.eval.diagnostics) adds to a trial's evaluation, printed as one JSON object.

A trial with L > 1 samples ``eval.num_samples`` images through its chain and scores them with every
metric; the diagnostic then samples level 1 (and the levels below each l < L) again from the true and
from the null condition on ``eval.diagnostic_samples`` held-out latents, scores those with the ranking
metric only, and compares the latent levels in z space. This times both on the default config's
chain (28x28x1 <- 4x4x32, the tiny U-ViT) at guidance 1 and at a guided scale (the conditional and
unconditional branches then run as one doubled batch, which doubles sampling but not the null
column). Weights are random: the cost of a forward does not depend on them. The data classifier is
an untrained instance of the metric's network, for the same reason.

Targets (issue 12): the diagnostic costs at most +50% of the trial's own sampling.

Usage: python bench/bench_diagnostic.py [--threads N] [key=value ...]   (config overrides)
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
from nds.eval.data_classifier import DataClassifier  # noqa: E402
from nds.eval.diagnostics import chain_diagnostic, latent_stats  # noqa: E402
from nds.eval.metrics import DATA_CLASSIFIER, images_quality, reference_stats  # noqa: E402
from nds.latents.hierarchy import images_from_level1  # noqa: E402
from nds.train.engine import build_level_model  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(cfg) -> dict:
    torch.manual_seed(0)
    models = {level: build_level_model(cfg, level).eval() for level in (1, 2)}
    rng = np.random.default_rng(0)
    n_ref = cfg.eval.num_samples
    reference = rng.integers(0, 256, size=(n_ref, 28, 28, 1), dtype=np.uint8)
    held_out = {2: rng.normal(size=(n_ref, 32, 4, 4)).astype(np.float32)}
    train = {2: rng.normal(size=(n_ref, 32, 4, 4)).astype(np.float32)}
    classifier = DataClassifier(1, 10, 28).eval()
    e = cfg.eval
    stats = reference_stats(reference, e.inception_dir, e.substitute_image_size, e.batch_size, classifier)

    def score_all(images):
        return images_quality(images, stats, e.inception_dir, e.substitute_image_size, e.batch_size, classifier)

    def score_ranking(images):
        return images_quality(images, stats, e.inception_dir, e.substitute_image_size, e.batch_size, classifier,
                              names=(DATA_CLASSIFIER,))[DATA_CLASSIFIER]

    levels, sampling = timed(lambda: sample_levels(cfg, models, e.num_samples))
    images = images_from_level1(levels[1])
    _, scoring = timed(lambda: score_all(images))

    def diagnostic():
        latent_stats(levels, held_out, train)
        n = min(e.diagnostic_samples, e.num_samples)
        return {**chain_diagnostic(cfg, models, DATA_CLASSIFIER, score_ranking, images_from_level1, held_out),
                "sampled": score_ranking(images[:n])}

    _, diag = timed(diagnostic)
    return {"cfg_scale": cfg.diffusion.cfg_scale, "num_samples": e.num_samples,
            "diagnostic_samples": e.diagnostic_samples, "sampling_s": round(sampling, 2),
            "scoring_s": round(scoring, 2), "diagnostic_s": round(diag, 2),
            "diagnostic_vs_sampling": round(diag / sampling, 3),
            "diagnostic_vs_sampling_and_scoring": round(diag / (sampling + scoring), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, ["hierarchy.L=2", *args.overrides])
    guided = cfg.diffusion.cfg_scale if cfg.diffusion.cfg_scale != 1.0 else 3.0
    results = [run(replace(cfg, **{"diffusion.cfg_scale": scale})) for scale in (1.0, guided)]
    print(json.dumps({"threads": args.threads, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
