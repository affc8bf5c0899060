"""Check a learner's notebook against the graded tests of its chapter.

    python -m minilora.course.check exercises/02_lora_layer.ipynb
    python -m minilora.course.check submissions/ --csv grades.csv     # an instructor, over a folder

(`python -m minilora.check` is the same command under its first name.)

The checker runs only the notebook's exercise cells (those with an `# Exercise N.k:` line), in order, in a
fresh namespace, then runs every grader of the chapter on the object it names. It prints one line per
exercise: passed, or failed with the hint the grader gives. Exercise cells must define things (functions,
classes) and not depend on other cells' variables; this is what makes them gradable in isolation.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .grading import ExerciseFailed, graders_for, run_grader

EXERCISE_LINE = re.compile(r"^\s*#\s*Exercise\s+(\d+)\.(\d+)\s*:", re.M)


@dataclass
class Result:
    notebook: str
    exercise: str
    name: str
    passed: bool
    message: str


def chapter_of(path: Path) -> int:
    """Chapter number from a notebook's file name: `02_lora_layer.ipynb` -> 2."""
    m = re.match(r"(\d+)_", path.name)
    if not m:
        raise ValueError(f"{path.name}: notebook names start with the chapter number, like 02_lora_layer.ipynb")
    return int(m.group(1))


def load_exercise_namespace(path: Path) -> tuple[dict, list[str]]:
    """Execute the notebook's exercise cells into one namespace; returns it and any cell errors."""
    nb = json.loads(path.read_text())
    ns: dict = {"__name__": f"notebook_{path.stem}"}
    errors: list[str] = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = "".join(cell.get("source", []))
        if not EXERCISE_LINE.search(src):
            continue
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            exec(compile(src, f"{path.name}", "exec"), ns)
        except Exception as err:  # report, and keep grading the other exercises
            errors.append(f"{type(err).__name__}: {err}")
    return ns, errors


def check_notebook(path: Path) -> list[Result]:
    ns, errors = load_exercise_namespace(path)
    results = []
    for g in graders_for(chapter_of(path)):
        if g.name not in ns:
            hint = f"`{g.name}` is not defined in the notebook"
            if errors:
                hint += f" (a cell failed: {errors[0]})"
            results.append(Result(str(path), g.exercise, g.name, False, hint))
            continue
        try:
            run_grader(g, ns[g.name])
            results.append(Result(str(path), g.exercise, g.name, True, ""))
        except ExerciseFailed as err:
            results.append(Result(str(path), g.exercise, g.name, False, str(err)))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minilora.course.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="notebooks, or folders of notebooks")
    ap.add_argument("--csv", type=Path, help="also write one row per notebook and exercise to this file")
    args = ap.parse_args(argv)
    notebooks = []
    for p in args.paths:
        notebooks += sorted(p.rglob("*.ipynb")) if p.is_dir() else [p]
    notebooks = [p for p in notebooks if ".ipynb_checkpoints" not in p.parts]
    all_results: list[Result] = []
    for nb in notebooks:
        results = check_notebook(nb)
        all_results += results
        done = sum(r.passed for r in results)
        print(f"{nb}: {done}/{len(results)} exercises pass")
        for r in results:
            print(f"  {r.exercise:>5} {r.name:<28} {'passed' if r.passed else 'FAILED'}")
            if not r.passed:
                print("        " + r.message.replace("\n", "\n        "))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["notebook", "exercise", "name", "passed", "message"])
            for r in all_results:
                w.writerow([r.notebook, r.exercise, r.name, int(r.passed), r.message])
    return 0 if all(r.passed for r in all_results) else 1


if __name__ == "__main__":
    sys.exit(main())
