"""The EMA's cost per training step, as a fraction of the step, printed as one JSON object.

- step_s: one AdamW training step of a U-ViT-S level (the first level of the paper's ImageNet
  chain, 32x32x4 given 6x6x32) at the given batch.
- ema_s: ``nds.train.engine.EMA.update`` after that step (in place on the weights' device, one fused lerp).
- host_copy_ema_s: the EMA as it was before issue 14, for comparison: every step each state-dict
  tensor copied to the host in fp32, then averaged there. On a CPU the copy is free (the tensors
  already live there), so the two differ only by the fused update; on a GPU the old one pays a
  device-to-host copy of the whole model per step.

Times are medians of interleaved repeats (a step, then each EMA), one thread by default.

Usage: python bench/bench_ema.py [--batch N] [--repeats N] [--threads N]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nds.diffusion.process import cosine_schedule, diffusion_loss  # noqa: E402
from nds.models.uvit import count_params, uvit_from_size  # noqa: E402
from nds.train.engine import EMA  # noqa: E402


class HostCopyEMA:
    """The pre-issue-14 EMA: a fp32 host copy of every tensor, every step (the comparison's baseline)."""

    def __init__(self, decay: float):
        self.decay, self.updates, self.shadow = decay, 0, {}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in module.state_dict().items():
            value = value.detach().float().cpu()
            if name not in self.shadow or not value.is_floating_point():
                self.shadow[name] = value.clone()
            else:
                self.shadow[name].lerp_(value, 1 - d)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = uvit_from_size("small", input_shape=(32, 32, 4), patch_size=2, cond_shape=(6, 6, 32)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 4, 32, 32, device=device)
    z = torch.randn(args.batch, 32, 6, 6, device=device)
    alphas = cosine_schedule(1000)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        diffusion_loss(lambda x_t, t: model(x_t, t, cond=z), x, alphas).backward()
        opt.step()

    ema, host = EMA(0.999), HostCopyEMA(0.999)
    step(), ema.update(model), host.update(model)  # warm-up; the first update allocates the average
    times = {"step_s": [], "ema_s": [], "host_copy_ema_s": []}
    for _ in range(args.repeats):
        times["step_s"].append(timed(step))
        times["ema_s"].append(timed(lambda: ema.update(model)))
        times["host_copy_ema_s"].append(timed(lambda: host.update(model)))
    report = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
              "threads": torch.get_num_threads(), "batch": args.batch, "params_M": count_params(model) / 1e6,
              **{k: statistics.median(v) for k, v in times.items()}}
    report["ema_fraction_of_step"] = report["ema_s"] / report["step_s"]
    report["host_copy_ema_fraction_of_step"] = report["host_copy_ema_s"] / report["step_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
