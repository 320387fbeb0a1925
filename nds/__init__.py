"""nds: distributed experiment sweeps for nested (hierarchical-latent) diffusion models.

The layers, in the order data flows through them: config → data → encoders → hierarchy
(pool/SVD/σ, cached) → models → diffusion → train (Ray Train + DeepSpeed) → sweep (Ray Tune)
→ tracking (MLflow) → analysis (the top-level ``analysis`` package).
"""
