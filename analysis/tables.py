"""The papers' ablation tables from trial runs: Table 1/2 (L × σ_L), depth, shapes, Table 4a/4b, MDM
(its curves, and the guidance curve of Fig. 8c).

Each builder takes the trials (analysis.runs.load_trials: finished, a re-run config counted once),
aggregates the seeds of each setting and returns a Table: parts of display strings, one per
dataset and conditioning, then the papers' published numbers as parts of their own.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from analysis import paper
from analysis.runs import quality_metric, settings
from nds.eval.diagnostics import null_cond_name, sampled_name, true_cond_name
from nds.eval.metrics import CAPTION_CLASS_ACCURACY, CLIP_SCORE, DATA_CLASSIFIER, FID, SUBSTITUTE, anchor_name
from nds.tracking import Tag

NA = "—"  # not applicable: L = 1 has no σ_L
MISSING = "missing"  # no finished run with the metric for this cell
NO_SIGMA = "no σ (L=1)"
UNCONDITIONAL = "unconditional"
METRIC_TITLES = {
    FID: "FID (clean-fid, Inception-v3)",
    SUBSTITUTE: ("fd_effnet_lite0 — Fréchet distance in EfficientNet-Lite0 feature space, a substitute "
                 "because the Inception weights were absent; its values are not comparable with Inception FIDs"),
    DATA_CLASSIFIER: ("fd_data_classifier — Fréchet distance in the features of a small CNN trained on the dataset's "
                      "own labelled training split, a substitute for FID (absent Inception weights); not comparable "
                      "with Inception FIDs"),
}
PAPER_NOTE = ("Parts marked 'paper' are published numbers at full scale on the paper's dataset (their metric: "
              "Inception FID), not our runs: compare trends, not values.")


@dataclass
class Part:
    title: str
    frame: pd.DataFrame  # display strings; bold as **x**


@dataclass
class Table:
    name: str  # file stem in the output folder
    title: str
    caption: str
    parts: list[Part]
    cells: pd.DataFrame  # the aggregated settings shown (mean, std, n per setting), for plots
    metric: str
    notes: list[str] = field(default_factory=list)
    curves: pd.DataFrame | None = None  # MDM: mean/std over seeds per training step
    summary: list[str] = field(default_factory=list)  # plain sentences: what the runs show, with seed spreads


def metric_header(metric: str) -> str:
    return ("FID" if metric == FID else metric) + " ↓"


# -- runs → one described row per run ------------------------------------------------------------


def _condition(get) -> str:
    text, classes = get("params.model.text_encoder", ""), int(get("params.model.num_classes", 0))
    if text:
        return f"text ({text})"
    return f"class ({classes} classes)" if classes > 0 else UNCONDITIONAL


def _mdm_family(variant: str) -> str:
    """Which MDM figure a variant belongs to, from the sweep's variant names."""
    if variant.startswith("phase"):
        return "Fig. 8a: progressive-training schedules"
    if variant.startswith("res"):
        return "Fig. 8b: number of nested resolutions"
    return "NestedUNet vs cascaded vs plain vs latent"


def describe(trials: pd.DataFrame) -> pd.DataFrame:
    """The fields the tables show, one row per run, index kept (missing values are NaN)."""
    rows = {}
    for index, run in trials.iterrows():
        def get(key, default=math.nan, run=run):
            value = run.get(key)
            return default if value is None or (isinstance(value, float) and math.isnan(value)) else value

        depth = int(get("params.hierarchy.L", 1))
        sigmas = [float(get(f"params.hierarchy.sigma.{level}")) for level in range(2, depth + 1)]
        variant = get(f"tags.{Tag.VARIANT}", "")
        rows[index] = {
            "run_id": run["run_id"], "start_time": run["start_time"],
            "group": f'{variant}|{get(f"tags.{Tag.GROUP_HASH}", None) or get(f"tags.{Tag.CONFIG_HASH}")}',  # a setting's seeds
            "variant": variant, "dataset": get("params.data.name", "?"), "condition": _condition(get),
            "L": depth, "sigma_L": sigmas[-1] if sigmas else math.nan, "sigmas": ", ".join(f"{s:g}" for s in sigmas),
            "z_L": get(f"params.hierarchy.shape.{depth}", "n/a"), "spec": get("params.hierarchy.spec", "n/a"),
            "encoder": get("params.encoder.name", "n/a"),
            "gflops_L": get(f"metrics.level{depth}/gflops"), "params_L": get(f"metrics.level{depth}/params"),
            "gflops_total": get("metrics.total/gflops"), "params_total": get("metrics.total/params"),
            "family": _mdm_family(variant), "baseline": get(f"tags.{Tag.MDM_BASELINE}", "n/a"),
            "resolutions": get("params.mdm.resolutions", "n/a"), "phase_steps": get("params.mdm.phase_steps", "n/a"),
            "mdm_gflops": get("metrics.mdm/gflops"), "mdm_params": get("metrics.mdm/params"),
            "cfg_scale": float(get("params.diffusion.cfg_scale", math.nan)), "seed": get("params.seed", "?"),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def _scored(trials: pd.DataFrame, sweep: str, keep: Callable[[pd.DataFrame], pd.Series] | None = None,
            metric: str | None = None):
    """The described runs of one sweep (optionally filtered), with ``value`` = ``metric`` (default:
    ``analysis.runs.quality_metric`` of those runs)."""
    runs = trials[trials[f"tags.{Tag.SWEEP}"] == sweep]
    frame = describe(runs)
    if keep is not None and not frame.empty:
        frame = frame[keep(frame)]
    runs = runs.loc[frame.index]
    metric = metric or quality_metric(runs)
    logged = {"value": metric, **diagnostic_metrics(metric)}
    frame = frame.assign(**{field_: runs[f"metrics.{name}"] if f"metrics.{name}" in runs else math.nan
                            for field_, name in logged.items()})
    return frame, metric


def diagnostic_metrics(metric: str) -> dict[str, str]:
    """Field of the tables -> the chain diagnostic's logged metric (``nds.eval.diagnostics``), for ``metric``."""
    return {"diag_sampled": sampled_name(metric), "true_cond": true_cond_name(metric, 1),
            "null_cond": null_cond_name(metric, 1), "z_fd": "level2/z_fd", "z_fd_floor": "level2/z_fd_floor",
            "z_std": "level2/z_std", "anchor_real": anchor_name(metric, "real"), "anchor_noise": anchor_name(metric, "noise")}


DIAGNOSTIC_FIELDS = tuple(diagnostic_metrics(FID))


# -- formatting ----------------------------------------------------------------------------------


def _num(x, spec: str = ".4g") -> str:
    return "n/a" if pd.isna(x) else format(x, spec)


def _millions(x) -> str:
    return "n/a" if pd.isna(x) else f"{x / 1e6:.3g}M"


def _growth(total, base) -> str:
    return "n/a" if pd.isna(total) or pd.isna(base) or base == 0 else f"{(total / base - 1) * 100:+.1f}%"


def cell(setting: pd.Series | None, bold: bool = False) -> str:
    """mean ± std over seeds (n shown when n > 1); 'missing' when no run has the metric."""
    if setting is None or pd.isna(setting["mean"]):
        return MISSING
    n = int(setting["n"])
    text = f"{setting['mean']:.2f}" if n < 2 else f"{setting['mean']:.2f} ± {setting['std']:.2f} (n={n})"
    return f"**{text}**" if bold else text


def _is_best(setting: pd.Series, scored: pd.Series) -> bool:
    """Bold the lowest where there is a choice (two or more scored cells)."""
    return scored.count() > 1 and setting["mean"] == scored.min()


def _sigma_label(sigma: float) -> str:
    return f"σ_L={float(sigma)}"


# -- Table 1 / Table 2: rows L, columns σ_L ------------------------------------------------------


def _with_growth(cells: pd.DataFrame) -> pd.DataFrame:
    """Total GFLOPs relative to the L = 1 setting of the same dataset and conditioning (the paper's growth)."""
    base = cells[cells["L"] == 1].groupby(["dataset", "condition"])["gflops_total"].last()
    return cells.assign(growth=[NA if depth == 1 else _growth(total, base.get(key))
                                for depth, total, key in zip(cells["L"], cells["gflops_total"],
                                                             zip(cells["dataset"], cells["condition"]))])


def _sigma_part(cells: pd.DataFrame) -> pd.DataFrame:
    """A row per depth L (per (L, guidance scale) when the runs ablate guidance), a column per σ_L."""
    sigmas = sorted(cells["sigma_L"].dropna().unique())
    has_l1 = (cells["L"] == 1).any()
    by_guidance = cells.loc[cells["L"] > 1, "cfg_scale"].nunique() > 1
    rows = []
    for _, at in cells.groupby(["L", "cfg_scale"] if by_guidance else ["L"], dropna=False):
        info = at.iloc[-1]
        depth = info["L"]
        row = {"L": depth, "z_L": info["z_L"]}
        if by_guidance:  # an unconditional L = 1 has nothing to guide
            row["guidance"] = NA if depth == 1 and info["condition"] == UNCONDITIONAL else _num(info["cfg_scale"], "g")
        row.update({"GFLOPs (level L)": _num(info["gflops_L"]), "GFLOPs total": _num(info["gflops_total"]),
                    "GFLOPs growth vs L=1": info["growth"], "params (level L)": _millions(info["params_L"])})
        if has_l1:
            row[NO_SIGMA] = cell(info) if depth == 1 else NA
        for sigma in sigmas:
            hit = at[at["sigma_L"] == sigma]
            found = hit.iloc[0] if len(hit) else None
            row[_sigma_label(sigma)] = NA if depth == 1 else cell(found, found is not None and _is_best(found, at["mean"]))
        best = at.loc[at["mean"].idxmin()] if depth > 1 and at["mean"].notna().any() else None
        row["best σ_L"] = NA if best is None else str(float(best["sigma_L"]))
        rows.append(row)
    return pd.DataFrame(rows)


def _diagnostic_part(cells: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """The chain diagnostic beside each setting with L > 1 (means over seeds), or None if no run logged it."""
    chains = cells[(cells["L"] > 1) & cells["true_cond"].notna()].sort_values(["L", "sigma_L", "cfg_scale"])
    if chains.empty:
        return None
    return pd.DataFrame([{
        "L": s["L"], "σ_2..σ_L": s["sigmas"], "guidance": _num(s["cfg_scale"], "g"),
        metric_header(metric): cell(s),
        "sampled (diag. n)": _num(s["diag_sampled"], ".2f"), "level 1 true cond.": _num(s["true_cond"], ".2f"),
        "level 1 null cond.": _num(s["null_cond"], ".2f"),
        "prior's share (sampled − true)": _num(s["diag_sampled"] - s["true_cond"], "+.2f"),
        "condition use (null − true)": _num(s["null_cond"] - s["true_cond"], "+.2f"),
        "z_2 FD (floor)": f"{_num(s['z_fd'], '.1f')} ({_num(s['z_fd_floor'], '.1f')})",
        "z_2 std": _num(s["z_std"], ".2f"),
    } for _, s in chains.iterrows()])


DIAGNOSTIC_TITLE = ("chain diagnostic (means over seeds): level 1 sampled from the true condition (held-out z_2) "
                    "and from the null one, with the same noise; sampled z_2 against held-out z_2")


def _gap_sentence(runs: pd.DataFrame, base: pd.Series, other: pd.Series, what: str) -> str:
    """'<other> beats/trails <base> by X ± Y over n seeds' from the per-seed differences where the
    seeds match (else the difference of the means), with whether it is a finding."""
    paired = runs[runs["group"] == base.name][["seed", "value"]].merge(
        runs[runs["group"] == other.name][["seed", "value"]], on="seed", suffixes=("_base", "_other"))
    gaps = paired["value_base"] - paired["value_other"]
    gap = gaps.mean() if len(gaps) else base["mean"] - other["mean"]
    verb = "beats" if gap > 0 else "trails"
    detail = f" ± {gaps.std():.2f}" if len(gaps) > 1 else ""
    wins = f", better in {int((gaps > 0).sum())} of {len(gaps)} paired seeds" if len(gaps) > 1 else ""
    return f"{what} {verb} L=1 by {abs(gap):.2f}{detail} over {int(min(base['n'], other['n']))} seed(s){wins} " \
           f"({_verdict(gap, base, other)})."


def _verdict(gap: float, a: pd.Series, b: pd.Series) -> str:
    """Whether a gap between two settings is a finding: beyond 3× the larger of their seed stds."""
    spread = max(a["std"] if pd.notna(a["std"]) else 0.0, b["std"] if pd.notna(b["std"]) else 0.0)
    if min(a["n"], b["n"]) < 2:
        return "one seed: not a finding"
    if abs(gap) > 3 * spread:
        return f"more than 3× the larger seed std ({spread:.2f}): a finding"
    if abs(gap) > spread:
        return f"beyond the larger seed std ({spread:.2f}) but under 3×: suggestive, not a finding"
    return f"within the seed std ({spread:.2f}): not a finding"


def _setting(s: pd.Series) -> str:
    sigmas = f", σ = {s['sigmas']}" if s["sigmas"] else ""
    unguided = s["L"] == 1 and s["condition"] == UNCONDITIONAL
    guidance = f", guidance {s['cfg_scale']:g}" if pd.notna(s["cfg_scale"]) and not unguided else ""
    return f"L={s['L']}{sigmas}{guidance}"


def trend_summary(runs: pd.DataFrame, cells: pd.DataFrame, metric: str) -> list[str]:
    """Plain sentences per dataset/conditioning: the best nested setting against L = 1, the spread of
    the σ (and guidance) choices, and what the diagnostic says about the best setting."""
    lines = []
    for (dataset, condition), group in cells.groupby(["dataset", "condition"]):
        group = group.set_index("group")
        scored, deep = group[group["mean"].notna()], group[(group["L"] > 1) & group["mean"].notna()]
        if deep.empty:
            continue
        best = deep.loc[deep["mean"].idxmin()]
        where = f"{dataset}, {condition}: "
        base = scored[scored["L"] == 1]
        if len(base):
            lines.append(where + _gap_sentence(runs, base.iloc[-1], best, f"{_setting(best)} (the best nested setting)"))
        rivals = deep[(deep["L"] == best["L"]) & (deep.index != best.name)]
        if len(rivals):
            runner = rivals.loc[rivals["mean"].idxmin()]
            margin = runner["mean"] - best["mean"]
            lines.append(where + f"at L={best['L']} the best setting ({_setting(best)}, {best['mean']:.2f}) leads the "
                                 f"next ({_setting(runner)}, {runner['mean']:.2f}) by {margin:.2f} "
                                 f"({_verdict(margin, best, runner)}).")
        if pd.notna(best.get("true_cond")):
            lines.append(where + f"diagnostic of {_setting(best)}: level 1 scores {best['true_cond']:.2f} from the true "
                                 f"condition and {best['null_cond']:.2f} from the null one (condition use "
                                 f"{best['null_cond'] - best['true_cond']:+.2f}); the sampled chain "
                                 f"{best['diag_sampled']:.2f}, so the prior's share is "
                                 f"{best['diag_sampled'] - best['true_cond']:+.2f}; sampled z_2 FD {best['z_fd']:.1f} "
                                 f"(floor {best['z_fd_floor']:.1f}), std {best['z_std']:.2f}.")
    return lines


def _paper_table1b() -> Part:
    source = paper.TABLE1B
    rows = []
    for depth, shape, gflops, params, fids in source["rows"]:
        row = {"source": "paper T1(b)", "L": depth, "z_L": shape, "growth GFLOPs (as printed)": f"{gflops:.2f}",
               "growth params (as printed)": params, NO_SIGMA: f"{fids[0]:.2f}" if depth == 1 else NA}
        best = min(fids)
        for sigma in source["sigmas"]:
            row[_sigma_label(sigma)] = NA
        if depth > 1:
            for sigma, fid in zip(source["sigmas"], fids):
                row[_sigma_label(sigma)] = f"**{fid:.2f}**" if fid == best else f"{fid:.2f}"
        row["best σ_L"] = NA if depth == 1 else str(source["sigmas"][fids.index(best)])
        rows.append(row)
    return Part(f"paper — {source['source']} (published, not our runs)", pd.DataFrame(rows))


def _paper_imagenet1k() -> Part:
    source = paper.IMAGENET1K_CONDITIONAL
    frame = pd.DataFrame([{"source": "paper §4.3", "L": depth, "FID": f"{fid:.1f}"} for depth, fid in source["rows"]])
    return Part(f"paper — {source['source']} (published, not our runs)", frame)


def _by_dataset(cells: pd.DataFrame, build: Callable[[pd.DataFrame], pd.DataFrame],
                metric: str | None = None) -> list[Part]:
    """A part per dataset and conditioning; given ``metric``, each followed by its chain diagnostic."""
    parts = []
    for (dataset, condition), group in cells.groupby(["dataset", "condition"], sort=True):
        parts.append(Part(f"{dataset} — {condition} — ours", build(group)))
        diagnostic = _diagnostic_part(group, metric) if metric else None
        if diagnostic is not None:
            parts.append(Part(f"{dataset} — {condition} — {DIAGNOSTIC_TITLE}", diagnostic))
    return parts


def _caption(metric: str, cells: pd.DataFrame, what: str, paper_note: str = PAPER_NOTE) -> str:
    datasets = ", ".join(sorted(cells["dataset"].unique()))
    return (f"Ours on {datasets}: {METRIC_TITLES[metric]}. Cells: mean ± std over seeds (n = seeds when > 1), "
            f"lower is better; {what} 'missing' = no finished run. {paper_note}")


def _notes(name: str, hidden: int) -> list[str]:
    return [f"{name}: {hidden} older setting(s) on the same cells not shown (the newest is)"] if hidden else []


def sigma_tables(trials: pd.DataFrame, metric: str | None = None) -> tuple[list[Table], list[str]]:
    """Table 1 (unconditional) and Table 2 (class- or text-conditional) from sweep_sigma."""
    specs = [("table1_sigma", "Table 1: unconditional generation, L × σ_L", False, [_paper_table1b()]),
             ("table2_sigma", "Table 2: conditional generation (class or text), L × σ_L", True, [_paper_imagenet1k()])]
    tables, skipped = [], []
    for name, title, conditional, paper_parts in specs:
        frame, shown = _scored(trials, "sweep_sigma", lambda f, c=conditional: (f["condition"] != UNCONDITIONAL) == c,
                               metric)
        if frame.empty:
            kind = "conditional" if conditional else "unconditional"
            skipped.append(f"{name}: no finished sweep_sigma trials ({kind}) — skipped")
            continue
        cells, hidden = settings(frame, ["dataset", "condition", "L", "cfg_scale", "sigma_L"], DIAGNOSTIC_FIELDS)
        cells = _with_growth(cells)
        caption = _caption(shown, cells, "bold = best σ_L per row (the σ carried to depth L+1); "
                                         "'—' = not applicable (L = 1 has no σ_L);")
        tables.append(Table(name, title, caption, _by_dataset(cells, _sigma_part, shown) + paper_parts,
                            cells, shown, _notes(name, hidden), summary=trend_summary(frame, cells, shown)))
    return tables, skipped


# -- one row per setting: depth, shapes, encoders (Table 4a), RCG (Table 4b) ---------------------


FIELD_FORMAT = {"gflops_L": _num, "gflops_total": _num, "mdm_gflops": _num, "params_total": _millions,
                "mdm_params": _millions, "iterations": lambda x: _num(x, ".0f"), "sigmas": lambda x: x or NA,
                "cfg_scale": lambda x: _num(x, ".3g")}


def _rows(columns: dict[str, str], metric: str, sort: list[str]):
    """A part builder: the ``columns`` (header → field of describe) per setting, then the metric, the lowest in bold."""
    def build(cells: pd.DataFrame) -> pd.DataFrame:
        cells = cells.sort_values(sort)
        return pd.DataFrame([{**{header: FIELD_FORMAT.get(f, lambda x: x)(s[f]) for header, f in columns.items()},
                              metric_header(metric): cell(s, _is_best(s, cells["mean"]))}
                             for _, s in cells.iterrows()])
    return build


def _row_table(trials, sweep, name, title, keys, columns, what, metric, paper_parts=(), paper_note=PAPER_NOTE):
    frame, metric = _scored(trials, sweep, metric=metric)
    if frame.empty:
        return None, f"{name}: no finished {sweep} trials — skipped"
    cells, hidden = settings(frame, ["dataset", "condition", *keys], DIAGNOSTIC_FIELDS)
    cells = _with_growth(cells)
    parts = _by_dataset(cells, _rows(columns, metric, keys), metric) + list(paper_parts)
    return Table(name, title, _caption(metric, cells, what, paper_note), parts, cells, metric, _notes(name, hidden),
                 summary=trend_summary(frame, cells, metric)), None


def _paper_best_per_depth() -> Part:
    source = paper.TABLE1B
    rows = [{"source": "paper T1(b)", "L": depth, "z_L": shape,
             "FID at best σ_L": f"{min(fids):.2f}",
             "best σ_L": NA if depth == 1 else str(source["sigmas"][fids.index(min(fids))])}
            for depth, shape, _, _, fids in source["rows"]]
    return Part(f"paper — {source['source']}, best σ_L per depth (published, not our runs)", pd.DataFrame(rows))


def depth_table(trials, metric: str | None = None):
    columns = {"L": "L", "z_L": "z_L", "σ_2..σ_L": "sigmas", "GFLOPs (level L)": "gflops_L",
               "GFLOPs total": "gflops_total", "GFLOPs growth vs L=1": "growth", "params total": "params_total"}
    return _row_table(trials, "sweep_depth", "depth", "Depth ablation: metric per L", ["L"], columns,
                      "bold = best depth;", metric, [_paper_best_per_depth()])


def shapes_table(trials, metric: str | None = None):
    columns = {"spec": "spec", "L": "L", "z_L": "z_L", "GFLOPs total": "gflops_total", "params total": "params_total"}
    return _row_table(trials, "sweep_shapes", "shapes", "Latent-shape ablation: metric per hierarchy spec",
                      ["L", "spec"], columns, "bold = best spec;", metric,
                      paper_note="The papers give no numbers for this ablation.")


def encoders_table(trials, metric: str | None = None):
    columns = {"encoder": "encoder", "L": "L", "spec": "spec", "GFLOPs total": "gflops_total",
               "params total": "params_total"}
    return _row_table(trials, "sweep_encoders", "table4a_encoders", "Table 4a: visual representation (encoder) at fixed L",
                      ["L", "encoder"], columns, "bold = best encoder;", metric,
                      paper_note="The paper's Table 4a numbers are not legible in its text, so none are shown.")


def rcg_table(trials, metric: str | None = None):
    columns = {"variant": "variant", "encoder": "encoder", "spec": "spec", "L": "L", "σ_2..σ_L": "sigmas"}
    return _row_table(trials, "sweep_rcg", "table4b_rcg", "Table 4b: spatial hierarchy vs RCG's global vector (L = 2)",
                      ["variant"], columns, "bold = best variant;", metric,
                      paper_note="The paper's Table 4b numbers are not legible in its text, so none are shown.")


def _paper_uvit_coco() -> Part:
    source = paper.UVIT_COCO
    frame = pd.DataFrame([{"source": "U-ViT README", "model": model, "L": depth, "FID": f"{fid:.2f}"}
                          for model, depth, fid in source["rows"]])
    return Part(f"published — {source['source']} (not our runs)", frame)


def text_table(trials, metric: str | None = None):
    """Table 3: text-conditional generation per depth L at its best σ_L and guidance, beside the
    single-level U-ViT's published COCO FIDs."""
    frame, metric = _scored(trials, "sweep_sigma", lambda f: f["condition"].str.startswith("text"), metric)
    if frame.empty:
        return None, "table3_text: no finished text-conditional sweep_sigma trials — skipped"
    cells, hidden = settings(frame, ["dataset", "condition", "L", "cfg_scale", "sigma_L"], DIAGNOSTIC_FIELDS)
    scored = cells.dropna(subset=["mean"])
    best = scored.loc[scored.groupby(["dataset", "condition", "L"])["mean"].idxmin()]
    best = _with_growth(best)
    columns = {"L": "L", "σ_2..σ_L": "sigmas", "guidance": "cfg_scale", "GFLOPs total": "gflops_total",
               "GFLOPs growth vs L=1": "growth", "params total": "params_total"}
    caption = _caption(metric, best, "each row is the depth's best setting over σ_L and guidance; bold = best depth;",
                       "The paper's Table 3 numbers are not legible in its text; the published part is U-ViT's "
                       "own COCO FIDs (Inception FID at full scale): compare trends, not values.")
    return Table("table3_text", "Table 3: text-conditional generation, best setting per depth", caption,
                 _by_dataset(best, _rows(columns, metric, ["L"]), metric) + [_paper_uvit_coco()], best, metric,
                 _notes("table3_text", hidden), summary=trend_summary(frame, best, metric)), None


# -- MDM: final values per variant, curves over training iterations ------------------------------


def _paper_mdm() -> list[Part]:
    cost = paper.MDM_SEC_PER_ITER
    fid = paper.MDM_FID
    return [Part(f"paper — {cost['source']} (published, not our runs)",
                 pd.DataFrame([{"source": "paper MDM App. D.3", "baseline": b, "paper's model": m, "sec/iter": f"{t:.2f}"}
                               for b, m, t in cost["rows"]])),
            Part(f"paper — {fid['source']} (published, not our runs)",
                 pd.DataFrame([{"source": "paper MDM T1", "setting": s, "FID": f"{v:.2f}"} for s, v in fid["rows"]]))]


def mdm_table(trials: pd.DataFrame, history: Callable[[list[str], str], pd.DataFrame], metric: str | None = None):
    """Final metric, iterations and cost per MDM variant; ``history(run_ids, metric)`` gives the curves."""
    frame, metric = _scored(trials, "sweep_mdm", metric=metric)
    if frame.empty:
        return None, "mdm: no finished sweep_mdm trials — skipped"
    steps = history(list(frame["run_id"]), metric).merge(frame[["run_id", "group"]], on="run_id")
    frame = frame.assign(iterations=frame["run_id"].map(steps.groupby("run_id")["step"].max()))
    cells, hidden = settings(frame, ["dataset", "family", "variant"])
    curves = (steps[steps["group"].isin(cells["group"])]
              .merge(cells[["group", "dataset", "family", "variant"]], on="group")
              .groupby(["dataset", "family", "variant", "step"])["value"].agg(["mean", "std", "count"])
              .rename(columns={"count": "n"}).reset_index())
    build = _rows({"variant": "variant", "baseline": "baseline", "resolutions": "resolutions",
                   "phase steps": "phase_steps", "iterations": "iterations", "GFLOPs": "mdm_gflops",
                   "params": "mdm_params"}, metric, ["variant"])
    parts = [Part(f"{dataset} — {family} — ours (final values)", build(group))
             for (dataset, family), group in cells.groupby(["dataset", "family"])]
    caption = _caption(metric, cells, "final value = the last evaluation (curves: mdm_*.png); bold = best per part;")
    table = Table("mdm", "MDM ablations: progressive training, nested resolutions, baselines", caption,
                  parts + _paper_mdm(), cells, metric, _notes("mdm", hidden), curves)
    return table, None


# -- MDM Fig. 8c: quality against caption agreement over guidance scales ---------------------------

TEXT_SCORES = (CLIP_SCORE, CAPTION_CLASS_ACCURACY)  # first found is shown
GUIDANCE_PREFIX = "metrics.guidance"


def _guidance_points(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per run and guidance scale: the metric and the caption agreement at that scale."""
    described = describe(runs)
    scales = sorted({float(column[len(GUIDANCE_PREFIX):].split("/")[0]) for column in runs.columns
                     if column.startswith(GUIDANCE_PREFIX)})
    rows = []
    for index, run in runs.iterrows():
        for scale in scales:
            prefix = f"{GUIDANCE_PREFIX}{scale:g}/"
            text = next((name for name in TEXT_SCORES if pd.notna(run.get(prefix + name))), None)
            if pd.notna(run.get(prefix + metric)):
                rows.append({**described.loc[index, ["dataset", "condition", "variant"]].to_dict(), "scale": scale,
                             "value": run[prefix + metric], "text_name": text,
                             "text": run[prefix + text] if text else math.nan, "run_id": run["run_id"]})
    return pd.DataFrame(rows)


def guidance_table(trials: pd.DataFrame, metric: str | None = None):
    """MDM Fig. 8c: each sweep_mdm setting's final model at every guidance scale of sweep.cfg_scales,
    the quality metric (mean ± std over seeds) beside the samples' agreement with their captions."""
    runs = trials[trials[f"tags.{Tag.SWEEP}"] == "sweep_mdm"]
    metric = metric or quality_metric(runs)
    points = _guidance_points(runs, metric)
    if points.empty:
        return None, "fig8c_guidance: no sweep_mdm trial logged a guidance curve (sweep.cfg_scales) — skipped"
    keys = ["dataset", "condition", "variant", "scale"]
    cells = (points.groupby(keys).agg(mean=("value", "mean"), std=("value", "std"), n=("value", "count"),
                                      text=("text", "mean"), text_std=("text", "std"),
                                      text_name=("text_name", "first"))
             .reset_index())
    parts = []
    for (dataset, condition), group in cells.groupby(["dataset", "condition"]):
        text_name = group["text_name"].dropna().iloc[0] if group["text_name"].notna().any() else None
        frame = pd.DataFrame([{"variant": c["variant"], "guidance": _num(c["scale"], ".3g"),
                               metric_header(metric): cell(c, _is_best(c, group["mean"])),
                               **({f"{text_name} ↑": f"{c['text']:.3f}" + ("" if pd.isna(c["text_std"])
                                                                         else f" ± {c['text_std']:.3f}")}
                                  if text_name else {})}
                              for _, c in group.sort_values(["variant", "scale"]).iterrows()])
        parts.append(Part(f"{dataset} — {condition} — ours", frame))
    agreement = ("caption agreement: clip_score (CLIP, 100 x cosine) where eval.clip_dir was given, else "
                 "caption_class_accuracy (the data classifier's class of a sample = its caption's class; a "
                 "substitute, not a CLIP score)")
    caption = _caption(metric, cells, f"a row per guidance scale of the final model; {agreement};",
                       "MDM Fig. 8c is a curve without numbers in its text: compare its shape (quality against "
                       "caption agreement as guidance grows), not values.")
    return Table("fig8c_guidance", "MDM Fig. 8c: guidance trades quality against caption agreement", caption,
                 parts, cells, metric), None
