"""The papers' published numbers, with where each comes from, to print beside ours.

Read from the text extractions in shared/papers/ (000_…: *Nested Diffusion Models using
Hierarchical Latent Priors*; 003_…: *Matryoshka Diffusion Models*). Their tables are flattened
text; a number is here only where its row and column can be read unambiguously. Left out as not
legible: nested Table 1(a) (COCO-2014), Table 2 (conditional), Table 3 and Table 4a/4b (encoders,
RCG: only the captions survive); MDM Fig. 4 and Fig. 8 (curves, no numbers). Table 3's place is
taken by the published COCO FIDs of U-ViT, the single-level model the paper builds on.

Their metric is Inception FID at full scale (ImageNet-100 / COCO, U-ViT-M, 50K samples), so
their numbers show the trend to expect, not values ours should match.
"""
from __future__ import annotations

NESTED = "Nested Diffusion Models using Hierarchical Latent Priors"
MDM = "Matryoshka Diffusion Models"

# Nested Table 1(b): unconditional ImageNet-100, FID. Row and column reading: the z_L shapes
# 6x6x32 / 4x4x24 / 2x2x16 are the ImageNet hierarchy of §4.1 and the "(b) ... ImageNet-100"
# label follows them; columns σ_L = 0.0, 0.5, 1.0, 1.5; L = 1 has one value (no σ).
# "growth GFLOPs" and "growth params" are printed as in the paper (L = 1: the base model's own
# GFLOPs and params; deeper rows: what level L adds; the text gives no unit for the growth).
TABLE1B = {
    "source": f"{NESTED}, Table 1(b): unconditional ImageNet-100, FID",
    "sigmas": [0.0, 0.5, 1.0, 1.5],
    "rows": [  # L, z_L, growth GFLOPs, growth params, FID per σ_L (L = 1: the single value)
        (1, "32x32x4", 71.60, "130.7M", [44.40]),
        (2, "6x6x32", 30.02, "100.1M", [31.69, 17.45, 15.31, 15.40]),
        (3, "4x4x24", 1.01, "100.1M", [13.66, 11.77, 11.12, 11.34]),
        (4, "2x2x16", 0.59, "100.1M", [12.79, 11.80, 11.21, 12.09]),
    ],
}

# Nested §4.3, "Large scale experiments on ImageNet 1K" (prose, no table): class-conditional,
# U-ViT-L; the reproduced L = 1 baseline and the L = 2 model (z_2 = 6x6x32, σ not stated).
IMAGENET1K_CONDITIONAL = {
    "source": f"{NESTED}, §4.3 (text): class-conditional ImageNet-1k, U-ViT-L, FID",
    "rows": [(1, 3.8), (2, 3.2)],  # L, FID
}

# MDM Appendix D.3 "Wall clock time" table: training seconds per iteration on ImageNet 256x256
# (4x8 A100) of MDM and its controlled baselines; "Simple DM" is the plain single-resolution model.
MDM_SEC_PER_ITER = {
    "source": f"{MDM}, Appendix D.3 table: training sec/iter, ImageNet 256x256",
    "rows": [("nested", "MDM", 1.00), ("nested", "MDM (no PT)", 1.01), ("plain", "Simple DM", 1.03),
             ("cascaded", "Cascaded DM", 0.96), ("latent", "Latent DM", 0.74)],  # baseline, paper's name, sec/iter
}

# MDM Table 1: the full-scale MDM's own FID (the other rows of that table are other papers' models).
MDM_FID = {
    "source": f"{MDM}, Table 1: FID of the full-scale MDM",
    "rows": [("ImageNet 256x256, FID-50K, cfg=1", 8.18), ("ImageNet 256x256, FID-50K, cfg=1.5", 3.51),
             ("MS-COCO zero-shot, FID-30K, cfg=1", 18.35), ("MS-COCO zero-shot, FID-30K, cfg=1.35", 13.43)],
}

# For nested Table 3 (text-to-image on COCO-2014; its numbers are not legible here): the published
# MS-COCO FIDs of U-ViT (Bao et al. 2023; the table of the authors' README, baofff/U-ViT), trained on
# COCO's training split only like the paper's own rows, FID-30K against the validation images.
UVIT_COCO = {
    "source": "U-ViT (Bao et al. 2023), MS-COCO 256x256 text-to-image, trained on COCO only, FID-30K",
    "rows": [("U-ViT-S/2", 1, 5.95), ("U-ViT-S/2 (deep)", 1, 5.48)],  # model, L, FID
}
