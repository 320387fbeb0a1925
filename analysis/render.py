"""A Table as Markdown, LaTeX (booktabs) or CSV; parts are its sub-tables, bold is written **x**."""
from __future__ import annotations

import re

import pandas as pd

from analysis.tables import Table

BOLD = re.compile(r"\*\*(.+?)\*\*")
SUBSCRIPT = re.compile(r"(?<!\w)([σz]_\w)")
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "σ": r"$\sigma$", "—": "---", "×": r"$\times$", "↓": r"$\downarrow$",
                  "≤": r"$\leq$", "²": r"$^2$", "§": r"\S{}"}


def _markdown_rows(frame: pd.DataFrame) -> list[str]:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    return [header, rule, *("| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False))]


def to_markdown(table: Table) -> str:
    lines = [f"## {table.title}", "", table.caption, ""]
    if table.summary:
        lines += ["**What the runs show:**", "", *(f"- {line}" for line in table.summary), ""]
    for part in table.parts:
        lines += [f"### {part.title}", "", *_markdown_rows(part.frame), ""]
    return "\n".join(lines)


def _latex_plain(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, _LATEX_UNICODE.get(ch, ch)) for ch in text)


def _latex_subscript(name: str) -> str:
    """σ_L → $\\sigma_L$, z_L → $z_L$."""
    return "$" + (r"\sigma" if name[0] == "σ" else name[0]) + "_" + name[2] + "$"


def latex_text(text) -> str:
    """Escape for LaTeX text mode (σ_L, z_L as math), then turn **x** into \\textbf{x}."""
    pieces = SUBSCRIPT.split(str(text))  # odd pieces are the subscripted names
    out = "".join(_latex_subscript(p) if i % 2 else _latex_plain(p) for i, p in enumerate(pieces))
    return BOLD.sub(r"\\textbf{\1}", out)


def to_latex(table: Table) -> str:
    """One table float, a tabular per part under its title (needs \\usepackage{booktabs})."""
    lines = [r"\begin{table}[ht]", r"\centering", r"\small",
             rf"\caption{{{latex_text(table.title)}. {latex_text(table.caption)}}}", rf"\label{{tab:{table.name}}}"]
    for part in table.parts:
        frame = part.frame
        lines += [rf"\par\medskip\textit{{{latex_text(part.title)}}}\par\smallskip",
                  rf"\begin{{tabular}}{{{'l' * len(frame.columns)}}}", r"\toprule",
                  " & ".join(latex_text(c) for c in frame.columns) + r" \\", r"\midrule",
                  *(" & ".join(latex_text(v) for v in row) + r" \\" for row in frame.itertuples(index=False)),
                  r"\bottomrule", r"\end{tabular}"]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """All parts stacked, a ``part`` column first; bold markers dropped (``best σ_L`` and the
    lowest value say the same)."""
    frames = [part.frame.astype(str).replace(BOLD, r"\1", regex=True).assign(part=part.title) for part in table.parts]
    stacked = pd.concat(frames, ignore_index=True)
    stacked["source"] = stacked["source"].fillna("ours") if "source" in stacked else "ours"
    first = ["part", "source"]
    return stacked[[*first, *(c for c in stacked.columns if c not in first)]].to_csv(index=False)
