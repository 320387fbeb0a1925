"""PNG figures beside the tables: metric vs σ_L (a line per L), metric vs L, MDM metric vs iterations.
Every point is a mean over seeds with its std as an error bar and the seed count in the legend."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.tables import Table, metric_header  # noqa: E402


def _panels(groups: list, width: float = 4.5):
    fig, axes = plt.subplots(1, len(groups), figsize=(width * len(groups), 3.6), squeeze=False)
    return fig, axes[0]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _seeds(cells: pd.DataFrame) -> str:
    n = sorted({int(v) for v in cells["n"].dropna()})
    count = "/".join(map(str, n)) if n else "?"
    return f"n={count} seed{'' if n == [1] else 's'}"


def _errorbar(ax, x, cells: pd.DataFrame, label: str) -> None:
    ax.errorbar(x, cells["mean"], yerr=cells["std"].fillna(0), marker="o", capsize=3, label=f"{label} ({_seeds(cells)})")


def _anchored(ax, cells: pd.DataFrame) -> None:
    """The metric's anchors (real training images, uniform noise; means over the runs that logged them)
    as labelled lines, and a y-range from 0 that holds them: a gap reads against the metric's range."""
    top = float(cells["mean"].add(cells["std"].fillna(0)).max())
    for field, label, style in (("anchor_real", "real images", ":"), ("anchor_noise", "uniform noise", "-.")):
        if field in cells and cells[field].notna().any():
            value = float(cells[field].mean())
            ax.axhline(value, linestyle=style, color="black", linewidth=1, label=f"{label} ({value:.1f})")
            top = max(top, value)
    ax.set_ylim(0, top * 1.08)


def sigma_plot(table: Table, path: Path) -> Path:
    return _save(sigma_figure(table), path)


def sigma_figure(table: Table):
    """A panel per dataset/conditioning: a line per depth L (and guidance scale, where the runs ablate
    it) over σ_L with seed error bars; L = 1 (no σ) dashed with its spread; the metric's anchors."""
    groups = list(table.cells.groupby(["dataset", "condition"]))
    fig, axes = _panels(groups, width=5.5)
    for ax, ((dataset, condition), cells) in zip(axes, groups):
        by_guidance = cells.loc[cells["L"] > 1, "cfg_scale"].nunique() > 1
        for (depth, scale), at in cells.groupby(["L", "cfg_scale"], dropna=False):
            if depth == 1:
                base = at.iloc[-1]
                ax.axhline(base["mean"], linestyle="--", color="grey", label=f"L=1, no σ ({_seeds(at.iloc[[-1]])})")
                if pd.notna(base["std"]):
                    ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="grey", alpha=0.15)
            else:
                at = at.sort_values("sigma_L")
                _errorbar(ax, at["sigma_L"], at, f"L={depth}" + (f", guidance {scale:g}" if by_guidance else ""))
        _anchored(ax, cells)
        ax.set(title=f"{dataset} — {condition}", xlabel="σ_L", ylabel=metric_header(table.metric) + " (mean ± std)")
        ax.legend(fontsize=7)
    return fig


def depth_plot(table: Table, path: Path) -> Path:
    """Metric vs depth L with seed error bars, a line per dataset/conditioning; the metric's anchors."""
    fig, axes = _panels([None], width=5.5)
    ax = axes[0]
    for (dataset, condition), cells in table.cells.groupby(["dataset", "condition"]):
        cells = cells.sort_values("L")
        _errorbar(ax, cells["L"], cells, f"{dataset} — {condition}")
    _anchored(ax, table.cells)
    ax.set(xlabel="depth L", ylabel=metric_header(table.metric) + " (mean ± std)", title="metric vs depth (sweep_depth)")
    ax.set_xticks(sorted(table.cells["L"].unique()))
    ax.legend(fontsize=7)
    return _save(fig, path)


MDM_FILES = {"Fig. 8a": "mdm_fig8a_phases.png", "Fig. 8b": "mdm_fig8b_resolutions.png",
             "NestedUNet": "mdm_baselines.png"}


def mdm_plots(table: Table, out_dir: Path) -> list[Path]:
    """A figure per MDM ablation: metric vs training iterations, a line per variant (band: ± std over seeds,
    the seed count in the legend)."""
    paths = []
    for family, curves in table.curves.groupby("family"):
        fig, axes = _panels([None], width=5.5)
        ax = axes[0]
        many = curves["dataset"].nunique() > 1
        for (dataset, variant), curve in curves.groupby(["dataset", "variant"]):
            curve = curve.sort_values("step")
            label = (f"{dataset}: {variant}" if many else variant) + f" ({_seeds(curve)})"
            line, = ax.plot(curve["step"], curve["mean"], marker="o", label=label)
            spread = curve["std"].fillna(0)
            ax.fill_between(curve["step"], curve["mean"] - spread, curve["mean"] + spread,
                            color=line.get_color(), alpha=0.2)
        ax.set(title=family, xlabel="training iterations", ylabel=metric_header(table.metric))
        ax.legend(fontsize=8)
        name = next(file for key, file in MDM_FILES.items() if family.startswith(key))
        paths.append(_save(fig, out_dir / name))
    return paths


def guidance_plot(table: Table, path: Path) -> Path:
    """MDM Fig. 8c: the metric against caption agreement, a line per setting, points labelled by guidance."""
    groups = list(table.cells.groupby(["dataset", "condition"]))
    fig, axes = _panels(groups)
    for ax, ((dataset, condition), cells) in zip(axes, groups):
        text_name = cells["text_name"].dropna().iloc[0] if cells["text_name"].notna().any() else None
        for variant, points in cells.sort_values("scale").groupby("variant"):
            x = points["text"] if text_name else points["scale"]
            n = int(points["n"].max())
            ax.errorbar(x, points["mean"], yerr=points["std"].fillna(0), marker="o", capsize=3,
                        label=f"{variant} (n={n} seed{'s' if n > 1 else ''})")
            for xi, yi, scale in zip(x, points["mean"], points["scale"]):
                ax.annotate(f"w={scale:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"{text_name} ↑" if text_name else "guidance scale")
        ax.set_ylabel(metric_header(table.metric))
        ax.set_title(f"{dataset} — {condition}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)
