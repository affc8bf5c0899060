"""Generate exercises/ from solutions/: the one way exercise notebooks are made.

In a solution notebook, an exercise is a code cell that names itself in a comment line
`# Exercise N.k: what to do` and wraps its answer in `### BEGIN SOLUTION` / `### END SOLUTION`.
The answer becomes `raise NotImplementedError("Exercise N.k: what to do")` at the same indentation;
cells tagged `solution-only` are dropped; outputs and execution counts are cleared; the notebook's
metadata records its chapter (`minilora.chapter`) for the checker.

    python tools/make_exercises.py           # (re)write exercises/
    python tools/make_exercises.py --check   # exit 1 if exercises/ is not what solutions/ generates
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
TITLE = re.compile(r"^\s*#\s*(Exercise\s+\d+\.\d+\s*:.*?)\s*$")


def strip_solutions(source: str, where: str) -> str:
    """Replace every BEGIN/END SOLUTION region of one cell with a stub that names the exercise."""
    lines, out, inside, title = source.splitlines(), [], False, None
    for n, line in enumerate(lines, 1):
        m = TITLE.match(line)
        if m and not inside:
            title = m.group(1)
        if line.strip().startswith(BEGIN):
            if inside:
                raise ValueError(f"{where}, line {n}: nested {BEGIN}")
            if title is None:
                raise ValueError(f"{where}, line {n}: {BEGIN} without an '# Exercise N.k: ...' line above it")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("{title}")')
        elif line.strip().startswith(END):
            if not inside:
                raise ValueError(f"{where}, line {n}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} is never closed")
    return "\n".join(out)


def make_exercise(solution: Path) -> str:
    """The exercise notebook for one solution notebook, as the exact text it is written with."""
    nb = nbformat.read(solution, as_version=4)
    cells = []
    for i, cell in enumerate(nb.cells):
        if "solution-only" in cell.get("metadata", {}).get("tags", []):
            continue
        cell = nbformat.from_dict(dict(cell))
        cell.pop("id", None)
        cell.get("metadata", {}).pop("execution", None)  # run timestamps would make exercises/ stale on every run
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, f"{solution.name} cell {i}")
            cell.source = re.sub(r"^# NBVAL_\w+\n", "", cell.source, flags=re.M)
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    nb.cells = cells
    nb.nbformat, nb.nbformat_minor = 4, 4
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"},
                   # the checker reads the chapter from here, so a copy saved under any name is still graded
                   "minilora": {"chapter": int(solution.name.split("_", 1)[0])}}
    for j, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{j}"
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if exercises/ is stale")
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args(argv)
    sol_dir, ex_dir = args.root / "solutions", args.root / "exercises"
    stale = []
    wanted = {p.name: make_exercise(p) for p in sorted(sol_dir.glob("*.ipynb"))}
    present = {p.name for p in ex_dir.glob("*.ipynb")}
    for name, text in wanted.items():
        target = ex_dir / name
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(name)
        else:
            ex_dir.mkdir(exist_ok=True)
            target.write_text(text)
    orphans = sorted(present - set(wanted))
    if args.check:
        if stale or orphans:
            print("exercises/ is stale; run `python tools/make_exercises.py`.", file=sys.stderr)
            for n in stale:
                print(f"  differs from its solution: exercises/{n}", file=sys.stderr)
            for n in orphans:
                print(f"  has no solution: exercises/{n}", file=sys.stderr)
            return 1
        print(f"exercises/ is up to date ({len(wanted)} notebooks)")
    else:
        for n in orphans:
            (ex_dir / n).unlink()
        print(f"wrote {len(wanted)} exercise notebooks to {ex_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
