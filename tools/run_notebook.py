"""Execute notebooks in place and store their outputs: how the course's stored outputs are recorded.

    python tools/run_notebook.py course/00_memory_wall.ipynb            # on this machine (CPU or GPU)
    python tools/run_notebook.py course/*.ipynb solutions/*.ipynb --timeout 1800
    python tools/run_notebook.py course/*.ipynb --no-write --timings course/timings.json   # time only

`--timings FILE` merges each notebook's wall time into FILE under "cpu" or "gpu" (with the machine and date):
the course map in course/README.md quotes these measured times.

On a GPU machine this records the GPU figures a learner reads; CI later re-executes the same notebooks on a
CPU under nbval, where only the cells marked `# NBVAL_CHECK_OUTPUT` are compared and every claim is an assert.
Outputs are scrubbed of the absolute path of the checkout so stored notebooks show no machine paths.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


# An installed package's file, as a warning names it: ".../site-packages/torch/profiler/profiler.py" -> "torch/...".
SITE_PACKAGES = re.compile(r"/(?:[^\s/'\"]+/)*(?:site|dist)-packages/")


def scrub_text(text: str, root: Path) -> str:
    """The checkout's absolute path, the home folder and any site-packages prefix, replaced by short forms."""
    for a, b in [(str(root) + os.sep, ""), (str(root), "."), (str(Path.home()), "~")]:
        text = text.replace(a, b)
    return SITE_PACKAGES.sub("", text)


def scrub(nb: nbformat.NotebookNode, root: Path) -> None:
    """Scrub machine paths from every text output (stdout, stderr, text/plain, text/html) of a notebook."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub_text(out["text"], root)
            for key in ("text/plain", "text/html"):
                if key in out.get("data", {}):
                    text = out["data"][key]
                    out["data"][key] = (scrub_text(text, root) if isinstance(text, str)
                                        else [scrub_text(t, root) for t in text])


def run(path: Path, timeout: int, kernel: str, write: bool, failed_dir: Path | None) -> float:
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                       resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    except Exception:
        if failed_dir is not None:  # keep what ran, to read the numbers that broke an assert
            failed_dir.mkdir(parents=True, exist_ok=True)
            scrub(nb, ROOT)
            nbformat.write(nb, failed_dir / path.name)
        raise
    scrub(nb, ROOT)
    if write:
        nbformat.write(nb, path)
    return time.perf_counter() - t0


def machine() -> tuple[str, str]:
    """("gpu" or "cpu", a one-line description of the machine the notebooks ran on)."""
    import torch

    if torch.cuda.is_available():
        return "gpu", f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return "cpu", f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def record_time(timings: Path, path: Path, seconds: float) -> None:
    """Merge {notebook: {kind: {seconds, machine, date}}} into the JSON file `timings` (written atomically)."""
    data = json.loads(timings.read_text()) if timings.exists() else {}
    kind, where = machine()
    key = path.resolve().relative_to(ROOT).as_posix()
    today = datetime.date.today().isoformat()
    data.setdefault(key, {})[kind] = {"seconds": round(seconds, 1), "machine": where, "date": today}
    tmp = timings.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    os.replace(tmp, timings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    ap.add_argument("--kernel", default="python3")
    ap.add_argument("--no-write", action="store_true", help="execute only; leave the stored notebook as it is")
    ap.add_argument("--timings", type=Path, help="JSON file to merge measured wall times into")
    ap.add_argument("--failed-dir", type=Path, help="where to write a notebook that failed, as far as it ran")
    args = ap.parse_args(argv)
    os.environ.setdefault("MINILORA_PROGRESS", "1")
    failed = 0
    for path in args.notebooks:
        try:
            secs = run(path, args.timeout, args.kernel, not args.no_write, args.failed_dir)
            print(f"ran {path} in {secs:.0f} s", flush=True)
            if args.timings:
                record_time(args.timings, path, secs)
        except Exception as err:  # keep going: record the others, report this one
            failed += 1
            print(f"FAILED {path}: {type(err).__name__}: {str(err)[-2000:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
