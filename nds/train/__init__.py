"""The training layer: one engine (Ray Train + DeepSpeed ZeRO, EMA, resume) for U-ViT levels and NestedUNet phases."""
