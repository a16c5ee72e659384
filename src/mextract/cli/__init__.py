"""The ``mextract`` command line."""

import os

# OpenMP's default wait policy (GNU libgomp spins before it sleeps) made two torch threads
# 4.7-7.4x slower beside another busy process; passive waits cut that to about 2x at no
# cost alone (benchmarks/threads.py, README "Threads"). It must be set before torch loads
# its OpenMP runtime, so here, before any command imports torch; a user's choice wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mextract.cli.main import app, main

__all__ = ["app", "main"]
