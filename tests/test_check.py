"""The checker: which chapter a notebook is, which cells it runs, and a batch that one bad submission cannot stop.

The shell checker runs the code cells the way the notebook does, so a helper in a cell of its own works in
both; an instructor's folder of submissions is graded one process per notebook with a time limit, and every
submission gets its rows in the CSV, failed ones with the reason.
"""

import copy
import csv
import json
from pathlib import Path

import pytest

from minilora.course import check as C
from minilora.course.grading import check as notebook_check, graders_for

ROOT = Path(__file__).resolve().parent.parent
SOLUTION_0 = json.loads((ROOT / "solutions" / "00_memory_wall.ipynb").read_text())


def _code(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}


def _write(path: Path, nb: dict) -> Path:
    path.write_text(json.dumps(nb, indent=1))
    return path


def _cell_index(nb: dict, exercise: str) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if f"# Exercise {exercise}:" in "".join(c["source"]))


@pytest.mark.parametrize("name, chapter", [
    ("02_lora_layer.ipynb", 2), ("alice_02_lora_layer.ipynb", 2), ("10_making_it_fast.ipynb", 10),
    ("2024_bob_04_nf4.ipynb", 4), ("carol-7-paged.ipynb", 7), ("homework3_05_double_quant.ipynb", 5),
])
def test_chapter_from_the_name(tmp_path, name, chapter):
    assert C.chapter_of(tmp_path / name) == chapter


@pytest.mark.parametrize("name", ["alice.ipynb", "lora_layer.ipynb", "01_low_rank_and_02_lora_layer.ipynb"])
def test_a_name_without_one_chapter_is_refused_with_the_rule(tmp_path, name):
    with pytest.raises(ValueError, match="02_lora_layer.ipynb"):
        C.chapter_of(tmp_path / name)


def test_chapter_from_the_metadata_wins_over_the_name(tmp_path):
    nb = json.loads((ROOT / "exercises" / "02_lora_layer.ipynb").read_text())
    assert nb["metadata"]["minilora"] == {"chapter": 2}  # the practice notebooks carry it
    assert C.chapter_of(_write(tmp_path / "my answers.ipynb", nb)) == 2


def test_a_helper_in_its_own_cell_passes_in_the_shell_as_in_the_notebook(tmp_path):
    nb = copy.deepcopy(SOLUTION_0)
    i = _cell_index(nb, "0.1")
    nb["cells"][i]["source"] = (
        "# Exercise 0.1: training_bytes_per_param\n"
        "def training_bytes_per_param(weights, grads, moments, master=None):\n"
        "    return _sizes(weights, grads, moments, moments, master)\n")
    nb["cells"].insert(i, _code("def _sizes(*dtypes):\n    return sum(d.itemsize for d in dtypes if d is not None)\n"))
    path = _write(tmp_path / "00_memory_wall.ipynb", nb)
    ns, errors = C.run_cells(nb, path.name)
    assert not errors, errors
    notebook_check("0.1", ns["training_bytes_per_param"])  # what the notebook's check(...) cell does
    results = {r.exercise: r for r in C.check_notebook(path)}
    assert results["0.1"].passed, results["0.1"].message
    assert all(r.passed for r in results.values())


def test_a_failing_or_exiting_cell_does_not_stop_the_others(tmp_path):
    nb = copy.deepcopy(SOLUTION_0)
    nb["cells"].insert(1, _code("import sys\nsys.exit()\n"))
    nb["cells"][_cell_index(nb, "0.2")]["source"] = "# Exercise 0.2: adam_state_bytes\nraise RuntimeError('oops')\n"
    results = {r.exercise: r for r in C.check_notebook(_write(tmp_path / "00_memory_wall.ipynb", nb))}
    assert [e for e, r in results.items() if not r.passed] == ["0.2"]
    assert "Exercise 0.2" in results["0.2"].message and "RuntimeError: oops" in results["0.2"].message


def test_an_answer_that_calls_sys_exit_fails_its_exercise(tmp_path):
    nb = copy.deepcopy(SOLUTION_0)
    nb["cells"][_cell_index(nb, "0.4")]["source"] = (
        "# Exercise 0.4: lora_state_bytes\nimport sys\ndef lora_state_bytes(*args):\n    sys.exit(2)\n")
    results = {r.exercise: r for r in C.check_notebook(_write(tmp_path / "00_memory_wall.ipynb", nb))}
    assert not results["0.4"].passed and "sys.exit(2)" in results["0.4"].message
    assert results["0.3"].passed


@pytest.mark.slow
def test_an_instructors_batch_grades_every_submission_and_writes_the_csv(tmp_path, monkeypatch):
    subs = tmp_path / "submissions"
    subs.mkdir()
    _write(subs / "alice_02_lora_layer.ipynb", json.loads((ROOT / "solutions" / "02_lora_layer.ipynb").read_text()))
    text = (ROOT / "solutions" / "00_memory_wall.ipynb").read_text()
    (subs / "bob_00_memory_wall.ipynb").write_text(text[: len(text) // 2])  # cut short: invalid JSON
    exits = copy.deepcopy(SOLUTION_0)
    exits["cells"].insert(1, _code("import sys\nsys.exit('bye')\n"))
    _write(subs / "carol_00_memory_wall.ipynb", exits)
    dies = copy.deepcopy(SOLUTION_0)
    dies["cells"].insert(1, _code("import os\nos._exit(3)\n"))
    _write(subs / "dave_00_memory_wall.ipynb", dies)
    _write(subs / "essay.ipynb", SOLUTION_0)
    grades = tmp_path / "grades.csv"

    monkeypatch.chdir(tmp_path)
    assert C.main(["submissions", "--csv", str(grades)]) == 1  # not all passed, but every one was graded

    rows = list(csv.DictReader(grades.open()))
    assert all(Path(r["notebook"]).parent == Path("submissions") for r in rows)  # as given, graded or not
    by = {}
    for r in rows:
        by.setdefault(Path(r["notebook"]).name.split("_")[0].removesuffix(".ipynb"), []).append(r)
    assert sorted(by) == ["alice", "bob", "carol", "dave", "essay"]
    n0, n2 = len(graders_for(0)), len(graders_for(2))  # chapter 0's and chapter 2's exercises
    assert len(by["alice"]) == n2 and all(r["passed"] == "1" for r in by["alice"])
    assert len(by["carol"]) == n0 and all(r["passed"] == "1" for r in by["carol"])  # sys.exit in a cell: skipped
    assert len(by["bob"]) == n0 and all("invalid JSON" in r["message"] for r in by["bob"])
    assert len(by["dave"]) == n0 and all(r["passed"] == "0" and "exited with code 3" in r["message"]
                                         for r in by["dave"])
    assert len(by["essay"]) == 1 and "cannot tell which chapter" in by["essay"][0]["message"]


@pytest.mark.slow
def test_a_hanging_submission_is_stopped_at_the_time_limit(tmp_path):
    nb = copy.deepcopy(SOLUTION_0)
    nb["cells"].insert(1, _code("while True:\n    pass\n"))
    results = C.check_in_subprocess(_write(tmp_path / "00_memory_wall.ipynb", nb), timeout=3)
    assert len(results) == len(graders_for(0)) and not any(r.passed for r in results)
    assert all("still running after 3 s" in r.message for r in results)
