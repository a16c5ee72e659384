"""The ``mextract`` command line."""

from mextract.cli.main import app, main

__all__ = ["app", "main"]
