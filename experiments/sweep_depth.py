"""Depth ablation: L over ``sweep.depths`` (e.g. 1..4) at the fixed σ of ``hierarchy.sigmas``.

    python experiments/sweep_depth.py [--config FILE] [--dry-run] [key=value ...]
    python experiments/sweep_depth.py --config configs/sweep_depth/imagenet100.yaml
"""
from __future__ import annotations

import sys

from nds.sweep.cli import preset, sweep_main
from nds.sweep.protocols import depth_variants

SCRIPT = "sweep_depth"


def main(argv: list[str] | None = None) -> int:
    return sweep_main(SCRIPT, __doc__, lambda cfg: [("depths", depth_variants(cfg))], argv,
                      default_config=preset(SCRIPT))


if __name__ == "__main__":
    sys.exit(main())
