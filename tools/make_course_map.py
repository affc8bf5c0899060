"""Write course/README.md: the chapter map, measured times, and the ledger of the texts' claims.

    python tools/make_course_map.py          # rewrite course/README.md from the stored notebooks
    python tools/make_course_map.py --check  # exit 1 if course/README.md is out of date (CI runs this)

Everything measured comes from the repository, nothing is typed in: chapter titles and "what this chapter
needs" from each notebook's opening cells, wall times from course/timings.json (written by
`tools/run_notebook.py --timings`) and their totals, and each claim, measurement and verdict from the stored output of the
chapter's `print_claims` cell. Only the dependencies between chapters are written here, by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from minilora.course.report import parse_table  # noqa: E402

COURSE, OUT, TIMINGS = ROOT / "course", ROOT / "course" / "README.md", ROOT / "course" / "timings.json"

# chapter -> (chapters it builds on, what of minilora it builds)
PLAN: dict[int, tuple[tuple[int, ...], str]] = {
    0: ((), "`memory`, `profiling`"),
    1: ((0,), "(analysis: SVD of real updates)"),
    2: ((1,), "`lora.LoRALinear`"),
    3: ((2,), "`inject`, `io` (PEFT format)"),
    4: ((0,), "`nf4`"),
    5: ((4,), "`double_quant`"),
    6: ((3, 5), "`qlora.LinearNF4`, `quantize_model`"),
    7: ((0, 6), "`paged.PagedAdamW`"),
    8: ((3,), "`dora`"),
    9: ((3, 8), "`loraplus`"),
    10: ((3, 6, 8), "`fast`, `kernels`; the benchmark's results (`bench/`)"),
    11: ((3, 6, 8), "`course.lm` (SmolLM2 offline); the language-model verdicts"),
    12: ((1, 3), "`adalora`, `adapters` (adapter layers, prefix tuning)"),
    13: ((3, 6), "`distributed` (DDP, FSDP2); `course.launch`"),
}


def chapter_number(nb_path: Path) -> int:
    return int(nb_path.name.split("_", 1)[0])


def title_and_needs(nb: nbformat.NotebookNode) -> tuple[str, str]:
    """The "# Chapter N — Title" heading, and the first sentence after "**What ... needs.**" (or "needs:")."""
    text = "\n".join(c.source for c in nb.cells[:4] if c.cell_type == "markdown")
    title = re.search(r"^# Chapter \d+ — (.+)$", text, re.M)
    needs = re.search(r"\*\*What (?:this chapter|it) needs[.:]\*\*\s*(.+?\.)(?:\s|$)", text, re.S)
    if title is None:
        raise ValueError("the first cells have no '# Chapter N — Title' heading")
    return title.group(1).strip(), " ".join(needs.group(1).split()) if needs else "see the chapter"


def claims(nb: nbformat.NotebookNode) -> list[list[str]]:
    """(claim, measured, verdict, basis) rows read from the stored output of the cell that calls print_claims.

    A table printed without a basis column gives "—" there."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "print_claims(" in cell.source and "def print_claims" not in cell.source:
            text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            if not text:
                raise ValueError("the print_claims cell has no stored output: execute the notebook")
            header, rows = parse_table(text)
            return [row[:4] if len(header) >= 4 else row[:3] + ["—"] for row in rows]
    return []


def minutes(entry: dict | None) -> str:
    if not entry:
        return "not measured"
    return f"{entry['seconds'] / 60:.1f} min"


def total(seconds: float | None) -> str:
    return f"**{seconds / 60:.1f} min**" if seconds is not None else "not measured for every chapter"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    chapters, ledger, machines = [], [], set()
    totals: dict[str, float | None] = {"cpu": 0.0, "gpu": 0.0}
    for path in sorted(COURSE.glob("[0-9][0-9]_*.ipynb")):
        n = chapter_number(path)
        nb = nbformat.read(path, as_version=4)
        try:
            title, needs = title_and_needs(nb)
            chapter_claims = claims(nb)
        except ValueError as err:
            raise ValueError(f"{path.relative_to(ROOT)}: {err}") from None
        t = timings.get(f"course/{path.name}", {})
        machines.update(f"{k.upper()}: {v['machine']} ({v['date']})" for k, v in t.items())
        for kind in totals:  # a total only where every chapter was measured
            totals[kind] = totals[kind] + t[kind]["seconds"] if totals[kind] is not None and kind in t else None
        deps, builds = PLAN.get(n, ((), ""))
        chapters.append([f"{n}", f"[{title}]({path.name})", ", ".join(map(str, deps)) or "—", builds, needs,
                         minutes(t.get("cpu")), minutes(t.get("gpu"))])
        ledger += [[claim, f"[{n}]({path.name})", measured, verdict, basis]
                   for claim, measured, verdict, basis in chapter_claims]

    lines = [
        "# The course: chapter map and claims ledger",
        "",
        "<!-- Generated by tools/make_course_map.py from the stored notebooks and course/timings.json; "
        "do not edit by hand. -->",
        "",
        "Start the course from the repository root, after the install in the top-level README (\"Take the course\"):",
        "",
        "```bash",
        "python -m minilora.course.practice                         # once: your practice copies, in my-practice/",
        "jupyter lab --notebook-dir=. course/00_memory_wall.ipynb   # JupyterLab on the whole repository",
        "```",
        "",
        "Each chapter ends with a link to its practice notebook. Work in your copy in `my-practice/` (git and the",
        "tests leave that folder alone; `exercises/` is generated from the worked answers in `solutions/` and stays",
        "blank), and check your answers with `python -m minilora.course.check my-practice/NN_topic.ipynb`.",
        "",
        "## Chapter map",
        "",
        "A chapter needs the chapters it builds on; 4-5 (quantization) can be read before 1-3 (LoRA).",
        "Times are measured: on the GPU, the wall time of running the whole notebook (`tools/run_notebook.py --timings`);",
        "on the CPU, the sum of its cells' times under nbval with two notebooks at a time on two cores, as CI runs them",
        "(`MINILORA_TIMINGS=course-cpu.json python -m pytest`). They are how long the notebooks take to run, not",
        "how long they take to study: reading them and doing the practice notebooks come on top, and are not measured.",
        "",
        "| # | chapter | builds on | builds | what it needs | time, CPU | time, GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in chapters]
    lines += [f"| | **all chapters** | | | | {total(totals['cpu'])} | {total(totals['gpu'])} |"]
    lines += ["", "Measured on: " + "; ".join(sorted(machines)) if machines else "", "",
              "## Claims ledger",
              "",
              "Every claim of the source texts (explainer texts about LoRA and QLoRA, quoted and not reproduced) that a",
              "chapter checks, with what the chapter measured and the verdict, as stored in the notebooks' outputs (GPU",
              "figures where the chapter was recorded on a GPU). The basis says what each verdict rests on: a run in the",
              "notebook (measured), arithmetic from measured inputs (derived), or a cost model not run (predicted).",
              "",
              "| claim | chapter | measured | verdict | basis |",
              "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in ledger]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if course/README.md is not what would be written")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("course/README.md is out of date: run python tools/make_course_map.py", file=sys.stderr)
            return 1
        print("course/README.md is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
