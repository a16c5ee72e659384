"""Serving a (defended) model: the prediction API over the Open Inference Protocol.

:class:`ServedAPI` is the API itself (one victim, per-client defence stacks and ledgers);
:func:`create_app` puts it behind HTTP (FastAPI), :func:`running` serves an app in a
background thread (tests, benchmarks, notebooks). ``mextract serve`` does both from the
command line.
"""

from mextract.server.api import ServedAPI, check_client_id
from mextract.server.app import INPUT_NAME, OUTPUT_NAME, create_app, running

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ServedAPI", "check_client_id", "create_app", "running"]
