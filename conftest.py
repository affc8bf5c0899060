"""Notebook collection under nbval: progress bars and warnings on stderr are never compared.

Under pytest-xdist every worker runs its own notebook kernel; without a limit each kernel's PyTorch would use
every core, and the kernels would fight over them. Each gets its share of the cores instead.
"""

import os

os.environ.setdefault("MINILORA_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:  # inherited by the notebook kernels nbval starts
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


def pytest_collectstart(collector):
    if collector.path is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr",)
