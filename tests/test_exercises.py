"""Exercises are generated from the solutions, and every grader bites.

For each chapter's practice notebook: the graders pass on solutions/ and fail on the blank exercises/,
every `# Exercise N.k` has a grader, and exercises/ is exactly what tools/make_exercises.py generates.
"""

import json
import re
from pathlib import Path

import pytest

from minilora.course.check import EXERCISE_LINE, chapter_of, check_notebook
from minilora.course.grading import graders_for

from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_exercises_are_generated_from_solutions():
    tool = load_tool("make_exercises")
    assert tool.main(["--check"]) == 0, "exercises/ is stale: run python tools/make_exercises.py"


def test_generator_refuses_broken_markers():
    strip = load_tool("make_exercises").strip_solutions
    with pytest.raises(ValueError, match="never closed"):
        strip("# Exercise 1.1: x\ndef f():\n    ### BEGIN SOLUTION\n    return 1\n", "t")
    with pytest.raises(ValueError, match="Exercise N.k"):
        strip("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n", "t")
    out = strip("# Exercise 1.2: add\ndef f(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION\n", "t")
    assert out.splitlines()[-1] == '    raise NotImplementedError("Exercise 1.2: add")'


def test_there_are_practice_notebooks():
    assert SOLUTIONS, "solutions/ holds no notebooks"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_every_exercise_has_a_grader(solution):
    cells = json.loads(solution.read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    named = {f"{a}.{b}" for a, b in EXERCISE_LINE.findall(text)}
    graded = {g.exercise for g in graders_for(chapter_of(solution))}
    assert named, f"{solution.name} has no '# Exercise N.k:' cells"
    assert named == graded, f"exercises without grader: {named - graded}; graders without exercise: {graded - named}"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_graders_pass_on_solutions_and_fail_on_blanks(solution):
    solved = check_notebook(solution)
    assert solved and all(r.passed for r in solved), [(r.exercise, r.message) for r in solved if not r.passed]
    blank = check_notebook(ROOT / "exercises" / solution.name)
    passing = [r.exercise for r in blank if r.passed]
    assert not passing, f"graders that pass on the blank exercise notebook (they cannot fail): {passing}"
    assert all(re.search(r"not done yet|NotImplementedError", r.message) for r in blank), \
        [r.message for r in blank]
