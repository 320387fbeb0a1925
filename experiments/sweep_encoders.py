"""Table 4a: the same chain (depth ``hierarchy.L``) and hyperparameters with each encoder of
``sweep.encoders`` (MoCo-v3, VAE, CLIP, DINO, EfficientNet-Lite0).

    python experiments/sweep_encoders.py [--config FILE] [--dry-run] [key=value ...]
    python experiments/sweep_encoders.py --config configs/sweep_encoders/imagenet100.yaml
"""
from __future__ import annotations

import sys

from nds.sweep.cli import preset, sweep_main
from nds.sweep.protocols import encoder_variants

SCRIPT = "sweep_encoders"


def main(argv: list[str] | None = None) -> int:
    return sweep_main(SCRIPT, __doc__, lambda cfg: [("encoders", encoder_variants(cfg))], argv,
                      default_config=preset(SCRIPT))


if __name__ == "__main__":
    sys.exit(main())
