"""The course kit: what the notebooks use besides the library itself.

  tasks     the course's generated fine-tuning task and the MiniLM classifier
  report    plain-text tables, and the claims table that ends each chapter
  grading   the graders' registry, `check(...)` for a notebook cell, and the small checks graders share
  graders   one module of graders per chapter (`graders/chNN.py`)
  practice  your copies of the practice notebooks: `python -m minilora.course.practice` (into my-practice/)
  check     the checker: `python -m minilora.course.check my-practice/NN_topic.ipynb`

Nothing in the library imports this package.
"""
