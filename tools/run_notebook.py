"""Execute notebooks in place and store their outputs: how the course's stored outputs are recorded.

    python tools/run_notebook.py course/00_memory_wall.ipynb            # on this machine (CPU or GPU)
    python tools/run_notebook.py course/*.ipynb solutions/*.ipynb --timeout 1800

On a GPU machine this records the GPU figures a learner reads; CI later re-executes the same notebooks on a
CPU under nbval, where only the cells marked `# NBVAL_CHECK_OUTPUT` are compared and every claim is an assert.
Outputs are scrubbed of the absolute path of the checkout so stored notebooks show no machine paths.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def scrub(nb: nbformat.NotebookNode, root: Path) -> None:
    """Replace the checkout's absolute path (and the home folder) in text outputs with short forms."""
    subs = [(str(root) + os.sep, ""), (str(root), "."), (str(Path.home()), "~")]
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                for a, b in subs:
                    out["text"] = out["text"].replace(a, b)
            for key in ("text/plain", "text/html"):
                if key in out.get("data", {}):
                    text = out["data"][key]
                    for a, b in subs:
                        text = text.replace(a, b) if isinstance(text, str) else [t.replace(a, b) for t in text]
                    out["data"][key] = text


def run(path: Path, timeout: int, kernel: str) -> float:
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                   resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    scrub(nb, ROOT)
    nbformat.write(nb, path)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    ap.add_argument("--kernel", default="python3")
    args = ap.parse_args(argv)
    os.environ.setdefault("MINILORA_PROGRESS", "1")
    failed = 0
    for path in args.notebooks:
        try:
            secs = run(path, args.timeout, args.kernel)
            print(f"ran {path} in {secs:.0f} s")
        except Exception as err:  # keep going: record the others, report this one
            failed += 1
            print(f"FAILED {path}: {type(err).__name__}: {str(err)[-2000:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
