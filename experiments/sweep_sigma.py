"""Table 1 / Table 2 protocol: at each depth L of ``sweep.depths``, sweep σ_L over ``sweep.sigmas``;
the best σ_L (mean over ``sweep.seeds``) is carried into depth L+1, so a run is a chain of Tune stages.

    python experiments/sweep_sigma.py [--config FILE] [--dry-run] [key=value ...]
    python experiments/sweep_sigma.py --config configs/sweep_sigma/imagenet100.yaml   # the paper, on a GPU cluster
    ray job submit --working-dir . -- python experiments/sweep_sigma.py paths.runs_dir=/shared/nds-runs

Without a config file the embedded default runs: a local Ray instance, an MLflow sqlite store under
runs/, real Fashion-MNIST, tiny U-ViTs. Class-conditional: model.num_classes=10; text-conditional:
model.text_encoder=minilm (captions made from class names; on COCO each image's own captions,
configs/sweep_sigma/coco_text.yaml).
"""
from __future__ import annotations

import sys

from nds.sweep.cli import sweep_main
from nds.sweep.protocols import run_sigma_chain, sigma_plan

SCRIPT = "sweep_sigma"


def main(argv: list[str] | None = None) -> int:
    return sweep_main(SCRIPT, __doc__, sigma_plan, argv, run=lambda sweep, _: run_sigma_chain(sweep))


if __name__ == "__main__":
    sys.exit(main())
