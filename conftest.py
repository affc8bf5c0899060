"""Notebook collection under nbval: progress bars and warnings on stderr are never compared."""

import os

os.environ.setdefault("MINILORA_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collectstart(collector):
    if collector.path is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr",)
