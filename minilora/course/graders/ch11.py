"""Graders for chapter 11, a real language model.

The chat prompt is checked against SmolLM2's own template, rendered by its tokenizer (converted once into
the cache by `minilora.course.lm`); the labels and the loss against `minilora.course.lm` on tiny tensors;
Q4_1 against `lm.q4_1_roundtrip`. The slips a learner makes (no default system turn, no newline after a
role, the prompt left in the loss, the shift forgotten or done twice, absmax instead of min/max, 16 steps
instead of 15) are named when they are made.
"""

from __future__ import annotations

import torch

from minilora.course import lm
from minilora.course.grading import ExerciseFailed, grader, brief, expect_tensor, max_abs_diff, tensors_close

QUESTIONS = [("What is a wavelength?", "Wavelength is the inverse of frequency."),
             ("who wrote The Idiot", "Fyodor Dostoyevsky."),
             ("Hello", "Hi")]


def _template(tok, question: str, answer: str | None) -> str:
    messages = [{"role": "user", "content": question}]
    if answer is None:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)


def _chat_hint(got: str, want: str) -> str:
    if "<|im_start|>system" in want and "<|im_start|>system" not in got:
        return ("; hint: with no system message the template writes its own default system turn first "
                "(read tokenizer.chat_template)")
    if got.replace("\n", "") == want.replace("\n", ""):
        return "; hint: the newlines differ: each role name and each <|im_end|> is followed by '\\n'"
    if got.count("<|im_end|>") != want.count("<|im_end|>"):
        return "; hint: every turn, the answer's too, ends with <|im_end|>"
    return ""


@grader("11.1", "chat_text")
def grade_chat(fn) -> None:
    tok = lm.load_tokenizer()
    for question, answer in QUESTIONS:
        for a in (None, answer):
            want = _template(tok, question, a)
            got = fn(question, a)
            if got != want:
                call = f"chat_text({question!r}{'' if a is None else ', ' + repr(a)})"
                raise ExerciseFailed(f"{call}: expected {want!r}, got {got!r}{_chat_hint(str(got), want)}")


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@grader("11.2", "answer_labels")
def grade_labels(fn) -> None:
    for n_p, n_a in [(5, 3), (2, 1), (7, 4)]:
        prompt, answer = _ids(n_p, n_p), _ids(n_a, 100 + n_a)
        got = fn(prompt, answer)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseFailed("answer_labels must return a pair (input_ids, labels)")
        ids, labels = (expect_tensor(w, torch.as_tensor(g), (n_p + n_a,)) for w, g in zip(("input_ids", "labels"), got))
        want_ids = torch.tensor(prompt + answer)
        want = torch.tensor([lm.IGNORE] * n_p + answer)
        if not torch.equal(ids.long(), want_ids):
            raise ExerciseFailed(f"on {n_p} prompt and {n_a} answer ids: input_ids should be the prompt then the "
                                 f"answer, {want_ids.tolist()}, got {ids.tolist()}")
        if not torch.equal(labels.long(), want):
            hint = ""
            if torch.equal(labels.long(), want_ids):
                hint = "; hint: the prompt's labels must be -100, or the model is trained to write the question too"
            elif torch.equal(labels.long()[:-1], want_ids[1:]) or torch.equal(labels.long()[:-1], want[1:]):
                hint = "; hint: do not shift: the labels sit under their own tokens and the loss shifts by one"
            raise ExerciseFailed(f"on {n_p} prompt and {n_a} answer ids: expected labels {want.tolist()}, "
                                 f"got {labels.tolist()}{hint}")


@grader("11.3", "answer_loss")
def grade_loss(fn) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, :3] = lm.IGNORE
    labels[1, 5] = lm.IGNORE  # a padded row
    nll, mask = lm.answer_nll(logits, labels)
    want = nll.sum() / mask.sum()
    got = fn(logits, labels)
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        raise ExerciseFailed(f"answer_loss must return a scalar tensor, got {brief(got)}")
    if not tensors_close(got.reshape(()).double(), want, atol=1e-9, rtol=1e-9):
        ce = torch.nn.functional.cross_entropy
        hint = ""
        unshifted = ce(logits.flatten(0, 1), labels.flatten(), ignore_index=lm.IGNORE)
        everything = ce(logits[:, :-1].flatten(0, 1), labels[:, 1:].clamp(min=0).flatten())
        if abs(got.item() - unshifted.item()) < 1e-9:
            hint = "; hint: the logits at position t predict token t+1: compare logits[:, :-1] with labels[:, 1:]"
        elif abs(got.item() - everything.item()) < 1e-9:
            hint = "; hint: positions labelled -100 (prompt, padding) must not count"
        elif abs(got.item() - nll.sum().item() / nll.numel()) < 1e-9:
            hint = "; hint: divide by the number of answer tokens, not by every position"
        raise ExerciseFailed(f"on logits (3, 6, 11) and labels with -100 on the prompt: expected {want.item():.6f}, "
                             f"got {got.item():.6f}{hint}")


@grader("11.4", "q4_1_roundtrip")
def grade_q4_1(fn) -> None:
    g = torch.Generator().manual_seed(1)
    for w in [torch.randn(4, 64, generator=g) * 0.05 + 0.01, torch.rand(2, 32, generator=g) * 3 - 1]:
        want = lm.q4_1_roundtrip(w)
        got = expect_tensor(f"q4_1_roundtrip on a {tuple(w.shape)} tensor", fn(w.clone()), tuple(w.shape))
        if not tensors_close(got.float(), want, atol=1e-6, rtol=1e-6):
            hint = ""
            x = w.reshape(-1, 32)
            absmax = x.abs().amax(1, keepdim=True)
            sym = (torch.round(x / absmax * 7).clamp(-8, 7) * absmax / 7).reshape(w.shape)
            if max_abs_diff(got, sym) < 1e-5:
                hint = "; hint: Q4_1 is asymmetric: a minimum and a scale (max - min)/15 per block, not absmax"
            else:
                lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
                d = (hi - lo) / 16
                sixteen = torch.floor((x - lo) * (1 / d) + 0.5).clamp(0, 15) * d.half().float() + lo.half().float()
                if max_abs_diff(got, sixteen.reshape(w.shape)) < 1e-6:
                    hint = "; hint: 16 levels span the block with 15 steps: d = (max - min) / 15"
            raise ExerciseFailed(f"on a {tuple(w.shape)} tensor: largest difference from llama.cpp's Q4_1 "
                                 f"{max_abs_diff(got, want):.3g}{hint}")
