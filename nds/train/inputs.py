"""What a level fit takes in, kept free of torch so the sweep layer can name it without loading the
trainer (the CLI imports the sweep to check a config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LevelData:
    """What a level fit reads, as Ray object refs: every level's training latents (level -> float32
    [N, c, h, w]), their labels (int64 [N]) and, for a text-conditional config, the caption bank (a
    :class:`nds.latents.text.TextBank`; None without text)."""

    latents: dict[int, Any]
    labels: Any
    text: Any = None
