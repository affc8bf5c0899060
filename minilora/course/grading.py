"""Graded tests for the exercises: one registry, used by the notebooks, the checker and CI.

A grader is a function that takes the learner's object (a function or a class) and raises
`ExerciseFailed` with a message that teaches: the tiny case it tried, what it expected, what it got.
Graders live in `minilora/course/graders/chNN.py`, one module per chapter, and register themselves with
`@grader("N.k", "name_in_notebook")`; the small checks they share (a number, a tensor of a shape, values
close to the expected ones, the usual mistake that matches, a ValueError that must come) are below.

In a notebook, right after an exercise:   `check("0.1", bytes_per_parameter)`
From a shell, over whole notebooks:       `python -m minilora.course.check my-practice/00_memory_wall.ipynb`
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

__all__ = ["ExerciseFailed", "Grader", "grader", "graders_for", "check", "expect_close", "expect_equal", "expect_number",
           "numbers_close", "first_mistake", "expect_tensor", "max_abs_diff", "tensors_close", "tensor_mistake",
           "float32_hint", "brief", "expect_value_error"]


class ExerciseFailed(AssertionError):
    """The learner's answer is wrong (or not written yet). The message says how."""


@dataclass(frozen=True)
class Grader:
    exercise: str  # "N.k"
    name: str  # what the notebook calls the function or class being graded
    test: Callable[[Any], None]

    @property
    def chapter(self) -> int:
        return int(self.exercise.split(".")[0])


_REGISTRY: dict[str, Grader] = {}


def grader(exercise: str, name: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register `test` as the grader of exercise `exercise`, which grades the notebook object `name`."""

    def register(test: Callable[[Any], None]) -> Callable[[Any], None]:
        _REGISTRY[exercise] = Grader(exercise, name, test)
        return test

    return register


def graders_for(chapter: int) -> list[Grader]:
    """All graders of a chapter, in exercise order. Imports `minilora.course.graders.chNN` on first use."""
    module = f"minilora.course.graders.ch{chapter:02d}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        return []
    found = [g for g in _REGISTRY.values() if g.chapter == chapter]
    return sorted(found, key=lambda g: tuple(int(p) for p in g.exercise.split(".")))


def _lookup(exercise: str) -> Grader:
    graders_for(int(exercise.split(".")[0]))
    if exercise not in _REGISTRY:
        raise KeyError(f"no grader for exercise {exercise}")
    return _REGISTRY[exercise]


def run_grader(g: Grader, candidate: Any) -> None:
    """Run one grader; a stub that still raises NotImplementedError fails with a friendly message."""
    try:
        g.test(candidate)
    except NotImplementedError as err:
        raise ExerciseFailed(f"Exercise {g.exercise} is not done yet ({err}).") from None
    except ExerciseFailed:
        raise
    except Exception as err:  # the learner's code crashed: show where, as a failure of the exercise
        raise ExerciseFailed(f"Exercise {g.exercise}: your `{g.name}` raised {type(err).__name__}: {err}") from err


def check(exercise: str, candidate: Any) -> None:
    """Grade one exercise in a notebook: prints a pass line, or raises ExerciseFailed with a hint."""
    g = _lookup(exercise)
    run_grader(g, candidate)
    print(f"Exercise {exercise} ({g.name}): passed")


def expect_equal(what: str, got: Any, expected: Any) -> None:
    """Fail with `what: expected X, got Y` unless equal."""
    if got != expected:
        raise ExerciseFailed(f"{what}: expected {expected!r}, got {got!r}")


def expect_close(what: str, got: Any, expected: float, rel: float = 1e-6, abs_: float = 0.0) -> None:
    """Fail unless `got` is a finite number within `rel` (relative) or `abs_` of `expected`."""
    try:
        value = float(got)
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{what}: expected a number close to {expected!r}, got {got!r}") from None
    if not math.isfinite(value) or not math.isclose(value, expected, rel_tol=rel, abs_tol=abs_):
        raise ExerciseFailed(f"{what}: expected {expected!r} (rel. tol. {rel:g}), got {value!r}")


# Small checks shared by the chapters' graders.
def expect_number(what: str, got: Any) -> float:
    """`got` as a finite float, or ExerciseFailed saying what came back instead."""
    try:
        value = float(got)
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{what}: expected a number, got {got!r}") from None
    if not math.isfinite(value):
        raise ExerciseFailed(f"{what}: expected a finite number, got {value!r}")
    return value


def numbers_close(got: float, expected: float, rel: float = 1e-9) -> bool:
    """|got − expected| ≤ rel·|expected| (an expected 0 asks for 0, up to 1e-30)."""
    return abs(got - expected) <= rel * max(abs(expected), 1e-30)


def first_mistake(value: float, case: tuple, mistakes: dict[str, Callable[..., float]]) -> str | None:
    """The hint of the first typical mistake whose formula gives `value` on `case`, if any."""
    for hint, wrong in mistakes.items():
        if math.isclose(value, wrong(*case), rel_tol=1e-9):
            return hint
    return None


def expect_tensor(what: str, got: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """`got` if it is a tensor of `shape`, else ExerciseFailed naming what came back."""
    import torch

    if not isinstance(got, torch.Tensor):
        raise ExerciseFailed(f"{what}: expected a torch.Tensor of shape {shape}, got {type(got).__name__}")
    if tuple(got.shape) != shape:
        raise ExerciseFailed(f"{what}: expected shape {shape}, got {tuple(got.shape)}")
    return got


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64."""
    import torch

    return (a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max().item()


def tensors_close(got: torch.Tensor, expected: torch.Tensor, atol: float | None = None,
                  rtol: float | None = None) -> bool:
    """Same shape, and |got − expected| ≤ atol + rtol·|expected| everywhere (compared in float64). Without
    tolerances, those of `expected`'s dtype, relative and absolute: 2e-2 in bf16 / fp16, else 1e-5."""
    import torch

    if atol is None and rtol is None:
        atol = rtol = 2e-2 if expected.dtype in (torch.bfloat16, torch.float16) else 1e-5
    return tuple(got.shape) == tuple(expected.shape) and torch.allclose(
        got.detach().to(torch.float64), expected.detach().to(torch.float64), rtol=rtol or 0.0, atol=atol or 0.0)


def tensor_mistake(got: torch.Tensor, candidates: list[tuple[str, Callable[[], torch.Tensor]]], tol: float) -> str:
    """'; hint: ...' for the first typical mistake whose (finite) result equals `got` within tol, else ''."""
    import torch

    for hint, make in candidates:
        try:
            wrong = make()
        except (RuntimeError, ValueError, ZeroDivisionError):
            continue
        if tuple(wrong.shape) == tuple(got.shape) and torch.isfinite(wrong).all() and max_abs_diff(got, wrong) <= tol:
            return f"; hint: {hint}"
    return ""


def float32_hint(got: torch.Tensor, expected: torch.Tensor, tol: float) -> str:
    """'; hint: ...' when `got` misses a float64 `expected` by more than `tol` but only by float32 rounding."""
    import torch

    if expected.dtype != torch.float64 or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return ""
    diff = max_abs_diff(got, expected)
    if tol < diff <= 1e-5 * max(1.0, expected.abs().max().item()):
        tol_text = f"{tol:g}".replace("e-0", "e-")  # 1e-9, as the exercises write it
        return (f"; hint: that is float32 rounding: the grader passes float64 tensors and asks for agreement to "
                f"{tol_text}, so compute in the dtype you are given (no .float(), no float32 tensors of your own)")
    return ""


def brief(t: Any, digits: int = 5, limit: int = 16) -> str:
    """A tensor as a short list for a message: its first `limit` values, floats rounded to `digits`."""
    import torch

    if not isinstance(t, torch.Tensor):
        return repr(t)
    values = t.detach().cpu().reshape(-1).tolist()
    if t.is_floating_point():
        values = [round(v, digits) for v in values]
    return str(values[:limit]) + (" …" if len(values) > limit else "")


def expect_value_error(fn: Callable[..., Any], args: tuple, call: str, rule: str) -> None:
    """fn(*args) must raise ValueError; `call` names the call in the message, `rule` says what is allowed."""
    try:
        fn(*args)
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as err:
        raise ExerciseFailed(f"{call} raised {type(err).__name__}; check the arguments first and raise a "
                             f"ValueError that says {rule}") from None
    raise ExerciseFailed(f"{call}: expected a ValueError ({rule}), but nothing was raised")
