"""Benchmark the latent pipeline; prints one JSON object (about 2.5 minutes on a 2-core machine).

    .venv/bin/python bench/bench_latents.py [--extract-images 256] [--sweep-train-limit 512]
                                            [--svd-rows 10000 60000 1000000]

* extraction: EfficientNet-Lite0 throughput (images/s) at the demo size (128 px, real Fashion-MNIST),
  after a warm-up batch; a steady-state rate, so a few hundred images measure it;
* cache: two sweeps' ``prepare_latents`` on the demo config in a fresh cache dir, counting
  encoder forward passes (the second must make none). Only data.train_limit is lowered: whether
  the second sweep hits does not depend on how many images the first one encoded;
* svd: streaming ChannelCompressor fit of a synthetic N x 768 stream, each N in a fresh process:
  fit time, tracemalloc peak and the process's peak RSS. Memory must not grow with N. Chunks are
  generated cheaply (a fresh rank-128 signal plus a window of a fixed noise block), so the
  stream's generation, not timed, stays small next to the fit, which is.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHANNELS = 768
SVD_CHUNK = 4096
SIGNAL_RANK = 128
KEEP = 64


def bench_extraction(n: int) -> dict:
    import torch

    from nds.data import load_fashion_mnist
    from nds.latents.encoders import build_encoder, extract_features

    images = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "train", n).images
    encoder = build_encoder("efficientnet_lite0", image_size=128)
    extract_features(encoder, images[:64], batch_size=64)  # warm-up
    start = time.perf_counter()
    extract_features(encoder, images, batch_size=256)
    seconds = time.perf_counter() - start
    return {"encoder": "efficientnet_lite0", "image_size": 128, "batch_size": 256, "images": n,
            "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1), "torch_threads": torch.get_num_threads()}


def bench_cache(train_limit: int) -> dict:
    """Two sweeps' latent preparation on the demo config: the second must run no encoder pass."""
    from nds.config import load_config
    from nds.latents.encoders import FrozenEncoder
    from nds.latents.prepare import prepare_latents

    forward = FrozenEncoder.forward
    counts = {"calls": 0, "images": 0}

    def counted(self, images):
        counts["calls"] += 1
        counts["images"] += len(images)
        return forward(self, images)

    FrozenEncoder.forward = counted
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            limit = [f"data.train_limit={train_limit}"] if train_limit else []
            cfg = load_config(None, [f"paths.runs_dir={tmp}", *limit])
            for _ in range(2):
                counts.update(calls=0, images=0)
                start = time.perf_counter()
                prepared = prepare_latents(cfg)
                runs.append({"seconds": round(time.perf_counter() - start, 2), "encoder_forward_calls": counts["calls"],
                             "encoder_images": counts["images"]})
            shapes = {k: list(v.shape) for k, v in prepared.latents.items()}
    finally:
        FrozenEncoder.forward = forward
    return {"config": {"spec": cfg.hierarchy.spec, "encoder": cfg.encoder.name, "train_limit": cfg.data.train_limit},
            "first_sweep": runs[0], "second_sweep": runs[1], "latent_shapes": shapes,
            "second_sweep_hit": runs[1]["encoder_forward_calls"] == 0}


def _svd_child(rows: int, queue) -> None:
    from nds.latents.hierarchy import ChannelCompressor

    rng = np.random.default_rng(0)
    # decaying spectrum over SIGNAL_RANK directions, on top of full-rank noise
    basis = (rng.standard_normal((SIGNAL_RANK, CHANNELS), dtype=np.float32)
             / np.sqrt(1.0 + np.arange(SIGNAL_RANK, dtype=np.float32))[:, None])
    noise = 0.1 * rng.standard_normal((2 * SVD_CHUNK, CHANNELS), dtype=np.float32)
    comp = ChannelCompressor()
    tracemalloc.start()
    fit_seconds, start = 0.0, time.perf_counter()
    for done in range(0, rows, SVD_CHUNK):
        n = min(SVD_CHUNK, rows - done)
        offset = int(rng.integers(SVD_CHUNK))
        chunk = rng.standard_normal((n, SIGNAL_RANK), dtype=np.float32) @ basis + noise[offset : offset + n]
        t = time.perf_counter()
        comp.partial_fit(chunk)
        fit_seconds += time.perf_counter() - t
    t = time.perf_counter()
    comp.finish(KEEP)
    fit_seconds += time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    queue.put({"rows": rows, "channels": CHANNELS, "keep": KEEP, "chunk_rows": SVD_CHUNK,
               "fit_seconds": round(fit_seconds, 2),
               "total_seconds": round(time.perf_counter() - start, 2), "tracemalloc_peak_mib": round(peak / 2**20, 1),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "rows_per_s": round(rows / fit_seconds)})


def bench_svd(sizes: list[int]) -> list[dict]:
    ctx = mp.get_context("spawn")  # a fresh process per N: peak RSS is that N's alone
    results = []
    for rows in sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_svd_child, args=(rows, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extract-images", type=int, default=256)
    parser.add_argument("--sweep-train-limit", type=int, default=512, help="data.train_limit (0: the demo config's)")
    parser.add_argument("--svd-rows", type=int, nargs="+", default=[10_000, 60_000, 1_000_000])
    args = parser.parse_args()
    start = time.perf_counter()
    svd = bench_svd(args.svd_rows)
    out = {
        "extraction": bench_extraction(args.extract_images),
        "cache": bench_cache(args.sweep_train_limit),
        "svd_streaming": svd,
        "svd_memory_flat": max(r["tracemalloc_peak_mib"] for r in svd) <= 1.5 * min(r["tracemalloc_peak_mib"] for r in svd),
    }
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
