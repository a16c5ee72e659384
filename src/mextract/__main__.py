"""``python -m mextract``: the command line, where the package is importable but its
``mextract`` script is not installed (e.g. ``PYTHONPATH=src`` on a borrowed GPU machine)."""

from mextract.cli import main

if __name__ == "__main__":
    main()
