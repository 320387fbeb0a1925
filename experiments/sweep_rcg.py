"""Table 4b: our L = 2 spatial hierarchy against RCG's global representation vector on top
(``sweep.rcg_encoder`` with the spec ``sweep.rcg_spec``, conditioned on without noise).

    python experiments/sweep_rcg.py [--config FILE] [--dry-run] [key=value ...]
    python experiments/sweep_rcg.py --config configs/sweep_rcg/imagenet100.yaml
"""
from __future__ import annotations

import sys

from nds.sweep.cli import preset, sweep_main
from nds.sweep.protocols import rcg_variants

SCRIPT = "sweep_rcg"


def main(argv: list[str] | None = None) -> int:
    return sweep_main(SCRIPT, __doc__, lambda cfg: [("rcg", rcg_variants(cfg))], argv,
                      default_config=preset(SCRIPT))


if __name__ == "__main__":
    sys.exit(main())
