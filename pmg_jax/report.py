"""report.html: localisation and part tables, where each map's peaks land, and the images whose blocks disagree most.

A static page: HTML tables, one inline SVG bar chart per map (no JavaScript, no new dependency) and
the image grids by relative path. Blocks "disagree" on an image by 1 - the mean pairwise Pearson
correlation of their maps over its pixels: 0 when they look at the same places, up to 2 when
they look at complementary ones. Correlation rather than peak spread because it reads the whole
map, not one pixel that ties or noise can move. Plain numpy; no JAX.
"""

from __future__ import annotations

import html
import itertools
import os
from collections.abc import Mapping, Sequence

import numpy as np

BLOCKS = ("block1", "block2", "block3")
AUC_METRICS = ("Deletion", "Insertion")  # areas under curves, in [0, 1]; every other metric is a fraction
CHART_HEIGHT = 120.0  # px of a 100% bar
_BAR, _GAP, _TOP, _LABEL = 28.0, 10.0, 28.0, 70.0  # bar width, gap, room for the title, for the part names
_LEFT = _LABEL / 3**0.5  # room on the left for the first part name, rotated by 60 degrees
_STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}td:first-child,th:first-child{text-align:left}
svg{margin:0 1.5em 1em 0}rect{fill:#4878d0}line.baseline{stroke:#d65f5f;stroke-width:2;stroke-dasharray:4 2}
figure{display:inline-block;margin:0 1em 1em 0}img{max-width:100%}"""


def disagreement(maps: Mapping[str, np.ndarray], names: Sequence[str] = BLOCKS) -> np.ndarray:
    """Per image (N,): 1 - the mean Pearson correlation over pixels of each pair of the named (N, H, W) maps.

    A constant map (a dead block) correlates 0 with any other.
    """
    flat = [np.asarray(maps[name], np.float64).reshape(len(maps[name]), -1) for name in names]
    if len(flat) < 2:
        raise ValueError(f"disagreement needs two maps or more, not {list(names)}")
    centred = [f - f.mean(axis=1, keepdims=True) for f in flat]
    norms = [np.sqrt(np.sum(c * c, axis=1)) for c in centred]
    pairs = []
    for (a, na), (b, nb) in itertools.combinations(zip(centred, norms), 2):
        denominator = na * nb
        pairs.append(np.where(denominator > 0, np.sum(a * b, axis=1) / np.where(denominator > 0, denominator, 1), 0))
    return 1.0 - np.mean(pairs, axis=0)


def most_disagreeing(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest disagreement scores, highest first (equal scores: lower index first)."""
    return np.argsort(-np.asarray(scores), kind="stable")[:n]


def _cell(metric: str, value: float) -> str:
    """'-' for an undefined value, areas under curves as they are, fractions in %."""
    if value is None or np.isnan(value):
        return "-"
    return f"{value:.3f}" if metric in AUC_METRICS else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table from already formatted cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def localization_section(report: dict) -> str:
    """A table per CAM method: a row per map, a column per metric (as localization.evaluate returns them)."""
    out = [
        f"<h2>Localisation</h2><p>{report['count']} images; pointing game of a centre guess "
        f"{_cell('Pointing', report['centre_pointing'])}%. Accuracies in %, deletion (lower is better) and "
        "insertion (higher) as areas under their curves.</p>"
    ]
    for method, per_map in report["results"].items():
        metrics = list(next(iter(per_map.values())))
        rows = [[name, *(_cell(k, values[k]) for k in metrics)] for name, values in per_map.items()]
        out.append(f"<h3>{html.escape(method)}</h3>" + _table(["map", *metrics], rows))
    return "\n".join(out)


def _part_tables(table: dict, columns: Sequence[str], baseline_label: str) -> str:
    """The peak and energy tables of one set of images (a split's or a class's), values in %."""
    out = []
    for kind, what in (
        ("peak", "% of the images showing each part whose CAM peak lands on it"),
        ("energy", "mean % of the CAM's energy on each part (same images)"),
    ):
        rows = [[name, *(_cell(kind, values[c]) for c in columns)] for name, values in table[kind].items()]
        rows.append([baseline_label, *(_cell(kind, table["baseline"][kind][c]) for c in columns)])
        out.append(f"<p>{html.escape(what)}</p>" + _table(["map", *columns], rows))
    return "\n".join(out)


def bar_chart(name: str, values: Mapping[str, float], baseline: Mapping[str, float] | None = None) -> str:
    """An inline SVG bar per entry of `values` (fractions; NaN draws none), dashed lines at the baseline's."""
    width = _LEFT + len(values) * (_BAR + _GAP) + _GAP
    items = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{_TOP + CHART_HEIGHT + _LABEL:g}" '
        f'data-map="{html.escape(name)}"><text x="{_GAP:g}" y="12" font-size="12" font-weight="bold">'
        f"{html.escape(name)}</text>"
    ]
    for k, (part, value) in enumerate(values.items()):
        x, label = _LEFT + _GAP + k * (_BAR + _GAP), html.escape(part)
        if not np.isnan(value):
            height = CHART_HEIGHT * value
            y = _TOP + CHART_HEIGHT - height
            items.append(
                f'<rect x="{x:g}" y="{y:.4f}" width="{_BAR:g}" height="{height:.4f}" data-part="{label}">'
                f"<title>{label}: {100 * value:.1f}%</title></rect>"
                f'<text x="{x + _BAR / 2:g}" y="{y - 2:.4f}" font-size="9" text-anchor="middle">'
                f"{100 * value:.0f}</text>"
            )
        if baseline is not None and not np.isnan(baseline[part]):
            y = _TOP + CHART_HEIGHT * (1 - baseline[part])
            items.append(f'<line class="baseline" x1="{x:g}" x2="{x + _BAR:g}" y1="{y:.4f}" y2="{y:.4f}"/>')
        bottom = _TOP + CHART_HEIGHT + 4
        items.append(
            f'<text x="{x + _BAR / 2:g}" y="{bottom:g}" font-size="10" text-anchor="end" '
            f'transform="rotate(-60 {x + _BAR / 2:g} {bottom:g})">{label}</text>'
        )
    return "".join(items) + "</svg>"


def parts_section(report: dict) -> str:
    """Part tables (parts.tables' dict), a bar chart per map of where its peaks land, per class collapsed."""
    columns = [*report["parts"], "background"]
    visible = ", ".join(f"{k} {v}" for k, v in report["visible"].items())
    out = [
        f"<h2>Parts</h2><p>{report['count']} images; a part counts within {report['radius']:g} of the image "
        f"side of the CAM's peak (or its energy); the last row is a uniform map on the same images. Images "
        f"showing each part: {html.escape(visible)}.</p>",
        _part_tables(report, columns, "uniform map"),
        "<h3>Where the peaks land</h3><p>Bars: % of the images showing each part whose peak is on it "
        "(background: of all images); dashed: the uniform map.</p>",
    ]
    out += [
        bar_chart(name, {c: values[c] for c in columns}, report["baseline"]["peak"])
        for name, values in report["peak"].items()
    ]
    for name, table in report.get("per_class", {}).items():
        out.append(
            f"<details><summary>{html.escape(name)} ({table['count']} images)</summary>"
            f"{_part_tables(table, columns, 'uniform map')}</details>"
        )
    return "\n".join(out)


def grids_section(grids: Sequence[tuple[str, str]], directory: str) -> str:
    """The image grids (path, caption), linked relative to the report's directory."""
    figures = [
        f'<figure><img src="{html.escape(os.path.relpath(path, directory).replace(os.sep, "/"))}" '
        f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for path, caption in grids
    ]
    return "<h2>Where the blocks disagree most</h2><p>1 - mean pairwise correlation of the block maps.</p>" + "\n".join(
        figures
    )


def write_report(
    path: str,
    localization: dict | None = None,
    parts: dict | None = None,
    grids: Sequence[tuple[str, str]] = (),
    title: str = "PMG CAM report",
) -> str:
    """Write the report to `path` (e.g. <out>/report.html) from whichever sections are given; returns the path."""
    sections = [f"<h1>{html.escape(title)}</h1>"]
    if localization is not None:
        sections.append(localization_section(localization))
    if parts is not None:
        sections.append(parts_section(parts))
    if grids:
        sections.append(grids_section(grids, os.path.dirname(os.path.abspath(path))))
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
