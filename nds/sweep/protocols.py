"""The papers' experiment protocols as lists of variants (see nds.sweep.runner.variant).

Each function reads the ``sweep`` section of the config and returns the trials of one Tune
stage; ``sweep_sigma`` chains stages, carrying the best σ of depth L into depth L+1 as the
nested-diffusion paper does (Table 1: "we select the optimal σ_l values for l < L from earlier
levels").
"""
from __future__ import annotations

from nds.config import Config, ConfigError, replace
from nds.config.schema import trial_float
from nds.sweep.runner import StageOutcome, Sweep, Variant, mean_metric, variant
from nds.tracking import Tag


def sigma_name(depth: int, sigma: float, cfg_scale: float | None = None) -> str:
    """A σ stage's variant name (the config refuses swept values that print alike here)."""
    return f"L{depth}-sigma{trial_float(sigma)}" + ("" if cfg_scale is None else f"-cfg{trial_float(cfg_scale)}")


def guidance_scales(cfg: Config) -> list[float | None]:
    """The guidance scales a σ stage tries (None: the config's own, not swept)."""
    return list(cfg.sweep.cfg_scales) or [None]


def sigma_stages(depths: list[int]) -> list[list[int]]:
    """Depths 1 and 2 need no σ chosen at an earlier depth, so they share the first stage; each
    deeper depth L waits for the best σ_{L-1} of the stage before it."""
    depths = sorted(set(depths))
    first = [d for d in depths if d <= 2]
    return ([first] if first else []) + [[d] for d in depths if d > 2]


def sigma_variants(cfg: Config, depths: list[int]) -> list[Variant]:
    """σ_L over ``sweep.sigmas`` at each depth L > 1 (σ_l for l < L as in ``cfg``), each at every guidance
    scale of ``sweep.cfg_scales``; L = 1 has no σ (nor a condition to guide, unless class/text).
    Ordered by guidance scale first: the trials at the first scale train the levels, the later scales
    only re-sample them, so they run last instead of holding a trial slot while they wait for the levels."""
    variants = []
    for index, scale in enumerate(guidance_scales(cfg)):
        guidance = {} if scale is None else {"diffusion.cfg_scale": scale}
        for seed in cfg.sweep.seeds:
            for depth in depths:
                if depth == 1:
                    if index == 0:
                        variants.append(variant("L1", seed, **{"hierarchy.L": 1}))
                    continue
                for sigma in cfg.sweep.sigmas:
                    sigmas = list(cfg.hierarchy.sigmas)
                    sigmas[depth - 2] = sigma
                    variants.append(variant(sigma_name(depth, sigma, scale), seed,
                                            **{"hierarchy.L": depth, "hierarchy.sigmas": sigmas, **guidance}))
    return variants


def best_sigma(outcome: StageOutcome, cfg: Config, depth: int, metric: str) -> tuple[float, float | None] | None:
    """The (σ_depth, guidance scale) with the lowest mean metric over seeds (scale None: not swept), or
    None if no trial at that depth finished."""
    means = mean_metric(outcome, metric)
    scored = [(means[name], s, scale) for s in cfg.sweep.sigmas for scale in guidance_scales(cfg)
              if (name := sigma_name(depth, s, scale)) in means]
    return min(scored, key=lambda x: x[0])[1:] if scored else None


def with_sigma(cfg: Config, depth: int, sigma: float) -> Config:
    sigmas = list(cfg.hierarchy.sigmas)
    sigmas[depth - 2] = sigma
    return replace(cfg, **{"hierarchy.sigmas": sigmas})


def sigma_stage_name(depths: list[int]) -> str:
    return "L" + "+".join(map(str, depths))


def sigma_plan(cfg: Config) -> list[tuple[str, list[Variant]]]:
    """The σ sweep's stages in order. The run gives a deeper stage the best σ_{L-1} found before it;
    the plan gives it the first swept value instead, which needs the same level trainings whichever wins."""
    if not cfg.sweep.sigmas and max(cfg.sweep.depths, default=1) > 1:
        raise ConfigError(f"sweep.sigmas is empty: sweep_sigma sweeps σ_L at each depth L > 1 of sweep.depths="
                          f"{cfg.sweep.depths}; give at least one σ (or sweep.depths=[1])")
    stages = []
    for depths in sigma_stages(cfg.sweep.depths):
        stages.append((sigma_stage_name(depths), sigma_variants(cfg, depths)))
        if max(depths) >= 2 and cfg.sweep.carry_best_sigma:
            cfg = with_sigma(cfg, max(depths), cfg.sweep.sigmas[0])
    return stages


def run_sigma_chain(sweep: Sweep) -> list[StageOutcome]:
    """The σ sweep's stages in order, each deeper stage with the best σ found before it."""
    cfg = sweep.cfg
    outcomes = []
    for depths in sigma_stages(cfg.sweep.depths):
        outcome = sweep.stage(sigma_stage_name(depths), sigma_variants(cfg, depths), cfg)
        outcomes.append(outcome)
        depth = max(depths)
        if depth < 2 or not cfg.sweep.carry_best_sigma:
            continue
        best = best_sigma(outcome, cfg, depth, sweep.metric)
        if best is None:
            print(f"[nds] no trial at L={depth} finished; deeper stages keep σ_{depth} = {cfg.sigma(depth)}", flush=True)
            continue
        sigma, scale = best
        tags = {Tag.BEST_SIGMA: f"{sigma:g}", **({} if scale is None else {Tag.BEST_CFG_SCALE: f"{scale:g}"})}
        sweep.tag_stage(outcome, tags)
        at = "" if scale is None else f" (at guidance {scale:g})"
        print(f"[nds] best σ_{depth} = {sigma:g}{at} ({sweep.metric}); carried into deeper stages", flush=True)
        cfg = with_sigma(cfg, depth, sigma)
    return outcomes


def depth_variants(cfg: Config) -> list[Variant]:
    """L over ``sweep.depths`` at the σ in ``hierarchy.sigmas``."""
    return [variant(f"L{d}", seed, **{"hierarchy.L": d}) for seed in cfg.sweep.seeds for d in cfg.sweep.depths]


def shape_variants(cfg: Config) -> list[Variant]:
    """Whole ``hierarchy.spec`` strings from ``sweep.shapes`` at depth ``hierarchy.L``."""
    return [variant(f"spec={spec}", seed, **{"hierarchy.spec": spec})
            for seed in cfg.sweep.seeds for spec in cfg.sweep.shapes]


def encoder_variants(cfg: Config) -> list[Variant]:
    """Table 4a: the same chain and hyperparameters with each encoder of ``sweep.encoders``; an
    encoder whose map cannot hold the spec (a VAE has 4 channels) gets its own from ``sweep.encoder_specs``."""
    specs = cfg.sweep.encoder_specs or [None] * len(cfg.sweep.encoders)
    variants = []
    for seed in cfg.sweep.seeds:
        for name, spec in zip(cfg.sweep.encoders, specs):
            changes = {"encoder.name": name, **({"hierarchy.spec": spec} if spec else {})}
            variants.append(variant(f"encoder={name}", seed, **changes))
    return variants


def rcg_variants(cfg: Config) -> list[Variant]:
    """Table 4b: our L = 2 spatial hierarchy (the config as it is) against RCG's global vector on
    top (``sweep.rcg_encoder`` with ``sweep.rcg_spec``), which RCG conditions on without noise."""
    if cfg.sweep.rcg_spec is None:
        raise ConfigError("sweep.rcg_spec is not set: sweep_rcg needs the spec with RCG's global vector on top, "
                          "e.g. sweep.rcg_spec='28x28x1, 1x1x256'")
    rcg = {"encoder.name": cfg.sweep.rcg_encoder, "hierarchy.spec": cfg.sweep.rcg_spec, "hierarchy.L": 2,
           "hierarchy.sigmas": [0.0] * (len(cfg.sweep.rcg_spec.split(",")) - 1)}
    return [v for seed in cfg.sweep.seeds
            for v in (variant("spatial", seed, **{"hierarchy.L": 2}), variant("rcg", seed, **rcg))]
