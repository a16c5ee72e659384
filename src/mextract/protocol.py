"""The Open Inference Protocol's REST binding: the wire format of a prediction API.

What Triton, KServe, MLServer and ``mextract serve`` speak (the "V2" protocol,
https://github.com/kserve/open-inference-protocol). Both ends live here — the server's
request decoding and response encoding, the client's request encoding and response
decoding — so that :class:`~mextract.oracle.RemoteOracle` and the server cannot drift
apart. FastAPI and pydantic validate the JSON; what no library does for this protocol is
its *binary tensor data* extension, written here: a body is the JSON header, of the
length given by the ``Inference-Header-Content-Length`` header, followed by the raw
little-endian bytes of every tensor whose ``parameters.binary_data_size`` is set, in
order.

Every problem with a request raises :class:`ProtocolError`, carrying the HTTP status
(4xx) and a message naming the problem; nothing a client sends reaches the model
unchecked.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from mextract.errors import MextractError

#: the binary extension's header: the length of the JSON part of a body
JSON_LENGTH_HEADER = "Inference-Header-Content-Length"
#: who is asking (until accounts exist: a client id the caller states)
CLIENT_HEADER = "X-Client-Id"
DEFAULT_CLIENT = "anonymous"
#: calibrated proof of work: the server's puzzle (a 428 answer), sent back with its solution
POW_PUZZLE_HEADER = "X-PoW-Puzzle"
POW_NONCE_HEADER = "X-PoW-Nonce"

#: the protocol's tensor data types and their numpy types (little-endian on the wire)
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: what a prediction API of mextract accepts as input: real numbers in single or double precision
FLOAT_TYPES = ("FP32", "FP64")
#: numpy's limit on an array's dimensions (numpy 1.x; 2.x allows 64): a shape past it is refused
MAX_DIMS = 32
_MAX_ITEMSIZE = max(dt.itemsize for dt in DATATYPES.values())


class ProtocolError(MextractError):
    """A request (or response) that breaks the protocol; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- messages


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")


Parameters = dict[str, bool | int | float | str]


class RequestInput(_Message):
    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(_Message):
    name: str
    parameters: Parameters | None = None


class InferRequest(_Message):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Message):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferResponse(_Message):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(_Message):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(_Message):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters | None = None


class ServerMetadata(_Message):
    name: str
    version: str
    extensions: list[str]


class Health(_Message):
    live: bool | None = None
    ready: bool | None = None


class ErrorResponse(BaseModel):
    error: str


# ----------------------------------------------------------------------------- tensors


def _split_body(body: bytes, json_length: str | None) -> tuple[bytes, bytes]:
    if json_length is None:
        return body, b""
    try:
        n = int(json_length)
    except ValueError:
        raise ProtocolError(f"{JSON_LENGTH_HEADER}: expected an integer, got {json_length!r}") from None
    if not 0 < n <= len(body):
        raise ProtocolError(f"{JSON_LENGTH_HEADER}: {n} is not within the body's {len(body)} bytes")
    return body[:n], body[n:]


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"{what}: malformed JSON ({exc})") from None


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _shape(shape: list[int], where: str) -> tuple[int, ...]:
    if any(isinstance(s, bool) or s < 0 for s in shape):
        raise ProtocolError(f"{where}.shape: expected non-negative sizes, got {shape}")
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"{where}.shape: expected at most {MAX_DIMS} dimensions, got {len(shape)}")
    # numpy refuses a shape whose non-zero sizes multiply past its index type, even with a zero in it
    if math.prod(s for s in shape if s) * _MAX_ITEMSIZE > np.iinfo(np.intp).max:
        raise ProtocolError(f"{where}.shape: {shape} is too large for a tensor")
    return tuple(shape)


def _dtype(datatype: str, where: str, accept: tuple[str, ...] | None) -> np.dtype[Any]:
    if datatype not in DATATYPES:
        known = ", ".join(DATATYPES)
        raise ProtocolError(
            f"{where}.datatype: {datatype!r} is not a tensor data type of the protocol ({known})"
        )
    if accept is not None and datatype not in accept:
        raise ProtocolError(f"{where}.datatype: expected {' or '.join(accept)}, got {datatype}")
    return DATATYPES[datatype]


def _from_json_data(data: list[Any], shape: tuple[int, ...], dtype: np.dtype[Any], where: str) -> np.ndarray:
    """A tensor from its JSON data: flat in row-major order or nested, as the protocol allows."""
    try:
        arr = np.asarray(data)
    except ValueError:
        raise ProtocolError(f"{where}.data: ragged nested lists") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ProtocolError(f"{where}.data: expected numbers, got {arr.dtype.name} elements")
    if dtype.kind != "f" and arr.dtype.kind == "f":
        raise ProtocolError(f"{where}.data: expected integers for {dtype.name}, got floating-point values")
    if arr.size != math.prod(shape):
        raise ProtocolError(f"{where}.data: {arr.size} value(s) for shape {list(shape)} ({math.prod(shape)})")
    try:
        with np.errstate(over="raise", invalid="ignore"):
            return arr.astype(dtype).reshape(shape)
    except (OverflowError, FloatingPointError):
        raise ProtocolError(f"{where}.data: values out of range for {dtype.name}") from None


def _from_bytes(raw: bytes, shape: tuple[int, ...], dtype: np.dtype[Any], where: str) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(
            f"{where}: {len(raw)} binary bytes for shape {list(shape)} of {dtype.name} ({expected})"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _binary_size(params: Parameters | None, where: str) -> int | None:
    size = (params or {}).get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ProtocolError(f"{where}.parameters.binary_data_size: expected a byte count, got {size!r}")
    return size


def decode_request(
    body: bytes, json_length: str | None = None, *, accept: tuple[str, ...] | None = FLOAT_TYPES
) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The request and its input tensors by name; raises :class:`ProtocolError` on anything wrong.

    ``json_length`` is the ``Inference-Header-Content-Length`` header (``None``: all JSON);
    ``accept`` the input data types allowed (``None``: any of the protocol's).
    """
    head, tail = _split_body(body, json_length)
    raw = _parse_json(head, "request")
    if not isinstance(raw, dict):
        raise ProtocolError(f"request: expected a JSON object, got {type(raw).__name__}")
    try:
        request = InferRequest.model_validate(raw)
    except ValidationError as exc:
        raise ProtocolError(f"request: {_validation_message(exc)}") from None
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for i, spec in enumerate(request.inputs):
        where = f"inputs[{i}] ({spec.name!r})"
        if spec.name in tensors:
            raise ProtocolError(f"{where}: input named twice")
        shape = _shape(spec.shape, where)
        dtype = _dtype(spec.datatype, where, accept)
        size = _binary_size(spec.parameters, where)
        if size is not None:
            if spec.data is not None:
                raise ProtocolError(f"{where}: both JSON data and binary_data_size given")
            if offset + size > len(tail):
                raise ProtocolError(f"{where}: binary_data_size {size} passes the end of the body")
            tensors[spec.name] = _from_bytes(tail[offset : offset + size], shape, dtype, where)
            offset += size
        elif spec.data is None:
            raise ProtocolError(f"{where}: no data (give 'data' or binary data)")
        else:
            tensors[spec.name] = _from_json_data(spec.data, shape, dtype, where)
    if offset != len(tail):
        raise ProtocolError(f"request: {len(tail) - offset} binary byte(s) after the last tensor")
    return request, tensors


def wants_binary(request: InferRequest, output: str) -> bool:
    """Whether ``output`` is to be sent as binary data (per output, or for all outputs)."""
    value: object = (request.parameters or {}).get("binary_data_output", False)
    where = "parameters.binary_data_output"
    for i, out in enumerate(request.outputs or []):
        if out.name == output and out.parameters and "binary_data" in out.parameters:
            value, where = out.parameters["binary_data"], f"outputs[{i}].parameters.binary_data"
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: expected true or false, got {value!r}")
    return value


def datatype_of(arr: np.ndarray) -> str:
    for name, dt in DATATYPES.items():
        if arr.dtype == dt:
            return name
    raise ProtocolError(f"no protocol data type for {arr.dtype}", status=500)  # pragma: no cover


def encode_response(
    model_name: str, outputs: dict[str, np.ndarray], *, binary: dict[str, bool], request_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """A response body and its headers (binary outputs after the JSON header, as requested)."""
    specs, blobs = [], []
    for name, arr in outputs.items():
        spec: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype_of(arr)}
        if binary.get(name):
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            spec["data"] = arr.ravel().tolist()
        specs.append(spec)
    message: dict[str, Any] = {"model_name": model_name, "outputs": specs}
    if request_id is not None:
        message["id"] = request_id
    head = orjson.dumps(message)
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {
        "content-type": "application/octet-stream",
        JSON_LENGTH_HEADER: str(len(head)),
    }


# ----------------------------------------------------------------------------- the client's side


def encode_request(
    x: np.ndarray, *, input_name: str, output_name: str, binary: bool = True
) -> tuple[bytes, dict[str, str]]:
    """A request for one input tensor ``x`` (FP32 or FP64) and one output."""
    datatype = datatype_of(x)
    spec: dict[str, Any] = {"name": input_name, "shape": list(x.shape), "datatype": datatype}
    message: dict[str, Any] = {"inputs": [spec], "outputs": [{"name": output_name}]}
    message["outputs"][0]["parameters"] = {"binary_data": binary}
    if not binary:
        spec["data"] = x.ravel().tolist()
        return orjson.dumps(message), {"content-type": "application/json"}
    raw = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
    spec["parameters"] = {"binary_data_size": len(raw)}
    head = orjson.dumps(message)
    return head + raw, {"content-type": "application/octet-stream", JSON_LENGTH_HEADER: str(len(head))}


def decode_response(body: bytes, json_length: str | None, output_name: str) -> np.ndarray:
    """The tensor ``output_name`` of a response; raises :class:`ProtocolError` when it is
    missing or malformed (a server that does not speak the protocol)."""
    head, tail = _split_body(body, json_length)
    raw = _parse_json(head, "response")
    try:
        response = InferResponse.model_validate(raw)
    except ValidationError as exc:
        raise ProtocolError(f"response: {_validation_message(exc)}", status=502) from None
    offset = 0
    for i, spec in enumerate(response.outputs):
        where = f"response outputs[{i}] ({spec.name!r})"
        try:
            shape = _shape(spec.shape, where)
            dtype = _dtype(spec.datatype, where, None)
            size = _binary_size(spec.parameters, where)
            if size is not None:
                arr = _from_bytes(tail[offset : offset + size], shape, dtype, where)
                offset += size
            elif spec.data is not None:
                arr = _from_json_data(spec.data, shape, dtype, where)
            else:
                raise ProtocolError(f"{where}: no data")
        except ProtocolError as exc:
            raise ProtocolError(str(exc), status=502) from None
        if spec.name == output_name:
            return arr
    names = [o.name for o in response.outputs]
    raise ProtocolError(f"response: no output named {output_name!r} (got {names})", status=502)


def error_message(body: bytes) -> str:
    """The ``error`` of a protocol error body, else the body's text (shortened)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    text = body.decode("utf-8", "replace").strip()
    return text[:300] + ("…" if len(text) > 300 else "")
