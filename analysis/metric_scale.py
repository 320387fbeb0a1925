"""Where the sample-quality metric's numbers sit: the same metric, on the same reference images a
sweep uses, for image sets whose quality is known (real images, degraded real images, noise).

    python analysis/metric_scale.py [--config FILE] [--n N] [key=value ...]

Prints JSON {metric (the one sweeps rank by), reference, data_classifier_accuracy, scores: {set: {metric: value}}}. A sweep's cell is only meaningful against
this scale: e.g. a chain whose samples score near "uniform noise" has not learned the data yet.
"""

import argparse
import json

import numpy as np

from nds.config import load_config
from nds.config.arguments import add_config_arguments, config_file, config_help
from nds.eval.evaluate import prepare_metric, score_images
from nds.eval.metrics import quality_metric_name
from nds.latents.prepare import load_split


def degraded_sets(real: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Image sets of known quality, all uint8 [N, H, W, C] like ``real``."""
    rng = np.random.default_rng(seed)
    n, h, w, c = real.shape
    block = 4 if h % 4 == 0 and w % 4 == 0 else 1  # 'blocky': averaged over 4x4 blocks and repeated back
    blocky = real.reshape(n, h // block, block, w // block, block, c).mean(axis=(2, 4))
    blocky = np.repeat(np.repeat(blocky, block, axis=1), block, axis=2).round().astype(np.uint8)
    noisy = np.clip(real + rng.normal(0, 64, real.shape), 0, 255).astype(np.uint8)
    mean_image = np.broadcast_to(real.mean(axis=0).round().astype(np.uint8), real.shape)
    return {
        "real (training split)": real,
        "real + Gaussian noise (std 64/255)": noisy,
        f"real, {block}x{block} blocks": blocky,
        "the mean image, repeated": np.ascontiguousarray(mean_image),
        "uniform noise": rng.integers(0, 256, real.shape, dtype=np.uint8),
        "salt and pepper": (rng.random(real.shape) < 0.5).astype(np.uint8) * 255,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--n", type=int, default=0, help="images per set (default: eval.num_samples)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    helped = config_help(args)
    if helped is not None:
        print(helped)
        return {}
    cfg = load_config(config_file(args), args.overrides)
    n = args.n or cfg.eval.num_samples
    reference = np.asarray(load_split(cfg, "test", cfg.data.eval_limit).images)
    state = prepare_metric(cfg, reference)
    real = np.asarray(load_split(cfg, "train", n).images)
    scores = {name: score_images(cfg, images, state) for name, images in degraded_sets(real).items()}
    metric = quality_metric_name(cfg.eval.inception_dir, cfg.uses_data_classifier)
    result = {"metric": metric, "reference": f"{cfg.data.name} test split, {len(reference)} images",
              "images_per_set": len(real), "data_classifier_accuracy": state["classifier_accuracy"],
              "scores": {name: {m: round(v, 2) for m, v in s.items()} for name, s in scores.items()}}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
