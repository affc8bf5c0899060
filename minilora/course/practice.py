"""Your own copies of the practice notebooks, in a folder of yours: `my-practice/`.

    python -m minilora.course.practice              # every chapter's practice notebook
    python -m minilora.course.practice 2 4          # chapters 2 and 4 only
    python -m minilora.course.practice --to DIR     # into DIR instead of my-practice/

Work in the copies, and check them with `python -m minilora.course.check my-practice/02_lora_layer.ipynb`.
The notebooks in exercises/ are generated from solutions/ and the tests check that they still are, so
answers written there would make the tests fail and be erased when the exercises are generated again.
my-practice/ is ignored by git, by the tests and by that check. A copy that exists is never overwritten:
to start a chapter over, rename or delete your copy and run this again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FOLDER = "my-practice"


def find_exercises() -> Path:
    """exercises/ of the repository this package is installed from (editable install), else of the cwd."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "exercises").is_dir() and any((root / "exercises").glob("[0-9][0-9]_*.ipynb")):
            return root / "exercises"
    raise FileNotFoundError("cannot find the practice notebooks (exercises/): run this from the root of the "
                            "minilora repository")


def copy_practice(dest: Path, source: Path, chapters: list[int] | None = None) -> tuple[list[Path], list[Path]]:
    """Copy source/NN_*.ipynb into dest, never over an existing file; returns (copied, kept)."""
    notebooks = sorted(source.glob("[0-9][0-9]_*.ipynb"))
    if chapters:
        wanted = set(chapters)
        missing = wanted - {int(p.name[:2]) for p in notebooks}
        if missing:
            raise ValueError(f"no practice notebook for chapter {', '.join(map(str, sorted(missing)))}")
        notebooks = [p for p in notebooks if int(p.name[:2]) in wanted]
    dest.mkdir(parents=True, exist_ok=True)
    copied, kept = [], []
    for nb in notebooks:
        target = dest / nb.name
        try:
            with open(target, "xb") as f:  # "x": fails if the file exists, so nothing of yours is replaced
                f.write(nb.read_bytes())
            copied.append(target)
        except FileExistsError:
            kept.append(target)
    return copied, kept


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minilora.course.practice", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapters", nargs="*", help="chapter numbers (default: all)")
    ap.add_argument("--to", type=Path, help=f"where to put the copies (default: {FOLDER}/ at the repository root)")
    args = ap.parse_args(argv)
    try:
        chapters = [int(c) for c in args.chapters]
    except ValueError:
        ap.error(f"chapters are numbers, like 2 or 02; got {' '.join(args.chapters)}")
    try:
        source = find_exercises()
        dest = args.to if args.to is not None else source.parent / FOLDER
        copied, kept = copy_practice(dest, source, chapters or None)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in copied:
        print(f"copied   {_show(p)}")
    for p in kept:
        print(f"kept     {_show(p)} (it exists: yours is not overwritten)")
    example = (copied or kept)[0] if (copied or kept) else dest / "NN_topic.ipynb"
    print(f"\nWork in {_show(dest)}/ and check your answers with\n"
          f"    python -m minilora.course.check {_show(example)}")
    if kept:
        print("To start a chapter over, rename or delete your copy and run this again.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
