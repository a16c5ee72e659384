"""mextract: a lab for model extraction attacks and defences."""

__version__ = "0.3.0"
