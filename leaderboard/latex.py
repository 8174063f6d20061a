"""LaTeX tables of the leaderboard (booktabs rules, best value in bold, ``*`` significance marker).

One ``table`` environment per dataset (main table) plus one for its rank scores. The output
needs ``\\usepackage{booktabs}`` (``standalone=True`` wraps it in a compilable article).
"""

from __future__ import annotations

import re

from leaderboard.table import FOOTNOTE, INITIAL, DatasetReport, Report, diverged_notes, ranking_cells, summary_cells

__all__ = ["escape", "tabular", "latex"]

_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_UNICODE = {"↑": r"$\uparrow$", "↓": r"$\downarrow$", "—": "---", "±": r"$\pm$", "<": r"$<$", ">": r"$>$"}


def escape(text: str) -> str:
    """Plain text → LaTeX (special characters escaped, arrows and dashes as LaTeX)."""
    out = "".join(_SPECIAL.get(ch, ch) for ch in str(text))
    for k, v in _UNICODE.items():
        out = out.replace(k, v)
    return out


def _cell(text: str) -> str:
    # Cells from summary_cells(style="tex") already hold LaTeX markup (\textbf, $\pm$, $^{*}$);
    # only the em dash of a missing value needs translating.
    return text.replace("—", "---")


def tabular(head: list[str], rows: list[list[str]], raw_cells: bool = True) -> str:
    """A booktabs ``tabular``: first column left-aligned, the others right-aligned."""
    spec = "l" + "r" * (len(head) - 1)
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(escape(h) for h in head) + r" \\", "\\midrule"]
    for r in rows:
        cells = [escape(r[0])] + [(_cell(c) if raw_cells else escape(c)) for c in r[1:]]
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def _label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9:-]+", "-", name)


def _dataset_tables(ds: DatasetReport) -> str:
    head, rows = summary_cells(ds, "tex")
    kind = "2D/3D registration" if ds.kind == "pose" else "deformable registration"
    what = ("mTRE percentiles and success rates (mTRE $<$ 10 mm, $<$ 2 mm) over all cases, other columns means over cases"
            if ds.kind == "pose" else "Mean [95\\,\\% bootstrap CI] over all cases of all seeds")
    parts = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{escape(ds.name)} ({kind}). {what}; best in bold; "
        f"$^{{*}}$ significantly different from the best (paired Wilcoxon signed-rank, Holm-corrected $p<0.05$, "
        f"and the 95\\,\\% CI of the paired difference excludes 0); "
        f"\\texttt{{{escape(INITIAL)}}}: before registration."
        + "".join(f" Diverged: {escape(n)}." for n in diverged_notes(ds)) + "}",
        f"\\label{{tab:leaderboard-{_label(ds.name)}}}",
        "\\resizebox{\\linewidth}{!}{%",
        tabular(head, rows),
        "}",
        "\\end{table}",
    ]
    h, r = ranking_cells(ds)
    if r:
        parts += [
            "",
            "\\begin{table}[t]",
            "\\centering",
            "\\small",
            f"\\caption{{{escape(ds.name)}: Learn2Reg rank scores per metric (pairwise Wilcoxon rank-sum, $p<0.05$, "
            f"scores in $[0.1, 1]$) and their geometric mean, without and with runtime.}}",
            f"\\label{{tab:rank-{_label(ds.name)}}}",
            tabular(h, r, raw_cells=False),
            "\\end{table}",
        ]
    return "\n".join(parts)


def latex(report: Report, standalone: bool = False) -> str:
    """All datasets' tables; ``standalone`` gives a complete ``article`` document."""
    body = [f"% regbench leaderboard of {escape(str(report.root))}", "% needs \\usepackage{booktabs} and \\usepackage{graphicx}", ""]
    if not report.datasets:
        body.append("% no complete experiment in this results folder")
    for ds in report.datasets:
        body += [_dataset_tables(ds), ""]
    body.append("% " + FOOTNOTE.replace("\n", " "))
    text = "\n".join(body) + "\n"
    if standalone:
        text = ("\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
                "\\begin{document}\n" + text + "\\end{document}\n")
    return text
