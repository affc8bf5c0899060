"""Check a learner's notebook against the graded tests of its chapter.

    python -m minilora.course.practice                               # once: your copies, in my-practice/
    python -m minilora.course.check my-practice/02_lora_layer.ipynb
    python -m minilora.course.check submissions/ --csv grades.csv     # an instructor, over a folder

(`python -m minilora.check` is the same command under its first name.)

What runs. The notebook's code cells, top to bottom, in one fresh namespace, as "Run All" runs them in
Jupyter: a helper written in a cell of its own is there for the exercise cells after it, just as it is for
the `check(...)` calls in the notebook. Cells that only call `check(...)` are skipped (the graders run once,
below), shell lines (`!pip ...`) and magics (`%time`) are dropped, and a cell that fails is reported and
passed over, so one unfinished exercise does not hide the others. Then every grader of the chapter runs
on the object it names. One line per exercise: passed, or failed with the hint the grader gives.

Which chapter. From the notebook's metadata (the practice notebooks carry it, and Jupyter keeps it when a
copy is saved under another name), else from the `NN_` in its file name: `02_lora_layer.ipynb`,
`alice_02_lora_layer.ipynb` and `02-lora-alice.ipynb` are all chapter 2 (`NN_` or `NN-` at the start of
the name or after `_`, `-`, `.` or a space).

Each notebook is graded in a process of its own, with a time limit (`--timeout`, seconds). A notebook that
is not valid JSON, cannot be tied to a chapter, hangs, crashes or calls `sys.exit()` gets a failed row per
exercise with the reason, and the other notebooks are still graded and written to the CSV. A separate
process is not a sandbox: submissions run with your permissions, so grade untrusted ones in a container
or as a user who can touch nothing else.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .grading import ExerciseFailed, graders_for, run_grader

EXERCISE_LINE = re.compile(r"^\s*#\s*Exercise\s+(\d+)\.(\d+)\s*:", re.M)
# "NN_" or "NN-" at the start of a name or after a separator: 02_lora_layer, alice_02_lora_layer, bob-2-nf4
CHAPTER_IN_NAME = re.compile(r"(?:^|[_\-. ])(\d{1,2})[_-](?=[A-Za-z])")
DEFAULT_TIMEOUT = 120  # seconds per notebook; each solution notebook takes a few seconds on a CPU


@dataclass
class Result:
    notebook: str
    exercise: str
    name: str
    passed: bool
    message: str


class NotebookError(ValueError):
    """The file cannot be graded as a notebook: the message says why."""


def read_notebook(path: Path) -> dict:
    """The notebook's JSON, or NotebookError saying what is wrong with the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotebookError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise NotebookError(f"{path}: cannot be read ({err})") from None
    try:
        nb = json.loads(text)
    except json.JSONDecodeError as err:
        raise NotebookError(f"{Path(path).name}: not a notebook: invalid JSON at line {err.lineno}, column "
                            f"{err.colno} ({err.msg}); is the file cut short? Save it again from Jupyter") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise NotebookError(f"{Path(path).name}: not a notebook: the JSON has no list of cells")
    return nb


def chapter_of(path: Path, nb: dict | None = None) -> int:
    """The chapter a notebook belongs to: its metadata's `minilora.chapter`, else the `NN_` in its name.

    `02_lora_layer.ipynb`, `alice_02_lora_layer.ipynb` -> 2. Raises ValueError when neither says.
    """
    path = Path(path)
    if nb is None:
        try:
            nb = read_notebook(path)
        except NotebookError:
            nb = None
    meta = (nb or {}).get("metadata")
    ours = meta.get("minilora") if isinstance(meta, dict) else None
    chapter = ours.get("chapter") if isinstance(ours, dict) else None
    if isinstance(chapter, int) and not isinstance(chapter, bool):
        return chapter
    found = sorted({int(n) for n in CHAPTER_IN_NAME.findall(path.stem)})
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{path.name}: the name holds several chapter numbers ({', '.join(map(str, found))}); "
                         "keep one, like alice_02_lora_layer.ipynb")
    raise ValueError(f"{path.name}: cannot tell which chapter this is: name the file with the chapter's number "
                     "and an underscore, like 02_lora_layer.ipynb or alice_02_lora_layer.ipynb")


def _only_checks(tree: ast.Module) -> bool:
    """True for a cell whose statements are all `check(...)` calls (the notebook's own grading lines)."""
    return bool(tree.body) and all(
        isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name)
        and s.value.func.id == "check" for s in tree.body)


def run_cells(nb: dict, filename: str) -> tuple[dict, list[str]]:
    """Execute the notebook's code cells in order into one namespace; returns it and the cells' errors.

    Output the cells print is swallowed; a cell that raises (SystemExit included) is recorded and skipped.
    """
    ns: dict = {"__name__": "__main__"}
    errors: list[str] = []
    code = [c for c in nb["cells"] if isinstance(c, dict) and c.get("cell_type") == "code"]
    for number, cell in enumerate(code, 1):
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else str(src)
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        where = f"code cell {number}"
        m = EXERCISE_LINE.search(src)
        if m:
            where += f" (Exercise {m.group(1)}.{m.group(2)})"
        try:
            tree = ast.parse(src, filename)
        except SyntaxError as err:
            errors.append(f"{where}: SyntaxError: {err.msg} (line {err.lineno})")
            continue
        if _only_checks(tree):
            continue
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                exec(compile(tree, filename, "exec"), ns)
        except KeyboardInterrupt:
            raise
        except SystemExit as err:
            errors.append(f"{where} called sys.exit({err.code!r})")
        except BaseException as err:  # report, and keep going: the other exercises are still graded
            errors.append(f"{where}: {type(err).__name__}: {err}")
    return ns, errors


def _chapter_or_none(path: Path) -> int | None:
    try:
        return chapter_of(path)
    except ValueError:
        return None


def _failed_all(path: Path, chapter: int | None, reason: str) -> list[Result]:
    """One failed row per exercise of the chapter (one row if the chapter is unknown), with the reason."""
    graders = graders_for(chapter) if chapter is not None else []
    if not graders:
        return [Result(str(path), "", "", False, reason)]
    return [Result(str(path), g.exercise, g.name, False, reason) for g in graders]


def check_notebook(path: Path) -> list[Result]:
    """Grade one notebook in this process. Never raises for a bad notebook: the rows say what went wrong."""
    path = Path(path)
    try:
        nb = read_notebook(path)
        chapter = chapter_of(path, nb)
    except ValueError as err:  # NotebookError included
        return _failed_all(path, _chapter_or_none(path), str(err))
    graders = graders_for(chapter)
    if not graders:
        return [Result(str(path), "", "", False, f"{path.name}: chapter {chapter} has no graded exercises")]
    ns, errors = run_cells(nb, path.name)
    results = []
    for g in graders:
        if g.name not in ns:
            hint = f"`{g.name}` is not defined in the notebook"
            mine = [e for e in errors if f"(Exercise {g.exercise})" in e]
            if mine or errors:
                hint += f" (a cell failed: {(mine or errors)[0]})"
            results.append(Result(str(path), g.exercise, g.name, False, hint))
            continue
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                run_grader(g, ns[g.name])
            results.append(Result(str(path), g.exercise, g.name, True, ""))
        except ExerciseFailed as err:
            results.append(Result(str(path), g.exercise, g.name, False, str(err)))
        except SystemExit as err:
            results.append(Result(str(path), g.exercise, g.name, False,
                                  f"Exercise {g.exercise}: your `{g.name}` called sys.exit({err.code!r})"))
    return results


def _tail(text: str, lines: int = 3) -> str:
    last = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return (": " + " | ".join(last)) if last else ""


def check_in_subprocess(path: Path, timeout: float | None = DEFAULT_TIMEOUT) -> list[Result]:
    """Grade one notebook in a fresh Python process, killed after `timeout` seconds (None: no limit)."""
    path = Path(path)
    try:
        chapter = chapter_of(path, read_notebook(path))
    except ValueError as err:  # unreadable or unnamed: nothing to run
        return _failed_all(path, _chapter_or_none(path), str(err))
    package_root = str(Path(__file__).resolve().parents[2])  # so the child finds minilora without an install
    env = {**os.environ, "MPLBACKEND": "Agg", "MINILORA_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="minilora-check-") as tmp:
        out, err_log = Path(tmp) / "results.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, "-m", "minilora.course.check", "--worker", str(out), str(path.resolve())]
        with open(err_log, "w") as err_file:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file,
                                    cwd=path.resolve().parent, env=env, start_new_session=(os.name == "posix"))
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                return _failed_all(path, chapter, f"not graded: still running after {timeout:g} s, so it was "
                                   "stopped (a loop that never ends, or code far slower than needed?)")
        stderr = err_log.read_text(errors="replace")
        if out.exists():
            try:
                return [Result(**{**r, "notebook": str(path)}) for r in json.loads(out.read_text())]
            except (ValueError, TypeError):
                pass
        if code < 0:
            why = f"the grading process was killed by signal {-code} (a crash, or out of memory?)"
        else:
            why = f"the grading process exited with code {code} before it finished (does the notebook call os._exit?)"
        return _failed_all(path, chapter, "not graded: " + why + _tail(stderr))


def _kill(proc: subprocess.Popen) -> None:
    """Stop the grading process and anything it started."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _worker(out: Path, path: Path) -> int:
    results = check_notebook(path)
    out.write_text(json.dumps([asdict(r) for r in results]))
    return 0


def _notebooks(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        found += sorted(p.rglob("*.ipynb")) if p.is_dir() else [p]
    return [p for p in found if ".ipynb_checkpoints" not in p.parts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minilora.course.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="notebooks, or folders of notebooks")
    ap.add_argument("--csv", type=Path, help="also write one row per notebook and exercise to this file")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                    help=f"seconds each notebook may run before it is stopped and failed (default {DEFAULT_TIMEOUT}; "
                         "0: no limit)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: grade one notebook, write JSON
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.paths[0])
    timeout = args.timeout if args.timeout > 0 else None
    all_results: list[Result] = []
    for nb in _notebooks(args.paths):
        results = check_in_subprocess(nb, timeout)
        all_results += results
        done = sum(r.passed for r in results)
        reasons = {r.message for r in results}
        if not done and len(reasons) == 1 and (len(results) > 1 or not results[0].exercise):
            count = f" (0/{len(results)} exercises pass)" if results[0].exercise else ""
            print(f"{nb}: not graded{count}\n        " + reasons.pop())  # one reason for the whole notebook
            continue
        print(f"{nb}: {done}/{len(results)} exercises pass")
        for r in results:
            print(f"  {r.exercise:>5} {r.name:<28} {'passed' if r.passed else 'FAILED'}")
            if not r.passed:
                print("        " + r.message.replace("\n", "\n        "))
    if not all_results:
        print("no notebooks found in " + ", ".join(map(str, args.paths)), file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["notebook", "exercise", "name", "passed", "message"])
            for r in all_results:
                w.writerow([r.notebook, r.exercise, r.name, int(r.passed), r.message])
    return 0 if all_results and all(r.passed for r in all_results) else 1


if __name__ == "__main__":
    sys.exit(main())
