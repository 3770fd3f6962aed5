"""summary.md and index.html: the same table, and a self-contained page around the figures."""

from __future__ import annotations

import html
from pathlib import Path

from cpt.report.summary import StageRow, table_cells

COLUMN_NOTES = (
    "Δ d: final eval loss minus the stage's base (its step-0 eval) on domain d; below 0 is better. "
    "forgetting: mean Δ over the domains the stage does not train on (above 0 = forgotten). "
    "adaptation: mean loss drop on the stage's own domains (above 0 = learned). "
    "stability gap: the largest rise of an own domain's loss over its base before it first drops below it, "
    "the step of that peak and the step where it dropped below. "
    "Unfinished stages are computed from the metrics logged so far."
)


def markdown_table(rows: list[StageRow]) -> str:
    header, body = table_cells(rows)
    lines = [header, ["---"] * len(header), *body]
    return "".join("| " + " | ".join(_markdown_cell(c) for c in line) + " |\n" for line in lines)


def summary_markdown(title: str, rows: list[StageRow]) -> str:
    return f"# {title}\n\n{markdown_table(rows)}\n{COLUMN_NOTES}\n"


def html_table(rows: list[StageRow]) -> str:
    header, body = table_cells(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>\n" for line in body)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{lines}</tbody>\n</table>"


def html_page(title: str, run_paths: list[Path], rows: list[StageRow], figures: list[tuple[str, str]]) -> str:
    """``figures`` are (file name next to the page, caption)."""
    runs = "".join(f"<li><code>{html.escape(str(p))}</code></li>" for p in run_paths)
    body = "\n".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 2em 0; }}
img {{ max-width: 100%; }}
figcaption {{ color: #555; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<ul>{runs}</ul>
<h2>Summary</h2>
{html_table(rows)}
<p>{html.escape(COLUMN_NOTES)}</p>
<h2>Figures</h2>
{body}
</body>
</html>
"""


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
