"""Model cost benchmarks on this machine (fp32, CPU unless CUDA is there), printed as one JSON object.

- matmul_peak: the fp32 matmul rate measured in this run, the yardstick for the rest.
- uvit_training: training step time and achieved FLOP/s of tiny and S-sized U-ViT levels (the
  first two levels of the paper's ImageNet chain), as a fraction of matmul_peak.
- nested_vs_plain_unet: NestedUNet against the plain UNet of the same size (same blocks, I/O at
  the top resolution only), timed interleaved; MDM App. D.1 reports 0.52 vs 0.50 s/iter (1.04x).
- bf16: the bf16 matmul rate against fp32, and U-ViT training steps under bf16 autocast against fp32:
  whether ``training.precision=bf16`` pays on this machine (on CPUs it needs bf16 matrix units, e.g.
  AMX, and matrices large enough to amortise the casts; ``auto`` stays fp32 on CPUs).
- nested_chain_cost: forward GFLOPs of every level of the paper's ImageNet and COCO chains with
  U-ViT-S (patch 2 at 32x32, 1 below), levels 2..L as a fraction of level 1, and the whole chain
  against the single-level model (level 1 without a condition). FLOP counting only: the models
  are allocated but never initialised or trained.

U-ViT step times are the best of a few runs (other processes on a shared machine only ever slow
a run down). The nested-vs-plain comparison alternates the two models step by step and takes the
median of the per-round ratios, so that drifting load cancels within each pair; on the CPU it also
gives the ratio of this thread's CPU time, which other processes disturb far less than wall time
(even so, whole runs were seen to scatter by about ±5% here under a load average of 4-8). One
thread by default: on a busy 2-core machine a 2-thread OpenMP region stalls whenever another
process takes a core (seen here: 20x slower steps), which would measure the neighbours, not the model.

Usage: python bench/bench_models.py [--quick] [--threads N] [--write-throughput PATH]   (--quick: fewer repeats, a smoke
run; --write-throughput: only the U-ViT-S training and sampling rate of this device, the planner's --throughput)
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nds.config.specs import NestedUNetSpec, parse_spec  # noqa: E402
from nds.diffusion.process import cosine_schedule, diffusion_loss  # noqa: E402
from nds.models.nested_unet import NestedUNet, downsample_pyramid, multires_loss  # noqa: E402
from nds.models.uvit import count_params, forward_flops, uvit_from_size  # noqa: E402

IMAGENET_SPEC = "32x32x4, 6x6x32, 4x4x24, 2x2x16"
COCO_SPEC = "32x32x4, 8x8x64, 6x6x56, 4x4x48, 2x2x40"
# An MDM-shaped NestedUNet at 1/4 scale (MDM: 64 -> 256 with the inner UNet at 64): inner UNet at
# 16x16 with attention at 8 and 4, one outer stage 16 -> 64 of two halvings without attention.
NESTED_SPEC = NestedUNetSpec(
    resolutions=(16, 64), channels=3, core_widths=(64, 128, 192), core_blocks=2, attention_levels=(1, 2),
    stage_widths=(32,), stage_blocks=1, heads=4,
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clocks(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, this thread's CPU) seconds of one call; the CPU time means something on CPU only."""
    sync()
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.thread_time() - cpu


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> dict:
    """Best n x n matmul rate: the machine's practical peak for dense work in ``dtype``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(clocks(lambda: a @ b)[0] for _ in range(repeats))
    return {"n": n, "gflops": 2 * n**3 / best / 1e9}


def train_step_flops(loss_fn: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one forward + backward (the optimizer's elementwise update is not counted)."""
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops()


def uvit_training(size: str, shape: tuple, cond: tuple | None, patch: int, batch: int, steps: int,
                  peak: float, device: torch.device, bf16: bool = False) -> dict:
    torch.manual_seed(0)
    model = uvit_from_size(size, input_shape=shape, patch_size=patch, cond_shape=cond).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    h, w, c = shape
    x = torch.randn(batch, c, h, w, device=device)
    z = torch.randn(batch, cond[2], cond[0], cond[1], device=device) if cond else None
    ac = cosine_schedule(1000)

    def loss() -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return diffusion_loss(lambda x_t, t: model(x_t, t, cond=z), x, ac)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    flops = train_step_flops(loss)
    step()  # warm-up
    seconds = min(clocks(step)[0] for _ in range(steps))
    return {
        "size": size, "level": "x".join(map(str, shape)), "cond": "x".join(map(str, cond)) if cond else None,
        "patch": patch, "batch": batch, "bf16_autocast": bf16, "params_M": count_params(model) / 1e6,
        "train_gflops_per_step": flops / 1e9, "step_s": seconds, "achieved_gflops": flops / seconds / 1e9,
        "fraction_of_matmul_peak": flops / seconds / 1e9 / peak,
    }


def bf16_against_fp32(steps: int, device: torch.device) -> dict:
    """bf16 matmul rate over fp32, and the speedup of bf16 autocast over fp32 training steps of the tiny U-ViT as the
    Fashion-MNIST presets train it (level 1, 28x28x1 under 4x4x32, batch 64) and of a U-ViT-S level."""
    fp32, bf16 = matmul_peak(device), matmul_peak(device, dtype=torch.bfloat16)
    out = {"matmul_fp32_gflops": fp32["gflops"], "matmul_bf16_gflops": bf16["gflops"],
           "matmul_bf16_speedup": bf16["gflops"] / fp32["gflops"]}
    for name, args in (("tiny_fashion_level1", ("tiny", (28, 28, 1), (4, 4, 32), 4, 64)),
                       ("small_imagenet_level1", ("small", (32, 32, 4), (6, 6, 32), 2, 4))):
        times = [uvit_training(*args, steps, fp32["gflops"], device, bf16=use)["step_s"] for use in (False, True)]
        out[name] = {"fp32_step_s": times[0], "bf16_step_s": times[1], "bf16_speedup": times[0] / times[1]}
    return out


def nested_vs_plain(spec: NestedUNetSpec, batch: int, rounds: int, device: torch.device) -> dict:
    """Median train and inference step times of the NestedUNet and the plain UNet, and the median
    of the per-round ratios nested/plain (one step of each per round, back to back)."""
    ac = cosine_schedule(1000)
    x = torch.randn(batch, spec.channels, spec.resolutions[-1], spec.resolutions[-1], device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    runs = {}
    for name, s in (("nested", spec), ("plain", replace(spec, nested=False))):
        torch.manual_seed(0)
        model = NestedUNet(s).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        xs = downsample_pyramid(x, model.io_resolutions)

        def train(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            multires_loss(model, x, ac)[0].backward()
            opt.step()

        def inference(model=model, xs=xs) -> None:
            with torch.no_grad():
                model(xs, t)

        runs[name] = {"model": model, "train": train, "inference": inference,
                      "gflops": forward_flops(model, xs, t) / 1e9,
                      **{f"{kind}_{clock}": [] for kind in ("train", "inference") for clock in ("s", "cpu_s")}}
        train()  # warm-up
    for i in range(rounds):
        for run in list(runs.values())[:: 1 if i % 2 else -1]:  # alternate which goes first
            for kind in ("train", "inference"):
                wall, cpu = clocks(run[kind])
                run[f"{kind}_s"].append(wall)
                run[f"{kind}_cpu_s"].append(cpu)
    out = {"spec": {k: v for k, v in asdict(spec).items() if k not in ("num_classes", "text_dim")}, "batch": batch}
    for name, run in runs.items():
        out[name] = {"params_M": count_params(run["model"]) / 1e6, "forward_gflops": run["gflops"],
                     "train_step_s": statistics.median(run["train_s"]),
                     "inference_step_s": statistics.median(run["inference_s"])}
    nested, plain = runs["nested"], runs["plain"]
    for kind in ("train", "inference"):
        for clock, suffix in (("s", "ratio"), ("cpu_s", "cpu_ratio")):
            ratios = [a / b for a, b in zip(nested[f"{kind}_{clock}"], plain[f"{kind}_{clock}"])]
            out[f"{kind}_step_{suffix}"] = statistics.median(ratios)
    out["forward_flops_ratio"] = nested["gflops"] / plain["gflops"]
    out["rounds"] = rounds
    out["paper_train_ratio"] = 0.52 / 0.50
    return out


def uvit_sampling(size: str, shape: tuple, cond: tuple, patch: int, batch: int, repeats: int,
                  device: torch.device) -> dict:
    """Achieved FLOP/s of a U-ViT level's no-grad forward: one sampler step of a batch."""
    torch.manual_seed(0)
    model = uvit_from_size(size, input_shape=shape, patch_size=patch, cond_shape=cond).to(device).eval()
    h, w, c = shape
    x, t = torch.randn(batch, c, h, w, device=device), torch.zeros(batch, device=device)
    z = torch.randn(batch, cond[2], cond[0], cond[1], device=device)
    flops = forward_flops(model, x, t, cond=z)
    with torch.no_grad():
        model(x, t, cond=z)  # warm-up
        seconds = min(clocks(lambda: model(x, t, cond=z))[0] for _ in range(repeats))
    return {"size": size, "batch": batch, "forward_gflops": flops / 1e9, "step_s": seconds,
            "achieved_gflops": flops / seconds / 1e9}


def write_throughput(path: Path, shape: tuple, cond: tuple, steps: int, peak: dict, device: torch.device) -> dict:
    """This device's achieved TFLOP/s training and sampling a U-ViT-S level (the first level of the
    paper's ImageNet chain; bf16 autocast on GPUs, as training.precision=auto does), written to
    ``path`` for ``experiments/<sweep>.py --plan --throughput path``."""
    batch = 128 if device.type == "cuda" else 8  # GPUs need a real batch to reach their rate
    training = uvit_training("small", shape, cond, 2, batch, steps, peak["gflops"], device, bf16=device.type == "cuda")
    sampling = uvit_sampling("small", shape, cond, 2, batch, steps + 2, device)
    name = str(device) if device.type == "cpu" else torch.cuda.get_device_name()
    throughput = {"device": name, "model": f"U-ViT-S level {shape} given {cond}, batch {batch}",
                  "train_tflops": training["achieved_gflops"] / 1e3, "sample_tflops": sampling["achieved_gflops"] / 1e3}
    path.write_text(json.dumps(throughput, indent=2))
    return {**throughput, "training": training, "sampling": sampling}


def level_cost(size: str, level, above) -> tuple[float, float]:
    """(forward GFLOPs at batch 1, M params) of one U-ViT level, conditioned on `above` if given."""
    with torch.device("meta"):  # allocate without the init cost; the values do not change FLOPs
        model = uvit_from_size(size, input_shape=(level.h, level.w, level.c), patch_size=2 if level.h >= 32 else 1,
                               cond_shape=(above.h, above.w, above.c) if above else None)
    model = model.to_empty(device="cpu")  # counted on CPU kernels: meta SDPA counts differently
    cond = torch.zeros(1, above.c, above.h, above.w) if above else None
    flops = forward_flops(model, torch.zeros(1, level.c, level.h, level.w), torch.zeros(1), cond=cond)
    return flops / 1e9, count_params(model) / 1e6


def nested_chain_cost(spec: str, size: str = "small") -> dict:
    """Per-level cost of a nested chain of U-ViTs (level l conditioned on l+1), and the whole
    chain against the plain single-level model (L=1: level 1 without a condition)."""
    levels = parse_spec(spec)
    costs = [level_cost(size, level, levels[i + 1] if i + 1 < len(levels) else None) for i, level in enumerate(levels)]
    gflops = [g for g, _ in costs]
    single, _ = level_cost(size, levels[0], None)
    return {"spec": spec, "size": size, "level_gflops": gflops, "level_params_M": [p for _, p in costs],
            "levels_2_to_L_fraction_of_level_1": sum(gflops[1:]) / gflops[0],
            "single_level_gflops": single, "chain_over_single_level": sum(gflops) / single}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run, not a measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--write-throughput", metavar="PATH",
                        help="only measure this device's achieved U-ViT-S TFLOP/s (training, sampling) and write them "
                             "there, for experiments/<sweep>.py --plan --throughput PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps, rounds = (1, 2) if args.quick else (3, 30)
    started = time.perf_counter()

    peak = matmul_peak(device)
    imagenet = parse_spec(IMAGENET_SPEC)
    level = lambda i: (imagenet[i].h, imagenet[i].w, imagenet[i].c)  # noqa: E731
    if args.write_throughput:
        print(json.dumps(write_throughput(Path(args.write_throughput), level(0), level(1), steps, peak, device), indent=2))
        return
    uvit = [
        uvit_training("tiny", level(0), level(1), 2, 16, steps, peak["gflops"], device),
        uvit_training("tiny", level(1), level(2), 1, 16, steps, peak["gflops"], device),
        uvit_training("small", level(0), level(1), 2, 1, steps, peak["gflops"], device),
        uvit_training("small", level(1), level(2), 1, 4, steps, peak["gflops"], device),
    ]
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "dtype": "float32",
        "matmul_peak": peak,
        "uvit_training": uvit,
        "bf16": bf16_against_fp32(steps, device),
        "nested_vs_plain_unet": nested_vs_plain(NESTED_SPEC, 4, rounds, device),
        "nested_chain_cost": {
            "imagenet": nested_chain_cost(IMAGENET_SPEC),
            "coco": nested_chain_cost(COCO_SPEC),
        },
    }
    report["total_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
