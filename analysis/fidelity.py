"""How the paper presets follow the papers, setting by setting: the one source of the README's
fidelity table (``python analysis/fidelity.py --write`` renders it there) and of the test that
reads every paper preset against it (tests/test_fidelity.py).

Each fact is a setting the paper states (or, where the paper says "U-ViT's defaults", what the U-ViT
authors' public configs hold), the config key that carries it, the value the preset holds, and
whether that is the paper's setting; where it is not, why.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from nds.config import REPO_ROOT, load_config

NESTED = "nested"
MDM = "MDM"
IMAGENET100 = "configs/sweep_sigma/imagenet100.yaml"
COCO = "configs/sweep_sigma/coco.yaml"
IMAGENET1K = "configs/sweep_depth/imagenet1k.yaml"
MDM_PRESET = "configs/sweep_mdm/imagenet256.yaml"
MDM_TEXT = "configs/sweep_mdm/coco_text.yaml"
UVIT_IN256 = "U-ViT configs/imagenet256_uvit.py"
UVIT_COCO = "U-ViT configs/mscoco_uvit.py"
MARKERS = ("<!-- fidelity table: rendered by analysis/fidelity.py -->", "<!-- end of fidelity table -->")


@dataclass(frozen=True)
class Fact:
    paper: str  # NESTED or MDM
    source: str  # where the setting is stated
    setting: str  # what is stated
    preset: str  # the preset that should carry it
    key: str  # its dotted config key ("" where no key carries it yet)
    value: object  # what the preset holds
    same: bool  # whether the preset holds the paper's setting
    why: str = ""  # for a difference: why

    def held(self) -> object:
        """The value the preset actually holds under ``key``."""
        node: object = load_config(REPO_ROOT / self.preset)
        for part in self.key.split("."):
            node = getattr(node, part)
        return node


def _f(paper, source, setting, preset, key, value, same=True, why=""):
    return Fact(paper, source, setting, preset, key, value, same, why)


FACTS = [
    # -- Nested diffusion, ImageNet-100 (Tables 1b, 2b, 4) --
    _f(NESTED, "§4.1", "MoCo-v3 ViT-B/16 final-layer features (14x14x768)", IMAGENET100, "encoder.name", "moco_v3_vit_b16"),
    _f(NESTED, "§4.1", "latents 32x32x4 (SD-VAE), 6x6x32, 4x4x24, 2x2x16", IMAGENET100, "hierarchy.spec",
       "32x32x4, 6x6x32, 4x4x24, 2x2x16"),
    _f(NESTED, "§4.1", "z_1: the VAE latents of 256 px images", IMAGENET100, "encoder.level1", "vae"),
    _f(NESTED, "§4.1", "256 px images", IMAGENET100, "data.image_size", 256),
    _f(NESTED, "Table 1", "depths L = 1..4", IMAGENET100, "sweep.depths", [1, 2, 3, 4]),
    _f(NESTED, "Table 1", "σ_L ∈ {0, 0.5, 1.0, 1.5}", IMAGENET100, "sweep.sigmas", [0.0, 0.5, 1.0, 1.5]),
    _f(NESTED, "§4.1", "U-ViT-M at every level (ImageNet-100)", IMAGENET100, "model.size", "mid"),
    _f(NESTED, f"§4.1 → {UVIT_IN256}", "U-ViT block without qkv bias", IMAGENET100, "model.qkv_bias", False),
    _f(NESTED, f"§4.1 → {UVIT_IN256}", "time token without an MLP", IMAGENET100, "model.mlp_time_embed", False),
    _f(NESTED, "§4.1", "ẑ upsampled by deconvolution, concatenated as tokens every two blocks, two FC layers",
       IMAGENET100, "model.cond_injection", "tokens"),
    _f(NESTED, "§4.1", "condition dropped with 50% probability", IMAGENET100, "diffusion.cond_drop_prob", 0.5),
    _f(NESTED, f"§4.2 → {UVIT_IN256}", "U-ViT's guidance: scale 0.4 in ε_c + s(ε_c − ε_u) = 1.4 here", IMAGENET100,
       "diffusion.cfg_scale", 1.4),
    _f(NESTED, "§4.1 → U-ViT train_ldm_discrete.py", "noise prediction", IMAGENET100, "diffusion.prediction", "eps"),
    _f(NESTED, "§4.1 → U-ViT train_ldm_discrete.py", "β linear in √β from 0.00085 to 0.012, 1000 steps", IMAGENET100,
       "diffusion.schedule", "scaled_linear"),
    _f(NESTED, "§4.1 → U-ViT train_ldm_discrete.py", "β_1 = 0.00085", IMAGENET100, "diffusion.beta_start", 0.00085),
    _f(NESTED, "§4.1 → U-ViT train_ldm_discrete.py", "β_T = 0.012", IMAGENET100, "diffusion.beta_end", 0.012),
    _f(NESTED, "§4.1 → U-ViT train_ldm_discrete.py, dpm_solver_pp.py",
       "DPM-Solver with data prediction, method 'fast' (singlestep, order 3), time-uniform steps",
       IMAGENET100, "diffusion.sampler", "dpm_solver++_fast",
       why="equal to U-ViT's solver to 1e-14 where its time grid falls on whole timesteps (e.g. 27 steps); "
            "at 50 steps our grid is rounded to whole timesteps (≤ 0.5 off)"),
    _f(NESTED, f"§4.1 → {UVIT_IN256}", "50 sampling steps", IMAGENET100, "diffusion.sample_steps", 50),
    _f(NESTED, f"§4.1 → {UVIT_IN256}", "AdamW, learning rate 2e-4", IMAGENET100, "training.lr", 0.0002),
    _f(NESTED, f"§4.1 → {UVIT_IN256}", "AdamW betas (0.99, 0.99)", IMAGENET100, "training.betas", [0.99, 0.99]),
    _f(NESTED, f"§4.1 → {UVIT_IN256}", "weight decay 0.03", IMAGENET100, "training.weight_decay", 0.03),
    _f(NESTED, f"§4.1 → {UVIT_IN256}", "5,000 warm-up steps", IMAGENET100, "training.warmup_steps", 5000),
    _f(NESTED, f"§4.1 → {UVIT_IN256}", "global batch 1024 (8 workers × 128)", IMAGENET100, "training.batch_size", 128),
    _f(NESTED, "§4.1", "1000 epochs (126,689 images at batch 1024)", IMAGENET100, "training.steps", 124000),
    _f(NESTED, "U-ViT train_ldm_discrete.py", "EMA rate 0.9999", IMAGENET100, "training.ema_decay", 0.9999),
    _f(NESTED, "§4.2", "FID against all 50K training images (5K val images are too few)", IMAGENET100,
       "eval.reference_split", "train"),
    _f(NESTED, "§4.2", "FID on 50K samples", IMAGENET100, "eval.num_samples", 50000),
    # -- Nested diffusion, ImageNet-1k (§4.3) --
    _f(NESTED, "§4.3", "U-ViT-L", IMAGENET1K, "model.size", "large"),
    _f(NESTED, "§4.3", "class-conditional, 1000 classes", IMAGENET1K, "model.num_classes", 1000),
    _f(NESTED, "§4.3", "L = 2 with z_2 = 6x6x32", IMAGENET1K, "hierarchy.spec", "32x32x4, 6x6x32"),
    _f(NESTED, f"§4.3 → {UVIT_IN256}", "U-ViT-L's 300K steps at batch 1024", IMAGENET1K, "training.steps", 300000),
    _f(NESTED, "§4.3", "σ_2 (not stated)", IMAGENET1K, "hierarchy.sigmas", [1.0], same=False,
       why="the paper does not state it; 1.0 is the best σ_2 of Table 1b"),
    # -- Nested diffusion, COCO-2014 (Tables 1a, 2a) --
    _f(NESTED, "§4.1", "CLIP ViT-B/16 final visual features", COCO, "encoder.name", "clip_vit_b16"),
    _f(NESTED, "§4.1", "latents 32x32x4, 8x8x64, 6x6x56, 4x4x48, 2x2x40", COCO, "hierarchy.spec",
       "32x32x4, 8x8x64, 6x6x56, 4x4x48, 2x2x40"),
    _f(NESTED, "§4.1", "U-ViT-S at every level (COCO)", COCO, "model.size", "small"),
    _f(NESTED, f"§4.2 → {UVIT_COCO}", "U-ViT's guidance: scale 1.0 in ε_c + s(ε_c − ε_u) = 2.0 here", COCO,
       "diffusion.cfg_scale", 2.0),
    _f(NESTED, f"§4.1 → {UVIT_COCO}", "AdamW betas (0.9, 0.9)", COCO, "training.betas", [0.9, 0.9]),
    _f(NESTED, "§4.2", "zero-shot FID against the validation split", COCO, "eval.reference_split", "test"),
    _f(NESTED, "§4.2", "FID on 30K samples", COCO, "eval.num_samples", 30000),
    _f(NESTED, f"{UVIT_COCO}", "global batch 256 for 1M steps (U-ViT's COCO run)", COCO, "training.steps", 81000,
       same=False, why="the paper trains every model for 1000 epochs (§4.1): 81K steps of batch 1024 on COCO's "
                       "82,783 training images; U-ViT's own COCO run differs"),
    # -- Matryoshka Diffusion, ImageNet 64 -> 256 (Fig. 8) --
    _f(MDM, "§4.1", "NestedUNet 64 -> 256", MDM_PRESET, "mdm.resolutions", [64, 256]),
    _f(MDM, "App. C", "v-prediction", MDM_PRESET, "mdm.prediction", "v"),
    _f(MDM, "App. B", "100K iterations at 64 px, then 375K nested", MDM_PRESET, "mdm.phase_steps", [100000, 375000]),
    _f(MDM, "App. F", "FID-50K against the training set", MDM_PRESET, "eval.reference_split", "train"),
    _f(MDM, "App. C", "dynamic thresholding at sampling (percentile not stated; Imagen's 99.5%)", MDM_PRESET,
       "mdm.threshold", 0.995),
    _f(MDM, "§3.1", "lower resolutions by bilinear interpolation", MDM_PRESET, "mdm.downsample", "bilinear"),
    _f(MDM, "Fig. 8a", "low-resolution pretraining added before the same high-resolution schedule", MDM_PRESET,
       "sweep.mdm_phase_steps", [[0, 375000], [50000, 375000], [100000, 375000]]),
    _f(MDM, "§4.1, App. E", "baselines: simple DM, cascaded DM, latent DM", MDM_PRESET, "sweep.mdm_baselines",
       ["nested", "cascaded", "plain", "latent"]),
    _f(MDM, "App. E.2", "latent DM on KL-F4 codes: 256 px -> 64x64", MDM_PRESET, "mdm.latent_downsample", 4),
    _f(MDM, "App. E.2", "KL-F4 codes have 3 channels", MDM_PRESET, "mdm.latent_channels", 3,
       why="the file itself is checked against these two before training (mdm.vae_weights)"),
    # -- MDM, text-to-image: Fig. 8c --
    _f(MDM, "§4.1", "frozen FLAN-T5 XL text encoder", MDM_TEXT, "model.text_encoder", "t5"),
    _f(MDM, "§4.1", "two learnable self-attention layers over the text tokens", MDM_TEXT, "mdm.text_layers", 2),
    _f(MDM, "Fig. 8c", "trained on CC12M, evaluated zero-shot on COCO", MDM_TEXT, "data.name", "coco2014", same=False,
       why="no CC12M loader: trained on COCO-2014's training captions, scored against its validation images"),
    _f(MDM, "Fig. 8c", "FID-30K against CLIP score over the CFG weight", MDM_TEXT, "sweep.cfg_scales",
       [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0], why="the weights are not legible in the text; these are ours"),
]


def _cell(value: object) -> str:
    return "—" if value is None else f"`{value}`"


def render_markdown(facts: list[Fact] = FACTS) -> str:
    """The README's fidelity table."""
    lines = [MARKERS[0], "", "| paper | source | setting | preset | config key | value | same? | why it differs |",
             "|---|---|---|---|---|---|---|---|"]
    for f in facts:
        lines.append(f"| {f.paper} | {f.source} | {f.setting} | `{Path(f.preset).name}` ({Path(f.preset).parent.name}) "
                     f"| {'`' + f.key + '`' if f.key else '— (none yet)'} | {_cell(f.value)} | "
                     f"{'same' if f.same else '**differs**'} | {f.why} |")
    lines += ["", MARKERS[1]]
    return "\n".join(lines)


def write_readme(readme: Path = REPO_ROOT / "README.md") -> None:
    text = readme.read_text()
    start, end = text.index(MARKERS[0]), text.index(MARKERS[1]) + len(MARKERS[1])
    readme.write_text(text[:start] + render_markdown() + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="render the table into README.md (between its markers)")
    args = parser.parse_args(argv)
    if args.write:
        write_readme()
    else:
        print(render_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
