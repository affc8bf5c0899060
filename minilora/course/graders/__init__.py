"""Graded tests of the practice notebooks, one module per chapter (see minilora.course.grading)."""
