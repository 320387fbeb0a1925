"""Latent-shape ablation: whole ``hierarchy.spec`` strings from ``sweep.shapes`` at depth ``hierarchy.L``.

    python experiments/sweep_shapes.py [--config FILE] [--dry-run] [key=value ...]
    python experiments/sweep_shapes.py --config configs/sweep_shapes/imagenet100.yaml
"""
from __future__ import annotations

import sys

from nds.sweep.cli import preset, sweep_main
from nds.sweep.protocols import shape_variants

SCRIPT = "sweep_shapes"


def main(argv: list[str] | None = None) -> int:
    return sweep_main(SCRIPT, __doc__, lambda cfg: [("shapes", shape_variants(cfg))], argv,
                      default_config=preset(SCRIPT))


if __name__ == "__main__":
    sys.exit(main())
