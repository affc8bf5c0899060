"""Notebook collection under nbval: progress bars and warnings on stderr are never compared.

Under pytest-xdist every worker runs its own notebook kernel; without a limit each kernel's PyTorch would use
every core, and the kernels would fight over them. Each gets its share of the cores instead.
"""

import os

os.environ.setdefault("MINILORA_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A learner's own copies of the practice notebooks (python -m minilora.course.practice) are not tests, even
# under `pytest .`; the blank exercises/ are not either (testpaths leaves both out of a plain `pytest`).
collect_ignore = ["my-practice", "exercises"]

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:  # inherited by the notebook kernels nbval starts
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


def pytest_collectstart(collector):
    if collector.path is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr",)


# MINILORA_TIMINGS=path: write each course notebook's summed cell times under nbval (the CPU times the course
# map quotes, measured the way CI runs the notebooks). Unset, nothing is recorded.
_TIMINGS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    if os.environ.get("MINILORA_TIMINGS") and path.startswith("course/") and path.endswith(".ipynb"):
        _TIMINGS[path] = _TIMINGS.get(path, 0.0) + report.duration


def pytest_sessionfinish(session):
    out = os.environ.get("MINILORA_TIMINGS")
    if out and _TIMINGS and "PYTEST_XDIST_WORKER" not in os.environ:
        import datetime
        import json
        import platform

        import torch

        machine = f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"
        day = datetime.date.today().isoformat()
        data = {k: {"cpu": {"seconds": round(v, 1), "machine": machine, "date": day}} for k, v in sorted(_TIMINGS.items())}
        with open(out, "w") as f:
            json.dump(data, f, indent=1)
