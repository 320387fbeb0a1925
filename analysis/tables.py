"""Table 1 / Table 2 layout: a row per depth L, a column per σ_L, cells = metric (mean ± std over seeds)."""
from __future__ import annotations

import math

import pandas as pd

NO_SIGMA = "—"  # L = 1 has no conditioning level, hence no σ


def _sigma_of_top(row: pd.Series) -> str:
    depth = int(row["params.hierarchy.L"])
    return NO_SIGMA if depth == 1 else row[f"params.hierarchy.sigma.{depth}"]


def sigma_table(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows L with shape of z_L, GFLOPs and params of level L's model; columns σ_L; mean/std/n per cell."""
    rows = []
    for _, run in trials.iterrows():
        depth = int(run["params.hierarchy.L"])
        rows.append({
            "L": depth,
            "z_L": run[f"params.hierarchy.shape.{depth}"],
            "GFLOPs": run[f"metrics.level{depth}/gflops"],
            "params_M": run[f"metrics.level{depth}/params"] / 1e6,
            "sigma_L": _sigma_of_top(run),
            "seed": run["params.seed"],
            "value": run[f"metrics.{metric}"],
        })
    long = pd.DataFrame(rows)
    if long.empty:
        return long
    cells = long.groupby(["L", "z_L", "GFLOPs", "params_M", "sigma_L"])["value"].agg(["mean", "std", "count"])
    return cells.reset_index()


def _format_cell(mean: float, std: float, count: int, best: bool) -> str:
    text = f"{mean:.2f}" if count < 2 or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"
    return f"**{text}**" if best else text


def to_wide(cells: pd.DataFrame, bold_best: bool = True) -> pd.DataFrame:
    """One row per L; a column per σ_L; cells with no run say 'missing'; the best (lowest) per row in bold."""
    sigmas = sorted({s for s in cells["sigma_L"] if s != NO_SIGMA}, key=float)
    columns = ([NO_SIGMA] if (cells["sigma_L"] == NO_SIGMA).any() else []) + sigmas
    table = []
    for (depth, shape, gflops, params), group in cells.groupby(["L", "z_L", "GFLOPs", "params_M"]):
        best = group["mean"].min()
        row = {"L": depth, "z_L": shape, "GFLOPs": round(gflops, 4), "Params (M)": round(params, 3)}
        for sigma in columns:
            hit = group[group["sigma_L"] == sigma]
            if (sigma == NO_SIGMA) != (depth == 1):
                row[f"σ_L={sigma}"] = ""  # not applicable: L = 1 has no σ_L, deeper chains always do
            elif hit.empty:
                row[f"σ_L={sigma}"] = "missing"
            else:
                cell = hit.iloc[0]
                row[f"σ_L={sigma}"] = _format_cell(cell["mean"], cell["std"], cell["count"],
                                                   bold_best and cell["mean"] == best and len(group) > 1)
        table.append(row)
    return pd.DataFrame(table)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([f"### {title}", "", header, rule, *body, ""])
