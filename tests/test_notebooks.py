"""What a learner opens must be whole: every chapter is stored executed, without errors or machine paths,
says where its figures came from, and has its practice notebook."""

import json
import re
from pathlib import Path

import pytest

from minilora.course.report import BASES, parse_table

from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
COURSE = sorted((ROOT / "course").glob("*.ipynb"))
STORED = COURSE + sorted((ROOT / "solutions").glob("*.ipynb"))


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


@pytest.mark.parametrize("path", STORED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_stored_executed_without_errors_or_machine_paths(path):
    cells = code_cells(path)
    assert all(c["execution_count"] is not None for c in cells), "stored with unexecuted code cells"
    errors = [o.get("ename") for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"stored error outputs: {errors}"
    # what a reader sees as text (streams, stderr included, and text/plain); base64 images can look like paths
    text = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     for c in cells for o in c["outputs"])
    paths = re.findall(r"(?<![\w.:/])(/(?:[\w.-]+/){2,}[\w.-]+)", text)
    assert not paths, f"outputs show machine paths {sorted(set(paths))[:3]}: record with tools/run_notebook.py"


@pytest.mark.parametrize("path", COURSE, ids=lambda p: p.stem)
def test_chapter_says_where_its_figures_come_from_and_has_practice(path):
    first = "".join(code_cells(path)[0]["source"])
    assert "describe(" in first or "environment(" in first, "the first code cell should print describe(DEVICE)"
    assert (ROOT / "solutions" / path.name).exists(), f"no practice notebook solutions/{path.name}"
    assert (ROOT / "exercises" / path.name).exists(), f"no exercise notebook exercises/{path.name}"
    cells = json.loads(path.read_text())["cells"]
    last = "".join(cells[-1]["source"]) if cells[-1]["cell_type"] == "markdown" else ""
    assert f"](../my-practice/{path.name})" in last and "python -m minilora.course.practice" in last, \
        "the last cell should link to the learner's practice copy, my-practice/, and say how it is made"


@pytest.mark.parametrize("path", COURSE, ids=lambda p: p.stem)
def test_chapter_ends_with_its_claims_table(path):
    cells = [c for c in code_cells(path) if "print_claims(" in "".join(c["source"])]
    assert cells, "no print_claims(...) cell: each chapter ends with claim | measured | verdict"
    text = "".join("".join(o.get("text", "")) for o in cells[-1]["outputs"] if o["output_type"] == "stream")
    header, rows = parse_table(text)
    assert len(header) in (3, 4) and rows and all(len(r) == len(header) and r[0] and r[2] for r in rows), rows
    if len(header) == 4:  # the basis of each verdict: what it rests on
        assert header[3] == "basis" and all(r[3] in BASES for r in rows), rows


def test_course_map_is_generated_from_the_notebooks():
    tool = load_tool("make_course_map")
    assert tool.main(["--check"]) == 0, "course/README.md is stale: run python tools/make_course_map.py"
