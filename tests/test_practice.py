"""Learners practise in copies of their own: `python -m minilora.course.practice` makes them in my-practice/,
never over a file that exists, and git, the staleness check of exercises/ and pytest all leave that folder alone.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minilora.course import practice

from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def test_it_copies_every_practice_notebook(tmp_path, capsys):
    dest = tmp_path / "my-practice"
    assert practice.main(["--to", str(dest)]) == 0
    assert sorted(p.name for p in dest.glob("*.ipynb")) == [p.name for p in EXERCISES]
    assert all((dest / p.name).read_bytes() == p.read_bytes() for p in EXERCISES)
    assert "python -m minilora.course.check" in capsys.readouterr().out


def test_it_never_overwrites_a_copy(tmp_path, capsys):
    dest = tmp_path / "mine"
    assert practice.main(["2", "--to", str(dest)]) == 0
    assert [p.name for p in dest.iterdir()] == ["02_lora_layer.ipynb"]
    answers = dest / "02_lora_layer.ipynb"
    answers.write_text("my answers")
    capsys.readouterr()
    assert practice.main(["--to", str(dest)]) == 0
    assert answers.read_text() == "my answers"
    out = capsys.readouterr().out
    assert "kept" in out and "02_lora_layer.ipynb" in out and "not overwritten" in out
    assert len(list(dest.glob("*.ipynb"))) == len(EXERCISES)


def test_an_unknown_chapter_is_an_error(tmp_path):
    assert practice.main(["42", "--to", str(tmp_path / "x")]) == 2


def test_the_default_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert practice.find_exercises() == ROOT / "exercises"
    probe = f"{practice.FOLDER}/02_lora_layer.ipynb"
    assert subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT).returncode == 0, f"{probe} is not ignored"


def test_the_staleness_check_ignores_the_practice_folder(tmp_path):
    tool = load_tool("make_exercises")
    (tmp_path / "solutions").mkdir()
    shutil.copy(ROOT / "solutions" / "00_memory_wall.ipynb", tmp_path / "solutions")
    assert tool.main(["--root", str(tmp_path)]) == 0
    practice.copy_practice(tmp_path / practice.FOLDER, tmp_path / "exercises")
    (tmp_path / practice.FOLDER / "00_memory_wall.ipynb").write_text("{}")  # answers, or anything at all
    assert tool.main(["--check", "--root", str(tmp_path)]) == 0


@pytest.mark.slow
def test_pytest_does_not_collect_the_practice_folder():
    folder = ROOT / practice.FOLDER
    made_folder = not folder.exists()
    probe = folder / "zz_probe_00_memory_wall.ipynb"
    assert not probe.exists()
    folder.mkdir(exist_ok=True)
    try:
        shutil.copy(ROOT / "exercises" / "00_memory_wall.ipynb", probe)
        others = [f"--ignore={p.name}" for p in ROOT.iterdir() if p.is_dir() and p.name != practice.FOLDER]
        collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", *others]
        everything = subprocess.run([*collect, str(ROOT)], cwd=ROOT, capture_output=True, text=True)
        assert probe.name not in everything.stdout, everything.stdout[-2000:]
        named = subprocess.run([*collect, str(probe)], cwd=ROOT, capture_output=True, text=True)
        assert probe.name in named.stdout, named.stdout[-2000:]  # it is a notebook nbval would collect
    finally:
        probe.unlink(missing_ok=True)
        if made_folder:
            folder.rmdir()
