"""`python -m minilora.check` is the checker's first name: it runs `python -m minilora.course.check`."""

if __name__ == "__main__":
    import sys

    from minilora.course.check import main

    sys.exit(main())
