"""Self-contained HTML reports (evaluation and comparison) rendered with jinja2.

Why self-contained: a clinician opens the report from MLflow's artifact viewer, an e-mail or a
USB stick, often on a hospital machine with no internet. Every figure is a base64 `data:` URI,
the CSS is inlined, and there is no JavaScript, font or stylesheet fetched from anywhere;
`write_html` refuses to write a report that would reach out (`external_references`).

Templates live in the top-level `reports/templates/` folder, shipped as the package
`pipeline.report_templates` and read with importlib.resources, so an installed `ecl` finds them.
"""
from __future__ import annotations

import base64
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from data_prep import atomic_write_text

__all__ = ["data_uri", "fmt_number", "fmt_ci", "text_table", "markdown_table", "render_html", "write_html",
           "external_references", "TEMPLATE_PACKAGE"]

TEMPLATE_PACKAGE = "pipeline.report_templates"

# src/href/url() pointing at a network location (or protocol-relative //host)
_EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I)


def data_uri(png: bytes, mime: str = "image/png") -> str:
    """Embed image bytes as a data URI (`data:image/png;base64,...`)."""
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def fmt_number(value: Any, digits: int = 3) -> str:
    """A metric for display: None or NaN -> 'n/a' (a class absent from the split), never '0' or 'nan'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(f):
        return "n/a"
    return f"{round(f, digits) + 0.0:.{digits}f}"  # + 0.0 turns -0.0 into 0.0


def _fmt_ci(low: Any, high: Any, digits: int = 3) -> str:
    if fmt_number(low) == "n/a" or fmt_number(high) == "n/a":
        return "n/a"
    return f"[{fmt_number(low, digits)}, {fmt_number(high, digits)}]"


def fmt_ci(pair: Any, digits: int = 3) -> str:
    """A (low, high) interval for display, '[0.612, 0.704]', or 'n/a' (the reports' rule)."""
    return _fmt_ci(pair[0], pair[1], digits) if pair else "n/a"


def text_table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    """A plain-text table for the terminal: first column left-aligned, the others right-aligned.

    Cells that are not strings go through `fmt_number` (so None/NaN print as 'n/a', as in the
    reports). No colour or box drawing: it must survive logs, `tee` and e-mail.
    """
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt_number(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = ([title] if title else []) + [line(cells[0]), "  ".join("-" * w for w in widths)]
    return "\n".join(out + [line(r) for r in cells[1:]])


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """The same table as GitHub markdown (for docs and benchmark pages); '|' in cells is escaped."""
    def cell(c: Any) -> str:
        return (c if isinstance(c, str) else fmt_number(c)).replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return "\n".join(out + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


# In a source checkout the templates sit beside the package; read them from there first, so code
# run from one checkout (PYTHONPATH, a worktree) never renders another checkout's editable-installed
# templates. An installed wheel has no such folder and reads the packaged copy.
_SOURCE_TEMPLATES = Path(__file__).resolve().parent.parent / "reports" / "templates"


def _load_template(name: str) -> str:
    source = _SOURCE_TEMPLATES / name
    if (_SOURCE_TEMPLATES / "base.html").is_file() and source.is_file():
        return source.read_text(encoding="utf-8")
    try:
        return resources.files(TEMPLATE_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise jinja2.TemplateNotFound(name) from None


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (_load_template(name), None, lambda: False)),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_number
    env.filters["ci"] = lambda pair, digits=3: _fmt_ci(pair[0], pair[1], digits) if pair else "n/a"
    return env


def render_html(template: str, **context: Any) -> str:
    """Render `template` (e.g. 'report.html', 'compare.html') with `context`."""
    return _environment().get_template(template).render(**context)


def external_references(html: str) -> list[str]:
    """Every place where `html` would load something from the network (empty for a good report)."""
    return [m.group(0) for m in _EXTERNAL.finditer(html)]


def write_html(path: str | Path, template: str, **context: Any) -> Path:
    """Render and atomically write a report; refuses output that references external resources.

    Raises:
        ValueError: the rendered HTML would load something from the network (a template bug or a
            config string that smuggled a URL into an attribute).
    """
    html = render_html(template, **context)
    bad = external_references(html)
    if bad:
        raise ValueError(f"{template}: the report would load external resources ({bad[:3]}); reports must open offline")
    path = Path(path)
    atomic_write_text(path, html)
    return path
