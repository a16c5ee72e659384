"""The prediction API over HTTP: the Open Inference Protocol's REST binding on FastAPI.

Routes (those of Triton, KServe and MLServer, so their clients work unchanged):

=========================================== =====================================
``GET  /v2/health/live``, ``/v2/health/ready`` the server is up / ready
``GET  /v2``                                   server metadata (name, version, extensions)
``GET  /v2/models/{name}[/versions/1]``        model metadata; ``parameters.mextract_api``
                                               is the API's public description (JSON)
``GET  /v2/models/{name}[/versions/1]/ready``  the model is ready
``POST /v2/models/{name}[/versions/1]/infer``  answers, JSON or binary tensors
``GET  /v2/models/{name}/usage``               this client's spent and remaining queries
=========================================== =====================================

A caller states who it is in the ``X-Client-Id`` header (``anonymous`` otherwise); each
client id has its own ledger and defence state (:class:`~mextract.server.ServedAPI`).
Every answer carries ``X-Queries-Spent`` and, under a budget, ``X-Queries-Remaining``.
Every error is a JSON ``{"error": ...}`` naming the problem, with a 4xx status: 400 for a
bad request (shape, dtype, NaN, value range, malformed JSON), 404 for an unknown model or
route, 413 for a body over the limit, 403 with ``"kind": "budget_exhausted"`` or
``"extraction_detected"`` when a client may not be answered any more.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import mextract
from mextract.defences.detection import ExtractionDetectedError
from mextract.defences.pow import PowError
from mextract.errors import BudgetExceededError, MextractError
from mextract.protocol import (
    CLIENT_HEADER,
    DEFAULT_CLIENT,
    JSON_LENGTH_HEADER,
    POW_NONCE_HEADER,
    POW_PUZZLE_HEADER,
    ErrorResponse,
    Health,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ProtocolError,
    ServerMetadata,
    TensorMetadata,
    decode_request,
    encode_response,
    wants_binary,
)
from mextract.server.api import ProofOfWorkRequired, RateLimitedError, ServedAPI
from mextract.server.store import AuthError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
VERSION = "1"
#: the default limit on a request body: a batch of 1,024 CIFAR-10 images in FP64 is 25 MiB
MAX_BODY_BYTES = 64 * 2**20
_TYPES = {torch.float32: "FP32", torch.float64: "FP64"}

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "A bad request: the error names the problem",
        403: "This client may not be answered any more (budget spent, or flagged)",
        401: "No API key (servers with accounts)",
        404: "Unknown model or version",
        413: "The body is over the server's limit",
        428: "Proof of work required: solve the puzzle in X-PoW-Puzzle and send it again",
        429: "Over the account's rate limit: wait Retry-After seconds",
    }.items()
}


Auth = Annotated[
    str | None, Header(alias="Authorization", description="'Bearer <key>' (servers with accounts)")
]
ClientId = Annotated[
    str | None, Header(alias=CLIENT_HEADER, description="Who is asking (default: anonymous)")
]


def _error(
    status: int,
    message: str,
    kind: str | None = None,
    headers: Mapping[str, str] | None = None,
    retry_after: float | None = None,
    puzzle: str | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if puzzle is not None:
        body["puzzle"] = puzzle
    if kind is not None:
        body["kind"] = kind
    if retry_after is not None:
        body["retry_after"] = retry_after
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(api: ServedAPI, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI application serving ``api`` (run it with uvicorn, or :func:`running`)."""
    app = FastAPI(
        title="mextract prediction API",
        version=mextract.__version__,
        description="An Open Inference Protocol (V2) REST endpoint serving one (defended) model.",
    )
    desc = api.description
    tensor_type = _TYPES[desc.dtype]
    metadata = ModelMetadata(
        name=api.name,
        versions=[VERSION],
        platform="mextract",
        inputs=[TensorMetadata(name=INPUT_NAME, datatype=tensor_type, shape=[-1, *desc.input_shape])],
        outputs=[TensorMetadata(name=OUTPUT_NAME, datatype=tensor_type, shape=[-1, desc.answer_width])],
        parameters={"mextract_api": orjson.dumps(desc.to_json()).decode()},
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # keep the exception's headers: a 405 must say which methods are allowed (``Allow``)
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        logger.exception("internal error answering %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server's log")

    def _who(client: str | None, authorization: str | None) -> str:
        """The client: with a store, the account of the bearer key (401/403 otherwise);
        without one, the stated ``X-Client-Id``."""
        if api.store is None:
            return DEFAULT_CLIENT if client is None else client
        scheme, _, key = (authorization or "").partition(" ")
        if authorization and scheme.lower() != "bearer":
            raise AuthError("Authorization: expected 'Bearer <key>'", 401)
        return api.store.authenticate(key.strip() or None).name

    def _model(name: str, version: str | None = None) -> None:
        if name != api.name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {api.name!r}", status=404)
        if version is not None and version != VERSION:
            raise ProtocolError(f"model {name!r} has no version {version!r}; it has {VERSION!r}", status=404)

    @app.get("/v2/health/live", response_model=Health)
    def live() -> Health:
        return Health(live=True)

    @app.get("/v2/health/ready", response_model=Health)
    def ready() -> Health:
        return Health(ready=True)

    @app.get("/v2", response_model=ServerMetadata)
    def server_metadata() -> ServerMetadata:
        extensions = ["binary_tensor_data"]
        return ServerMetadata(name="mextract", version=mextract.__version__, extensions=extensions)

    async def _model_metadata(name: str, version: str | None, authorization: str | None) -> Any:
        try:
            _who(None, authorization)
            _model(name, version)
        except (ProtocolError, AuthError) as exc:
            return _error(exc.status, str(exc))
        return metadata

    async def _model_ready(name: str, version: str | None, authorization: str | None) -> Any:
        try:
            _who(None, authorization)
            _model(name, version)
        except (ProtocolError, AuthError) as exc:
            return _error(exc.status, str(exc))
        return {"name": name, "ready": True}

    auth_errors: dict[int | str, dict[str, Any]] = {s: _ERRORS[s] for s in (401, 403)}
    meta_kw: dict[str, Any] = {"response_model": ModelMetadata,
                               "responses": {404: _ERRORS[404], **auth_errors}}  # fmt: skip
    ready_kw: dict[str, Any] = {"responses": {404: _ERRORS[404], **auth_errors}}

    @app.get("/v2/models/{name}", **meta_kw)
    async def model_metadata(name: str, authorization: Auth = None) -> Any:
        return await _model_metadata(name, None, authorization)

    @app.get("/v2/models/{name}/versions/{version}", **meta_kw)
    async def model_version_metadata(name: str, version: str, authorization: Auth = None) -> Any:
        return await _model_metadata(name, version, authorization)

    @app.get("/v2/models/{name}/ready", **ready_kw)
    async def model_ready(name: str, authorization: Auth = None) -> Any:
        return await _model_ready(name, None, authorization)

    @app.get("/v2/models/{name}/versions/{version}/ready", **ready_kw)
    async def model_version_ready(name: str, version: str, authorization: Auth = None) -> Any:
        return await _model_ready(name, version, authorization)

    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            limit = f"this server's limit of {max_body_bytes}"
            raise ProtocolError(f"body of {declared} bytes is over {limit}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ProtocolError(f"body is over this server's limit of {max_body_bytes} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _answer(
        client: str, request: InferRequest, tensors: dict[str, np.ndarray], proof: tuple[str, str] | None
    ) -> torch.Tensor:
        if set(tensors) != {INPUT_NAME}:
            raise ProtocolError(f"inputs: expected one tensor named {INPUT_NAME!r}, got {sorted(tensors)}")
        for out in request.outputs or []:
            if out.name != OUTPUT_NAME:
                raise ProtocolError(f"outputs: unknown output {out.name!r}; this model has {OUTPUT_NAME!r}")
        dtype = np.float64 if tensor_type == "FP64" else np.float32
        x = torch.from_numpy(np.array(tensors[INPUT_NAME], dtype=dtype))
        return api.query(client, x, proof)

    async def _infer(
        request: Request, name: str, version: str | None, client: str | None, authorization: str | None
    ) -> Response:
        client_id = DEFAULT_CLIENT if client is None else client
        try:
            client_id = _who(client, authorization)
            _model(name, version)
            body = await _read_body(request)
            parsed, tensors = decode_request(body, request.headers.get(JSON_LENGTH_HEADER))
            binary = wants_binary(parsed, OUTPUT_NAME)  # checked before anything is answered
            puzzle, nonce = request.headers.get(POW_PUZZLE_HEADER), request.headers.get(POW_NONCE_HEADER)
            proof = None if puzzle is None or nonce is None else (puzzle, nonce)
            answers = await run_in_threadpool(_answer, client_id, parsed, tensors, proof)
        except (ProtocolError, AuthError) as exc:
            return _error(exc.status, str(exc))
        except ProofOfWorkRequired as exc:
            header = exc.puzzle.to_header()
            return _error(428, str(exc), kind="proof_of_work", headers={POW_PUZZLE_HEADER: header},
                          puzzle=header)  # fmt: skip
        except PowError as exc:
            return _error(403, f"proof of work refused ({exc.kind}): {exc}", kind="proof_of_work_invalid")
        except RateLimitedError as exc:
            wait = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
            return _error(429, str(exc), kind="rate_limited", headers=wait, retry_after=exc.retry_after)
        except BudgetExceededError as exc:
            return _error(403, f"client {client_id!r}: {exc}", kind="budget_exhausted")
        except ExtractionDetectedError as exc:
            return _error(403, str(exc), kind="extraction_detected")
        except MextractError as exc:  # shape, NaN, value range, client id: the request's fault
            return _error(400, str(exc))
        content, headers = encode_response(
            api.name,
            {OUTPUT_NAME: answers.cpu().numpy()},
            binary={OUTPUT_NAME: binary},
            request_id=parsed.id,
        )
        headers["X-Queries-Spent"] = str(api.spent(client_id))
        remaining = api.remaining(client_id)
        if remaining is not None:
            headers["X-Queries-Remaining"] = str(remaining)
        return Response(content=content, headers=headers)

    # the body is read raw (the binary extension), so FastAPI does not see its model: declare it,
    # and put the models it refers to among the schema's components (see ``openapi`` below)
    body_schema = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    body_defs: dict[str, Any] = body_schema.pop("$defs", {})
    binary_answer = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    infer_kw: dict[str, Any] = {
        "response_model": InferResponse,
        "responses": {
            # binary outputs asked for: the answer is the JSON header followed by the tensors' bytes
            200: {"description": "The answers (JSON, or JSON and binary tensors)", "content": binary_answer},
            **{s: _ERRORS[s] for s in (400, 401, 403, 404, 413, 428, 429)},
        },
        "openapi_extra": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}},
        },
    }

    @app.post("/v2/models/{name}/infer", **infer_kw)
    async def infer(
        request: Request, name: str, client: ClientId = None, authorization: Auth = None
    ) -> Response:
        return await _infer(request, name, None, client, authorization)

    @app.post("/v2/models/{name}/versions/{version}/infer", **infer_kw)
    async def infer_version(
        request: Request, name: str, version: str, client: ClientId = None, authorization: Auth = None
    ) -> Response:
        return await _infer(request, name, version, client, authorization)

    @app.get("/v2/models/{name}/usage", responses={404: _ERRORS[404], **auth_errors})
    async def usage(name: str, client: ClientId = None, authorization: Auth = None) -> Any:
        try:
            cid = _who(client, authorization)
            _model(name)
        except (ProtocolError, AuthError) as exc:
            return _error(exc.status, str(exc))
        left, burst = api.remaining(cid), api.burst(cid)
        return {"client": cid, "spent": api.spent(cid), "remaining": left, "burst": burst}

    @app.get("/v2/admin/accounts", responses={404: _ERRORS[404], **auth_errors})
    async def accounts(authorization: Auth = None) -> Any:
        """Every account's limits, queries spent, and detector alarms (an admin key only)."""
        if api.store is None:
            return _error(404, "this server has no accounts (mextract serve --store)")
        try:
            who = api.store.account(_who(None, authorization))
        except AuthError as exc:
            return _error(exc.status, str(exc))
        if not who.admin:
            return _error(403, f"account {who.name!r} is not an admin")
        rows = await run_in_threadpool(api.store.usage)
        for row in rows:  # an alarm in the log counts too: a restarted server restores state lazily
            live = api.detect is not None and api.detect.flagged(row["name"])
            row["flagged"] = live or any(a.startswith("prada") for a in row["alarms"])
        return rows

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
            schema.setdefault("components", {}).setdefault("schemas", {}).update(body_defs)
            return schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


@contextlib.contextmanager
def running(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL.

    ``port=0`` takes a free port. For tests, benchmarks and notebooks; the server stops
    when the block ends.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="mextract-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise MextractError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
