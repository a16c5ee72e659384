"""A remote prediction API as an oracle: any Open Inference Protocol endpoint over HTTP.

``mextract serve``, Triton, KServe and MLServer all speak the protocol's REST binding
(:mod:`mextract.protocol`). :class:`RemoteOracle` reads the model's metadata (input name,
shape and data type; output name and size; and, from ``mextract serve``, the API's public
description: answer mode, its parameters, the value range), then answers batches by
``POST .../infer``: in chunks of ``batch_size``, with binary tensors by default, retrying
transport failures and 429/502/503/504 answers with exponential backoff that honours
``Retry-After``. Its ledger counts the samples the server answered, so an attack on a
remote API is accounted exactly as one on a local victim. A server that asks for
calibrated proof of work (a 428 answer with a puzzle) gets it solved, and the hash
evaluations are counted (``pow_hashes``).
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import re
import time
from typing import Any

import httpx
import numpy as np
import orjson
import torch

from mextract.data.base import ValueRange
from mextract.errors import BudgetExceededError, InputError, MextractError
from mextract.oracle.base import Oracle
from mextract.oracle.client import APIDescription
from mextract.oracle.ledger import Ledger
from mextract.oracle.modes import AnswerMode
from mextract.protocol import (
    CLIENT_HEADER,
    JSON_LENGTH_HEADER,
    POW_NONCE_HEADER,
    POW_PUZZLE_HEADER,
    ProtocolError,
    decode_response,
    encode_request,
    error_message,
)

logger = logging.getLogger(__name__)

_URL = re.compile(r"^(?P<base>https?://[^/]+(?:/.*?)?)/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/?$")
_DTYPES = {"FP32": torch.float32, "FP64": torch.float64}
_RETRY_STATUS = frozenset({429, 502, 503, 504})


class RemoteAPIError(MextractError):
    """The endpoint refused a request or could not be reached; ``status`` is its HTTP status
    (``None`` when no answer came)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def split_url(url: str) -> tuple[str, str, str | None]:
    """``http://host:port[/prefix]/v2/models/NAME[/versions/V]`` → ``(base, name, version)``."""
    m = _URL.match(url.strip())
    if m is None:
        raise InputError(
            "url: expected http(s)://HOST:PORT/v2/models/NAME (an Open Inference Protocol model), "
            f"got {url!r}"
        )
    return m["base"], m["name"], m["version"]


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RemoteOracle(Oracle):
    """An Open Inference Protocol model endpoint as an :class:`Oracle`.

    Args:
        url: the model's address, ``http://HOST:PORT/v2/models/NAME`` (optionally with
            ``/versions/V``).
        client_id: sent as ``X-Client-Id`` (``mextract serve`` keeps a ledger and defence
            state per client id; other servers ignore it).
        api_key: sent as ``Authorization: Bearer <key>`` (servers with accounts:
            ``mextract serve --store``); the account is then the client.
        mode, k, decimals: what the answers are. ``mextract serve`` declares them and a
            different statement is an error; for other servers (Triton, KServe, ...) state
            them (default ``probs``).
        value_range: the declared range of input values when the endpoint does not declare
            one (default: unbounded).
        budget: the most samples this oracle will have answered (checked before sending).
        batch_size: samples per request.
        binary: send and ask for binary tensors (the protocol's extension; much faster than
            JSON for images); ``False`` uses JSON only.
        retries: attempts after the first one for transport errors and 429/502/503/504.
        backoff: the first wait in seconds, doubled per attempt (capped at 30 s) unless the
            server says ``Retry-After``.
        timeout: seconds per request.
        max_pow_bits: the hardest proof-of-work puzzle this client solves (``2**bits`` hash
            evaluations expected; 26 bits is about a minute of pure-Python SHA-256); a
            harder one raises :class:`RemoteAPIError` instead of computing for hours.
        transport: an httpx transport (tests; default: the network).
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        api_key: str | None = None,
        mode: AnswerMode | str | None = None,
        k: int | None = None,
        decimals: int | None = None,
        value_range: ValueRange | None = None,
        budget: int | None = None,
        batch_size: int = 256,
        binary: bool = True,
        retries: int = 5,
        backoff: float = 0.5,
        timeout: float = 60.0,
        max_pow_bits: int = 26,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        _, name, _ = split_url(url)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"retries: expected a non-negative integer, got {retries!r}")
        self.url = url.rstrip("/")
        self.model_name, self.batch_size, self.binary = name, batch_size, binary
        self.retries, self.backoff, self.max_pow_bits = retries, float(backoff), max_pow_bits
        headers = {CLIENT_HEADER: client_id} if client_id is not None else {}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self._infer_url = f"{self.url}/infer"
        self._user_budget = budget
        self._ledger = Ledger(budget)
        meta = self._get_json(self.url, "model metadata")
        self._describe(meta, mode, k, decimals, value_range)
        self.server_spent: int | None = None
        #: calibrated proof of work: puzzles solved and the hash evaluations they took
        self.pow_puzzles, self.pow_hashes = 0, 0
        if "mextract_api" in (meta.get("parameters") or {}):  # mextract serve says what is left
            usage = self._get_json(f"{self.url}/usage", "usage")
            self._limit(usage.get("spent"), usage.get("remaining"))
            burst = usage.get("burst")
            if isinstance(burst, int) and burst > 0:  # the account's rate limit takes no larger batch
                self.batch_size = min(self.batch_size, burst)

    # ------------------------------------------------------------------ metadata

    def _describe(
        self,
        meta: Any,
        mode: AnswerMode | str | None,
        k: int | None,
        decimals: int | None,
        value_range: ValueRange | None,
    ) -> None:
        try:
            inp, out = meta["inputs"][0], meta["outputs"][0]
            self.input_name, self.output_name = str(inp["name"]), str(out["name"])
            in_shape, out_shape = [int(s) for s in inp["shape"]], [int(s) for s in out["shape"]]
            datatype = str(inp["datatype"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RemoteAPIError(f"{self.url}: model metadata without inputs/outputs ({exc!r})") from None
        if datatype not in _DTYPES:
            raise RemoteAPIError(
                f"{self.url}: input {self.input_name!r} is {datatype}; expected FP32 or FP64"
            )
        body = in_shape[1:] if in_shape and in_shape[0] == -1 else in_shape
        if len(meta["inputs"]) != 1 or not body or min(body) < 1:
            raise RemoteAPIError(
                f"{self.url}: expected one input with a batch dimension and a fixed shape, "
                f"got {len(meta['inputs'])} input(s), the first of shape {in_shape}"
            )
        if not out_shape or out_shape[-1] < 2:
            raise RemoteAPIError(
                f"{self.url}: output {self.output_name!r} has shape {out_shape}; expected (N, K)"
            )
        declared = (meta.get("parameters") or {}).get("mextract_api")
        if declared is not None:
            desc = APIDescription.from_json(orjson.loads(declared))
            stated = AnswerMode.parse(mode) if mode is not None else None
            if stated is not None and (stated, k, decimals) != (desc.mode, desc.k, desc.decimals):
                raise InputError(
                    f"{self.url} answers in mode {desc.mode.value} (k={desc.k}, decimals={desc.decimals}), "
                    f"not {stated.value} (k={k}, decimals={decimals}); leave the mode out to take the API's"
                )
            if value_range is not None and value_range != desc.value_range:
                raise InputError(f"{self.url} declares its value range {desc.value_range}, not {value_range}")
        else:
            desc = APIDescription(
                tuple(body), out_shape[-1], mode=AnswerMode.parse(mode or AnswerMode.PROBS), k=k,
                decimals=decimals, value_range=value_range or ValueRange(), dtype=_DTYPES[datatype],
            )  # fmt: skip
        self.description = desc
        self.input_shape, self.num_classes, self.mode = desc.input_shape, desc.num_classes, desc.mode
        self.k, self.decimals, self.dtype = desc.k, desc.decimals, _DTYPES[datatype]
        self.value_range = desc.value_range
        self.features = desc.features
        self.missing = desc.missing

    # ------------------------------------------------------------------ requests

    def _send(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        """One request with retries; raises :class:`RemoteAPIError` on a refusal or no answer."""
        for attempt in range(self.retries + 1):
            wait = min(30.0, self.backoff * 2**attempt)
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise RemoteAPIError(f"{what}: {url} could not be reached ({exc})") from None
                logger.info("%s: %s; retrying in %.1f s", what, exc, wait)
            else:
                if response.status_code not in _RETRY_STATUS or attempt == self.retries:
                    return response
                told = _retry_after(response.headers.get("retry-after"))
                with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):  # exact wait
                    told = float(response.json()["retry_after"])
                wait = wait if told is None else min(told, 300.0)
                logger.info("%s: HTTP %d; retrying in %.1f s", what, response.status_code, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_json(self, url: str, what: str) -> Any:
        response = self._send("GET", url, what)
        if response.status_code != 200:
            status, message = response.status_code, error_message(response.content)
            raise RemoteAPIError(f"{what}: {url} answered {status}: {message}", status)
        try:
            return response.json()
        except ValueError:
            raise RemoteAPIError(f"{what}: {url} did not answer JSON") from None

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self._answer_chunk(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return torch.cat(parts)

    def _answer_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        self._ledger.charge(n)  # raises before anything is sent
        try:
            answers = self._post(x)
        except BaseException:
            self._ledger.refund(n)
            raise
        return answers

    def _post(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        arr = x.detach().cpu().numpy()
        content, headers = encode_request(arr, input_name=self.input_name, output_name=self.output_name,
                                          binary=self.binary)  # fmt: skip
        response = self._send("POST", self._infer_url, "query", content=content, headers=headers)
        for _ in range(3):  # calibrated proof of work: solve the request's puzzle, send it again
            if response.status_code != 428 or POW_PUZZLE_HEADER not in response.headers:
                break
            from mextract.defences.pow import Puzzle, solve


            puzzle = response.headers[POW_PUZZLE_HEADER]
            bits = Puzzle.from_header(puzzle).bits
            if bits > self.max_pow_bits:
                limit = f"this client solves at most {self.max_pow_bits} bits (max_pow_bits)"
                raise RemoteAPIError(f"{self.url} asks a proof of work of {bits} bits (about {2**bits:,} "
                                     f"hash evaluations) for {n} queries; {limit}", 428)  # fmt: skip
            nonce, hashes = solve(puzzle)
            self.pow_hashes += hashes
            self.pow_puzzles += 1
            proof = {**headers, POW_PUZZLE_HEADER: puzzle, POW_NONCE_HEADER: nonce}
            response = self._send("POST", self._infer_url, "query", content=content, headers=proof)
        if response.status_code != 200:
            self._refused(response, n)
        try:
            length = response.headers.get(JSON_LENGTH_HEADER)
            out = decode_response(response.content, length, self.output_name)
        except ProtocolError as exc:
            raise RemoteAPIError(f"{self.url}: {exc}", response.status_code) from None
        if out.shape != (n, self.answer_width):
            expected = (n, self.answer_width)
            raise RemoteAPIError(f"{self.url}: answered shape {out.shape}, expected {expected}")
        self._limit(response.headers.get("x-queries-spent"), response.headers.get("x-queries-remaining"))
        return torch.from_numpy(np.array(out, dtype=np.float64)).to(self.dtype)

    def _limit(self, spent: object, remaining: object) -> None:
        """Take in what the server says this client has spent and has left (its budget)."""
        if isinstance(spent, int | str) and str(spent).isdigit():
            self.server_spent = int(spent)
        if isinstance(remaining, int | str) and str(remaining).isdigit():
            own, server_limit = self._user_budget, self._ledger.count + int(remaining)
            self._ledger.budget = server_limit if own is None else min(own, server_limit)

    def _refused(self, response: httpx.Response, n: int) -> None:
        message = error_message(response.content)
        try:
            kind = response.json().get("kind")
        except (ValueError, AttributeError):
            kind = None
        if kind == "budget_exhausted":
            spent = self.server_spent if self.server_spent is not None else self._ledger.count
            raise BudgetExceededError(n, spent, spent)
        if response.status_code in (400, 413, 422):
            raise InputError(f"{self.url} refused the query ({response.status_code}): {message}")
        raise RemoteAPIError(f"{self.url} answered {response.status_code}: {message}", response.status_code)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteOracle({self.url!r}, {self.description}, {self._ledger})"
