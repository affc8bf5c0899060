"""Plain-text tables for the course's figures, and the claims tables that end each chapter.

The notebooks print their numbers as fixed-width tables (readable in any viewer, no pandas). Each chapter
ends with a claims table: a claim from the source texts, what the chapter measured, and the verdict.
`tools/make_course_map.py` reads those tables back from the stored outputs (`parse_table`) to build the
course's claims ledger, so the ledger always quotes what the notebooks computed.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

CLAIMS_HEADER = ("claim", "measured here", "verdict")
# What a verdict rests on: a run of this notebook, arithmetic from measured inputs, or a model's forecast.
BASES = ("measured", "derived", "predicted")


def format_table(header: Sequence[object], rows: Sequence[Sequence[object]],
                 wrap: int | Sequence[int | None] | None = None, rules: bool = False) -> str:
    """Columns padded to their widest cell, separated by " | ", a "-+-" rule under the header.

    `wrap` breaks long cells onto continuation lines: one width for every column, or one per column
    (None: that column is not wrapped). `rules=True` draws the rule after every row too, which keeps rows
    apart when several columns wrap.
    """
    widths_in = list(wrap) if isinstance(wrap, Sequence) else [wrap] * len(header)
    if len(widths_in) != len(header):
        raise ValueError(f"{len(widths_in)} wrap widths for {len(header)} columns")

    cells = []
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells, the header {len(header)}: {list(row)}")
        cells.append([(textwrap.wrap(str(c), w) or [""]) if w else [str(c)] for c, w in zip(row, widths_in)])
    widths = [max([len(str(h))] + [len(part) for row in cells for part in row[i]]) for i, h in enumerate(header)]

    def line(parts: Sequence[str]) -> str:
        return " | ".join(p.ljust(w) for p, w in zip(parts, widths)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    out = [line([str(h) for h in header]), rule]
    for row in cells:
        out += [line([c[k] if k < len(c) else "" for c in row]) for k in range(max(len(c) for c in row))]
        if rules:
            out.append(rule)
    return "\n".join(out)


def print_table(header: Sequence[object], rows: Sequence[Sequence[object]],
                wrap: int | Sequence[int | None] | None = None, rules: bool = False) -> None:
    """Print `format_table(header, rows, wrap, rules)`."""
    print(format_table(header, rows, wrap, rules))


def print_claims(claims: Sequence[Sequence[object]], wrap: int | Sequence[int | None] | None = None,
                 header: Sequence[str] = CLAIMS_HEADER, rules: bool = False) -> None:
    """The table that ends a chapter: rows of (claim, what was measured here, verdict[, basis]).

    `basis` says what the verdict rests on, one of BASES: "measured" (a run in this notebook), "derived"
    (arithmetic from measured inputs) or "predicted" (a model of cost, not yet run). When any row has it,
    every row must, and the table gains a fourth column that the course's ledger quotes.
    """
    if any(len(c) < 3 for c in claims):
        raise ValueError("each claim needs (claim, measured, verdict)")
    # wrapped cells span several lines: rules between rows keep them apart, so `parse_table` (and the course's
    # ledger) reads each row back whole whichever column wraps
    rules = rules or wrap is not None
    with_basis = [len(c) >= 4 for c in claims]
    if any(with_basis) and not all(with_basis):
        raise ValueError("give every claim a basis (measured, derived, predicted), or none")
    if any(with_basis):
        bad = [c[3] for c in claims if c[3] not in BASES]
        if bad:
            raise ValueError(f"basis must be one of {BASES}, got {bad}")
        header = tuple(header)[:3] + ("basis",)
        if isinstance(wrap, Sequence) and len(wrap) == 3:
            wrap = tuple(wrap) + (None,)
        print_table(header, [list(c[:4]) for c in claims], wrap, rules)
    else:
        print_table(header, [list(c[:3]) for c in claims], wrap, rules)


def parse_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Read back a table printed by `format_table`: (header, rows), wrapped cells joined with spaces.

    The table starts at the first line followed by a "-+-" rule and ends at the first blank line. With
    rules between rows, the lines between two rules are one row; without, a line whose first cell is
    empty continues the row above.
    """
    lines = text.splitlines()
    is_rule = lambda line: "-+-" in line and set(line.strip()) <= {"-", "+"}
    start = next((i for i in range(len(lines) - 1) if is_rule(lines[i + 1])), None)
    if start is None:
        raise ValueError("no table (a header line followed by a '-+-' rule) in the text")
    widths = [len(w) for w in lines[start + 1].split("-+-")]

    def cut(line: str) -> list[str]:
        parts, pos = [], 0
        for w in widths:
            parts.append(line[pos:pos + w].strip())
            pos += w + 3  # the " | " between columns
        return parts

    body = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        body.append(line)
    grouped = any(is_rule(line) for line in body)
    rows: list[list[str]] = []
    fresh = True
    for line in body:
        if is_rule(line):
            fresh = True
            continue
        parts = cut(line)
        if rows and (not fresh if grouped else not parts[0]):
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], parts)]
        else:
            rows.append(parts)
        fresh = False
    return cut(lines[start]), rows
