"""Fig. 3: K nearest neighbours by each hierarchy level's features, encoders side by side.

    python experiments/knn_figure.py [--config FILE] [key=value ...] \\
        [--encoders efficientnet_lite0 vae@32] [--weights vae=PATH | --fit-vae-steps 600] \\
        [--levels 4x4x32,2x2x16,1x1x8] [--queries 4] [-k 6] [--out PNG]

Queries come from the test split, neighbours from the training split (``data.*`` limits).
Each encoder is ``NAME[@IMAGE_SIZE]`` (default size: ``encoder.image_size``); features come
from the shared feature cache, so an encoder already used by a sweep is not run again.
Levels a map cannot hold are cut to it (a VAE bottleneck has 4 channels).  Offline there is
no SD-VAE file: ``--fit-vae-steps N`` trains a small SD-architecture KL-VAE on the training
images (cached under the cache dir) and the figure says so.  The PNG and each level's
label agreement (neighbours sharing the query's class, over every test image) go to MLflow.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from nds import tracking
from nds.config import Config, ConfigError, config_hash, load_config
from nds.config.arguments import add_config_arguments, config_file, config_help
from nds.config.specs import parse_spec
from nds.eval.knn import Panel, encoder_panel, render_figure
from nds.latents.encoders import RANDOM_WEIGHTS, EncoderSpec
from nds.latents.hierarchy import FeatureCache, cached_features
from nds.latents.prepare import dataset_key, extraction_args, load_split
from nds.tracking import RunKind, Tag

SMALL_VAE = {"block_out_channels": (16, 32, 64), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 16}
SMALL_VAE_BATCH = 32
log = logging.getLogger("knn_figure")


def small_vae_weights(cfg: Config, images: np.ndarray, image_size: int, steps: int) -> Path:
    """A small KL-VAE trained on the training images, cached by what determines it."""
    from nds.latents.vae import VAEConfig, save_autoencoder, train_autoencoder

    vae_cfg = VAEConfig(**SMALL_VAE)
    key = config_hash({"data": dataset_key(cfg, "train", cfg.data.train_limit), "vae": SMALL_VAE, "batch": SMALL_VAE_BATCH,
                       "image_size": image_size, "steps": steps, "seed": cfg.seed})
    path = cfg.cache_dir / "vae" / f"small-kl-vae-{key}.safetensors"
    if not path.is_file():
        log.info("training a small KL-VAE (%d steps, %d px) on %d training images", steps, image_size, len(images))
        save_autoencoder(train_autoencoder(np.asarray(images), vae_cfg, image_size, steps, SMALL_VAE_BATCH,
                                                 seed=cfg.seed), path)
    return path


def spread_queries(labels: np.ndarray, n: int) -> np.ndarray:
    """The first test image of n different classes (spread over the label range)."""
    classes = np.unique(labels)
    picked = classes[np.linspace(0, len(classes) - 1, min(n, len(classes))).round().astype(int)]
    return np.array([np.flatnonzero(labels == c)[0] for c in picked])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "vae@32"], help="NAME[@SIZE] each")
    parser.add_argument("--weights", action="append", default=[], help="NAME=PATH: a local weights file for NAME")
    parser.add_argument("--fit-vae-steps", type=int, default=0, help="train a small KL-VAE for 'vae' without weights")
    parser.add_argument("--levels", default="", help="levels >= 2 to compare (default: hierarchy.spec without level 1)")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("-k", type=int, default=6)
    parser.add_argument("--out", default="", help="PNG path (default: <runs_dir>/figures/knn_<encoders>.png)")
    parser.add_argument("--experiment", default="nds-knn-figure", help="MLflow experiment")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.train_limit=2000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[nds] %(message)s")
    try:
        helped = config_help(args)
        if helped is not None:
            print(helped)
            return 0
        cfg = load_config(config_file(args), args.overrides)
        weights = dict(w.split("=", 1) for w in args.weights)
        levels = parse_spec(args.levels) if args.levels else parse_spec(cfg.hierarchy.spec)[1:]
        if not levels:
            raise ConfigError("no levels to compare: pass --levels or a hierarchy.spec with levels >= 2")
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    train = load_split(cfg, "train", cfg.data.train_limit)
    test = load_split(cfg, "test", cfg.data.eval_limit)
    cache = FeatureCache(cfg.cache_dir)
    channels = train.images.shape[-1]
    panels: list[Panel] = []
    for entry in args.encoders:
        name, _, size = entry.partition("@")
        size = int(size) if size else cfg.encoder.image_size
        label, path = name, weights.get(name)
        if path == RANDOM_WEIGHTS:
            label = f"{name}-random-init"  # never shown or logged as a pretrained encoder
        elif name == "vae" and path is None and args.fit_vae_steps:
            path = str(small_vae_weights(cfg, train.images, size, args.fit_vae_steps))
            label = f"vae (small KL-VAE, {args.fit_vae_steps} steps on {cfg.data.name})"
        spec = EncoderSpec(name, size, path, channels, cfg.encoder.cache_dir or None)
        try:
            bank = cached_features(cache, spec, dataset_key(cfg, "train", cfg.data.train_limit), train.images,
                                   **extraction_args(cfg))
            queries = cached_features(cache, spec, dataset_key(cfg, "test", cfg.data.eval_limit), test.images,
                                      **extraction_args(cfg))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        panels.append(encoder_panel(f"{label} @{size}px", levels, np.asarray(bank), np.asarray(queries), args.k,
                                    train.labels, test.labels))

    shown = spread_queries(test.labels, args.queries)
    figure_panels = [Panel(p.name, p.levels, [n[shown] for n in p.neighbours], p.agreement) for p in panels]
    tag = "_vs_".join(e.replace("@", "") for e in args.encoders)
    out = Path(args.out) if args.out else cfg.runs_dir / "figures" / f"knn_{cfg.data.name}_{tag}.png"
    render_figure(np.asarray(test.images[shown]), train.images, figure_panels, out,
                  title=f"{cfg.data.name}: {args.k} nearest training images of test queries, by level")

    metrics = {f"knn.{p.name.split()[0]}.{lv}.label_agreement": a
               for p in panels for lv, a in zip(p.levels, p.agreement)}
    uri = cfg.tracking_uri
    experiment_id = tracking.prepare_experiment(uri, args.experiment, cfg.runs_dir / "mlartifacts")
    with tracking.open_run(uri, experiment_id, f"knn-{tag}", tags={Tag.KIND: RunKind.KNN_FIGURE}, params={
        "encoders": " | ".join(p.name for p in panels), "levels": args.levels or cfg.hierarchy.spec, "k": args.k,
        "data.name": cfg.data.name, "data.train_limit": cfg.data.train_limit, "data.eval_limit": cfg.data.eval_limit,
    }) as run_id:
        tracking.log_metrics(uri, run_id, metrics)
        tracking.log_artifact(uri, run_id, out)
    print(json.dumps({"figure": str(out), "mlflow_run_id": run_id, "label_agreement": metrics}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
