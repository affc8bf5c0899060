"""Shared test setup: CUDA-only tests skip on machines without a GPU; notebooks ignore stderr."""

import os

import pytest
import torch

os.environ.setdefault("MINILORA_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
