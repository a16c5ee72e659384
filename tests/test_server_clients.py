"""The prediction API server against real, unmodified third-party clients, and its HTTP boundary.

Triton's and KServe's own clients must get from ``mextract serve`` exactly the answers of
the same defended stack queried in-process; every bad request, whatever its shape, must
get a 4xx and a JSON ``{"error": ...}`` naming the problem, never a 5xx (schemathesis over
the server's OpenAPI schema, a property test of near-valid requests, and a table of
hand-made bad requests); per-client ledgers and defence state hold over HTTP and under
concurrent clients. Everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import requests
import schemathesis
import torch
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve.inference_client import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput as KInferInput
from kserve.protocol.infer_type import InferRequest as KInferRequest
from kserve.protocol.infer_type import RequestedOutput as KRequestedOutput
from torch import nn
from tritonclient.utils import InferenceServerException

from mextract.data.base import IMAGE_RANGE
from mextract.defences.ownership import DawnWatermark
from mextract.oracle import APIDescription, VictimOracle
from mextract.protocol import CLIENT_HEADER, JSON_LENGTH_HEADER
from mextract.server import ServedAPI, create_app, running

SHAPE = (1, 4, 4)
FEATURES = math.prod(SHAPE)
NUM_CLASSES = 3
MODEL = "victim"
INFER = f"/v2/models/{MODEL}/infer"
#: a deterministic defence, so the remote answers can be compared exactly with local ones
ROUNDING = 'rounding:{"decimals": 3}'
NP_TYPES: dict[str, type[np.floating[Any]]] = {"FP32": np.float32, "FP64": np.float64}


def _victim(seed: int = 0) -> VictimOracle:
    """A tiny seeded linear victim on 1×4×4 inputs in [0, 1], answering probabilities in FP32."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, NUM_CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return VictimOracle(
        net, input_shape=SHAPE, num_classes=NUM_CLASSES, mode="probs", value_range=IMAGE_RANGE
    )


def _batch(n: int, seed: int, dtype: type[np.floating[Any]] = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE)).astype(dtype)


def _local(api: ServedAPI, x: np.ndarray) -> np.ndarray:
    """The answers of the same defended stack queried in-process (its own client id)."""
    return api.oracle("local-reference").query(torch.from_numpy(x)).numpy()


def _json_body(x: np.ndarray, datatype: str = "FP32", **extra: Any) -> bytes:
    spec = {"name": "input", "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}
    return json.dumps({"inputs": [spec], **extra}).encode()


def _binary_body(
    x: np.ndarray, datatype: str = "FP32", size: int | None = None
) -> tuple[bytes, dict[str, str]]:
    raw = x.astype(NP_TYPES[datatype]).tobytes()
    spec = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw) if size is None else size},
    }
    head = json.dumps({"inputs": [spec]}).encode()
    return head + raw, {"content-type": "application/octet-stream", JSON_LENGTH_HEADER: str(len(head))}


def _answers(response: httpx.Response) -> np.ndarray:
    """The output tensor of an infer response, decoded here (JSON or binary)."""
    n = int(response.headers.get(JSON_LENGTH_HEADER, len(response.content)))
    out = json.loads(response.content[:n])["outputs"][0]
    dtype = np.dtype(NP_TYPES[out["datatype"]]).newbyteorder("<")
    arr = (
        np.array(out["data"], dtype=dtype)
        if "data" in out
        else np.frombuffer(response.content[n:], dtype=dtype)
    )
    return arr.reshape(out["shape"])


@pytest.fixture(scope="module")
def api() -> ServedAPI:
    return ServedAPI(_victim(), name=MODEL, defence=ROUNDING)


@pytest.fixture(scope="module")
def url(api: ServedAPI) -> Iterator[str]:
    with running(create_app(api)) as base:
        assert base.startswith("http://127.0.0.1:")
        yield base


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def small_url() -> Iterator[str]:
    """A server whose body limit is 1 KiB."""
    with running(create_app(ServedAPI(_victim(), name=MODEL), max_body_bytes=1024)) as base:
        yield base


# ============================================================================ tritonclient


@pytest.fixture(scope="module")
def triton_client(url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=url.removeprefix("http://"))
    yield client
    client.close()


def test_triton_client_reads_health_and_metadata(
    triton_client: triton.InferenceServerClient, api: ServedAPI
) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert triton_client.is_model_ready(MODEL, model_version="1")
    assert not triton_client.is_model_ready("nope")
    server = triton_client.get_server_metadata()
    assert server["name"] == "mextract" and "binary_tensor_data" in server["extensions"]
    meta = triton_client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *SHAPE]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, NUM_CLASSES]}]
    described = APIDescription.from_json(json.loads(meta["parameters"]["mextract_api"]))
    assert described == api.description
    assert (described.mode.value, described.decimals, described.value_range) == ("rounded", 3, IMAGE_RANGE)
    assert triton_client.get_model_metadata(MODEL, model_version="1") == meta


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["bin-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False, None], ids=["bin-out", "json-out", "default-out"])
def test_triton_client_infers_what_the_local_stack_answers(
    triton_client: triton.InferenceServerClient,
    api: ServedAPI,
    datatype: str,
    binary_in: bool,
    binary_out: bool | None,
) -> None:
    seed = ["FP32", "FP64"].index(datatype) + 2 * binary_in + 4 * [True, False, None].index(binary_out)
    x = _batch(7, seed=seed, dtype=NP_TYPES[datatype])
    inp = triton.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outputs = None if binary_out is None else [triton.InferRequestedOutput("output", binary_data=binary_out)]
    before = api.spent("triton-user")
    result = triton_client.infer(
        MODEL, inputs=[inp], outputs=outputs, request_id="req-7", headers={CLIENT_HEADER: "triton-user"}
    )
    answers = result.as_numpy("output")
    assert answers.dtype == np.float32 and answers.shape == (7, NUM_CLASSES)
    np.testing.assert_array_equal(answers, _local(api, x))
    response = result.get_response()
    assert response["model_name"] == MODEL and response["id"] == "req-7"
    sent_binary = "binary_data_size" in (response["outputs"][0].get("parameters") or {})
    assert sent_binary == (binary_out is not False)  # tritonclient asks for binary by default
    assert api.spent("triton-user") == before + 7


def test_triton_client_versioned_route_counts_its_client(
    triton_client: triton.InferenceServerClient, api: ServedAPI
) -> None:
    x = _batch(3, seed=99)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = triton_client.infer(MODEL, inputs=[inp], model_version="1", headers={CLIENT_HEADER: "triton-v1"})
    np.testing.assert_array_equal(result.as_numpy("output"), _local(api, x))
    assert api.spent("triton-v1") == 3


@pytest.mark.parametrize(
    ("model", "x", "status", "message"),
    [
        (MODEL, np.full((2, 1, 4, 5), 0.5, np.float32), "400", "expected a batch of shape"),
        (MODEL, np.full((2, *SHAPE), 1.5, np.float32), "400", "values lie in [1.5, 1.5], expected [0, 1]"),
        ("nope", np.full((2, *SHAPE), 0.5, np.float32), "404", "unknown model 'nope'"),
    ],
    ids=["shape", "range", "model"],
)
def test_triton_client_raises_the_servers_explanation(
    triton_client: triton.InferenceServerClient,
    api: ServedAPI,
    model: str,
    x: np.ndarray,
    status: str,
    message: str,
) -> None:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer(model, inputs=[inp], headers={CLIENT_HEADER: "triton-errors"})
    assert message in caught.value.message()
    assert str(caught.value.status()) == status
    assert api.spent("triton-errors") == 0  # nothing refused is counted
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton_client.get_model_metadata("nope")


# ============================================================================ KServe's REST client


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_rest_client_infers_what_the_local_stack_answers(
    url: str, api: ServedAPI, datatype: str, binary: bool
) -> None:
    x = _batch(6, seed=200 + 2 * ["FP32", "FP64"].index(datatype) + binary, dtype=NP_TYPES[datatype])
    client_id = f"kserve-{datatype}-{binary}"
    headers: dict[str, str] = {}

    async def scenario() -> tuple[tuple[bool, bool, bool], Any]:
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            health = (
                await client.is_server_live(url),
                await client.is_server_ready(url),
                await client.is_model_ready(url, MODEL),
            )
            inp = KInferInput("input", list(x.shape), datatype)
            inp.set_data_from_numpy(x, binary_data=binary)
            request = KInferRequest(
                model_name=MODEL,
                infer_inputs=[inp],
                request_id="k-1",
                request_outputs=[KRequestedOutput("output", parameters={"binary_data": binary})],
            )
            _, json_length = request.to_rest()
            assert (json_length is not None) == binary  # really the binary extension, or really JSON
            response = await client.infer(
                url, request, model_name=MODEL, headers={CLIENT_HEADER: client_id}, response_headers=headers
            )
            return health, response
        finally:
            await client.close()

    health, response = asyncio.run(scenario())
    assert health == (True, True, True)
    assert (JSON_LENGTH_HEADER.lower() in headers) == binary  # the answer came as asked: binary or JSON
    assert response.model_name == MODEL and response.id == "k-1"
    answers = response.outputs[0].as_numpy()
    assert answers.dtype == np.float32 and answers.shape == (6, NUM_CLASSES)
    np.testing.assert_array_equal(answers, _local(api, x))
    assert api.spent(client_id) == 6


def test_kserve_rest_client_raises_the_servers_explanation(url: str, api: ServedAPI) -> None:
    x = np.full((2, *SHAPE), -1.0, np.float32)

    async def scenario() -> None:
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            inp = KInferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            await client.infer(
                url,
                KInferRequest(model_name=MODEL, infer_inputs=[inp]),
                model_name=MODEL,
                headers={CLIENT_HEADER: "kserve-errors"},
            )
        finally:
            await client.close()

    with pytest.raises(httpx.HTTPStatusError, match=r"values lie in \[-1, -1\], expected \[0, 1\]") as caught:
        asyncio.run(scenario())
    assert caught.value.response.status_code == 400
    assert api.spent("kserve-errors") == 0


# ============================================================================ bad requests, by hand


def _case(
    body: bytes,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    path: str = INFER,
    method: str = "POST",
) -> tuple[str, str, bytes, dict[str, str], int, str]:
    return method, path, body, {"content-type": "application/json", **(headers or {})}, status, message


_X2 = _batch(2, seed=5)
_NAN = _X2.copy()
_NAN[1, 0, 2, 3] = np.nan
_BIN, _BIN_HEADERS = _binary_body(_X2)
_HEAD_LEN = int(_BIN_HEADERS[JSON_LENGTH_HEADER])
_PAST_END, _PAST_END_HEADERS = _binary_body(_X2, size=_X2.nbytes + 4)
_SPEC = {"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * FEATURES}
_HUGE = json.dumps(
    {"inputs": [{**_SPEC, "shape": [0, 2**62, 2**62], "data": None, "parameters": {"binary_data_size": 0}}]}
).encode()

BAD_REQUESTS = {
    "malformed-json": _case(b'{"inputs": [', 400, "request: malformed JSON"),
    "json-list": _case(b"[1, 2, 3]", 400, "request: expected a JSON object, got list"),
    "empty-body": _case(b"", 400, "malformed JSON"),
    "empty-inputs": _case(b'{"inputs": []}', 400, "inputs: List should have at least 1 item"),
    "inputs-not-a-list": _case(b'{"inputs": {"name": "input"}}', 400, "inputs: Input should be a valid list"),
    "unknown-datatype": _case(_json_body(_X2, "FP99"), 400, "'FP99' is not a tensor data type"),
    "int8": _case(_json_body(_X2.astype(np.int8), "INT8"), 400, "expected FP32 or FP64, got INT8"),
    "count-mismatch": _case(
        json.dumps({"inputs": [{**_SPEC, "data": [0.5] * 15}]}).encode(),
        400,
        "15 value(s) for shape [1, 1, 4, 4] (16)",
    ),
    "strings-as-data": _case(
        json.dumps({"inputs": [{**_SPEC, "data": ["a"] * 16}]}).encode(), 400, "expected numbers"
    ),
    "ragged-data": _case(
        json.dumps({"inputs": [{**_SPEC, "data": [[0.5], [0.5, 0.5]]}]}).encode(), 400, "ragged nested lists"
    ),
    "negative-shape": _case(
        json.dumps({"inputs": [{**_SPEC, "shape": [-1, *SHAPE]}]}).encode(),
        400,
        "expected non-negative sizes",
    ),
    # numpy refuses these shapes (ValueError, once a 500): more dimensions than it allows, and
    # sizes whose product passes its index type even with a zero among them
    "too-many-dimensions": _case(
        json.dumps({"inputs": [{**_SPEC, "shape": [1] * 70, "data": [0.5]}]}).encode(),
        400,
        "expected at most 32 dimensions, got 70",
    ),
    "empty-but-huge-shape": _case(
        json.dumps({"inputs": [{**_SPEC, "shape": [0, 2**40, 2**40], "data": []}]}).encode(),
        400,
        "[0, 1099511627776, 1099511627776] is too large for a tensor",
    ),
    "binary-empty-but-huge-shape": (
        "POST",
        INFER,
        _HUGE,
        {"content-type": "application/octet-stream", JSON_LENGTH_HEADER: str(len(_HUGE))},
        400,
        "[0, 4611686018427387904, 4611686018427387904] is too large for a tensor",
    ),
    "nan-binary-fp32": (
        "POST",
        INFER,
        *_binary_body(_NAN),
        400,
        "query: contains 1 NaN or infinite value(s)",
    ),
    "out-of-range": _case(_json_body(_X2 + 2), 400, "expected [0, 1]"),
    "wrong-input-name": _case(
        json.dumps({"inputs": [{**_SPEC, "name": "pixels"}]}).encode(),
        400,
        "expected one tensor named 'input', got ['pixels']",
    ),
    "input-twice": _case(json.dumps({"inputs": [_SPEC, _SPEC]}).encode(), 400, "input named twice"),
    "wrong-output-name": _case(
        _json_body(_X2, outputs=[{"name": "probs"}]), 400, "unknown output 'probs'; this model has 'output'"
    ),
    "binary-size-past-end": ("POST", INFER, _PAST_END, _PAST_END_HEADERS, 400, "passes the end of the body"),
    "trailing-binary-bytes": (
        "POST",
        INFER,
        _BIN + b"\x00" * 3,
        _BIN_HEADERS,
        400,
        "3 binary byte(s) after the last tensor",
    ),
    "header-length-not-integer": (
        "POST",
        INFER,
        _BIN,
        {**_BIN_HEADERS, JSON_LENGTH_HEADER: "abc"},
        400,
        "Inference-Header-Content-Length: expected an integer, got 'abc'",
    ),
    "header-length-past-body": (
        "POST",
        INFER,
        _BIN,
        {**_BIN_HEADERS, JSON_LENGTH_HEADER: str(len(_BIN) + 1)},
        400,
        "is not within the body's",
    ),
    "header-length-zero": (
        "POST",
        INFER,
        _BIN,
        {**_BIN_HEADERS, JSON_LENGTH_HEADER: "0"},
        400,
        "0 is not within the body's",
    ),
    "header-length-short": (
        "POST",
        INFER,
        _BIN,
        {**_BIN_HEADERS, JSON_LENGTH_HEADER: str(_HEAD_LEN - 1)},
        400,
        "malformed JSON",
    ),
    "client-id-too-long": _case(
        _json_body(_X2), 400, "client id: expected 1 to 128 characters", headers={CLIENT_HEADER: "c" * 129}
    ),
    "unknown-model": _case(_json_body(_X2), 404, "unknown model 'resnet'", path="/v2/models/resnet/infer"),
    "unknown-version": _case(
        _json_body(_X2), 404, "has no version '2'", path=f"/v2/models/{MODEL}/versions/2/infer"
    ),
    "unknown-model-metadata": _case(
        b"", 404, "unknown model 'resnet'", path="/v2/models/resnet", method="GET"
    ),
    "bool-as-size": _case(
        json.dumps({"inputs": [{**_SPEC, "shape": [True, 1, 4, 4]}]}).encode(), 400, "valid integer"
    ),
    "binary-flag-as-text": _case(
        _json_body(_X2, outputs=[{"name": "output", "parameters": {"binary_data": "false"}}]),
        400,
        "binary_data: expected true or false, got 'false'",
    ),
    "unknown-route": _case(_json_body(_X2), 404, "Not Found", path="/v2/models/victim/predict"),
    "unknown-route-get": _case(b"", 404, "Not Found", path="/v1/models", method="GET"),
    "wrong-method": _case(b"", 405, "Method Not Allowed", method="GET"),
}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "message"),
    list(BAD_REQUESTS.values()),
    ids=list(BAD_REQUESTS),
)
def test_a_bad_request_gets_a_4xx_naming_the_problem(
    url: str,
    api: ServedAPI,
    http: httpx.Client,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    response = http.request(method, url + path, content=body, headers={CLIENT_HEADER: "bad", **headers})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str) and message in error
    if status == 405:
        assert response.headers["allow"] == "POST"  # RFC 9110: a 405 says what is allowed
    assert api.spent("bad") == 0


def test_a_body_over_the_limit_gets_413_declared_or_streamed(small_url: str, http: httpx.Client) -> None:
    x = _batch(20, seed=6)  # 20 × 16 × 4 bytes = 1,280 bytes of binary data alone
    body, headers = _binary_body(x)
    assert len(body) > 1024
    declared = http.post(small_url + INFER, content=body, headers=headers)
    assert declared.status_code == 413
    assert "over this server's limit of 1024" in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    streamed = http.post(small_url + INFER, content=chunks(), headers=headers)
    assert streamed.status_code == 413
    assert "over this server's limit of 1024 bytes" in streamed.json()["error"]
    small, small_headers = _binary_body(x[:2])  # under the limit: answered
    assert http.post(small_url + INFER, content=small, headers=small_headers).status_code == 200


# ============================================================================ near-valid requests, fuzzed

_FAULTS = [
    "datatype",
    "shape",
    "count",
    "nan",
    "range",
    "input_name",
    "output_name",
    "size",
    "trailing",
    "header",
]


@st.composite
def near_valid_requests(draw: st.DrawFn, fault: str | None) -> tuple[bytes, dict[str, str], np.ndarray]:
    """A valid infer request (any batch size, FP32 or FP64, JSON flat or nested or binary data,
    JSON or binary answers) with ``fault`` (one of ``_FAULTS``, or None) in it; its body, its
    headers and the batch meant."""
    n = draw(st.integers(1 if fault in ("nan", "range") else 0, 4))
    datatype = draw(st.sampled_from(["FP32", "FP64"]))
    values = draw(st.lists(st.floats(0, 1, width=32), min_size=n * FEATURES, max_size=n * FEATURES))
    x = np.array(values, dtype=NP_TYPES[datatype]).reshape(n, *SHAPE)
    sent = x.copy()
    if fault in ("nan", "range"):
        bad = [math.nan, math.inf, -math.inf] if fault == "nan" else [-0.5, 1.5, 255.0, -1e30]
        sent.flat[draw(st.integers(0, sent.size - 1))] = draw(st.sampled_from(bad))
    encoding = draw(st.sampled_from(["flat", "nested", "binary"]))
    spec: dict[str, Any] = {
        "name": "x" if fault == "input_name" else "input",
        "datatype": datatype,
        "shape": list(sent.shape),
    }
    if fault == "datatype":
        spec["datatype"] = draw(st.sampled_from(["INT8", "UINT8", "FP16", "BOOL", "fp32", "FP99", ""]))
    elif fault == "shape":
        spec["shape"] = draw(st.sampled_from([[n, FEATURES], [n, 1, FEATURES], [n * FEATURES], [n, 4, 4, 1]]))
    elif fault == "count":
        spec["shape"] = [n + 1, *SHAPE]
    message: dict[str, Any] = {"inputs": [spec]}
    if draw(st.booleans()):
        message["id"] = draw(st.text(max_size=8))
    binary_out = draw(st.booleans())
    if fault == "output_name":
        message["outputs"] = [{"name": "probs"}]
    elif draw(st.booleans()):
        message["outputs"] = [{"name": "output", "parameters": {"binary_data": binary_out}}]
    else:
        message["parameters"] = {"binary_data_output": binary_out}
    headers = {CLIENT_HEADER: draw(st.sampled_from(["fuzz-a", "fuzz-b"]))}
    if encoding == "binary":
        raw = sent.tobytes()
        spec["parameters"] = {"binary_data_size": len(raw)}
        if fault == "size":
            spec["parameters"]["binary_data_size"] += draw(
                st.sampled_from([-1, 1, -sent.itemsize, sent.itemsize])
            )
        head = json.dumps(message).encode()
        body = head + raw
        headers[JSON_LENGTH_HEADER] = str(len(head))
    else:
        spec["data"] = sent.ravel().tolist() if encoding == "flat" else sent.tolist()
        if fault == "size":  # JSON data and a binary size both
            spec["parameters"] = {"binary_data_size": 0}
        body = json.dumps(message).encode()  # NaN and infinities as JSON's NaN/Infinity: not JSON
    if fault == "trailing":
        body += b"\x00" * draw(st.integers(1, 8))
    if fault == "header":
        length = len(body) - len(raw) if encoding == "binary" else len(body)
        headers[JSON_LENGTH_HEADER] = draw(
            st.sampled_from([str(length - 1), str(len(body) + 1), "0", "-3", "x"])
        )
    return body, headers, x


@pytest.mark.parametrize("fault", [None, *_FAULTS])
@given(data=st.data())
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_near_valid_requests_get_the_local_answers_or_a_400(
    url: str, api: ServedAPI, http: httpx.Client, fault: str | None, data: st.DataObject
) -> None:
    body, headers, x = data.draw(near_valid_requests(fault))
    response = http.post(url + INFER, content=body, headers=headers)
    if fault is None:
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(_answers(response), _local(api, x))
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]


# ============================================================================ schemathesis

_FUZZ_APP = create_app(ServedAPI(_victim(1), name=MODEL, budget=200))
#: every default check of schemathesis but positive_data_acceptance: the body schema cannot say
#: that the data must fit the declared shape, the datatype be FP32/FP64, the values lie in [0, 1]
_CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.negative_data_rejection,
    schemathesis.checks.missing_required_header,
    schemathesis.checks.unsupported_method,
    schemathesis.checks.allow_header_conformance,
    schemathesis.checks.ignored_auth,
    schemathesis.checks.use_after_free,
    schemathesis.checks.ensure_resource_availability,
]
#: health, metadata, readiness and usage, with random model names and versions
_OTHER_ROUTES = schemathesis.openapi.from_dict(_FUZZ_APP.openapi()).exclude(path_regex=r"/infer$")
#: the two infer routes, on the served model (random names only ever get the 404 tested above)
_INFER_ROUTES = schemathesis.openapi.from_dict(_FUZZ_APP.openapi()).include(path_regex=r"/infer$")
_INFER_ROUTES.config.update(parameters={"name": MODEL, "version": "1"})
for _schema in (_OTHER_ROUTES, _INFER_ROUTES):
    _schema.config.generation.update(modes=list(schemathesis.GenerationMode))  # valid and invalid data
_FUZZ_SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
#: what the fuzzer sent: calls per operation, and the errors the infer routes answered
FUZZED: Counter[str] = Counter()
INFER_ERRORS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def fuzz_url() -> Iterator[str]:
    with running(_FUZZ_APP) as base:
        yield base


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False
        yield s


def _call(case: schemathesis.Case, base_url: str, session: requests.Session) -> None:
    response = case.call_and_validate(base_url=base_url, session=session, checks=_CHECKS)
    assert response.status_code < 500
    FUZZED[case.operation.label] += 1
    if case.operation.path.endswith("/infer") and response.status_code >= 400:
        error = json.loads(response.content)["error"]  # every error is JSON naming the problem
        INFER_ERRORS[error.split(":")[0] if error.startswith("request") else error.split(" ")[0]] += 1


@_OTHER_ROUTES.parametrize()
@_FUZZ_SETTINGS
def test_schemathesis_other_routes(case: schemathesis.Case, fuzz_url: str, session: requests.Session) -> None:
    _call(case, fuzz_url, session)


@_INFER_ROUTES.parametrize()
@_FUZZ_SETTINGS
def test_schemathesis_infer_routes(case: schemathesis.Case, fuzz_url: str, session: requests.Session) -> None:
    _call(case, fuzz_url, session)


def test_schemathesis_sent_random_bodies_to_infer() -> None:
    """The fuzzer's bodies reached the protocol's own checks, past the JSON and model validation."""
    if not FUZZED:
        pytest.skip("the schemathesis tests did not run in this session")
    for label in ("POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer"):
        assert FUZZED[label] >= 40, FUZZED
    assert INFER_ERRORS["request"] > 0  # refused by JSON parsing or the request model
    past_the_model = sum(n for k, n in INFER_ERRORS.items() if k.startswith("inputs["))
    assert past_the_model > 0, INFER_ERRORS  # refused by the protocol's own checks on a tensor


# ============================================================================ per-client state over HTTP


def _post(client: httpx.Client, base: str, x: np.ndarray, client_id: str) -> httpx.Response:
    return client.post(base + INFER, content=_json_body(x), headers={CLIENT_HEADER: client_id})


def test_each_client_has_its_own_budget() -> None:
    api = ServedAPI(_victim(), name=MODEL, budget=20)
    with running(create_app(api)) as base, httpx.Client() as client:
        for i in range(4):
            r = _post(client, base, _batch(5, seed=300 + i), "a")
            assert r.status_code == 200
            assert r.headers["x-queries-spent"] == str(5 * i + 5)
            assert r.headers["x-queries-remaining"] == str(15 - 5 * i)
        refused = _post(client, base, _batch(1, seed=310), "a")
        assert refused.status_code == 403
        assert refused.json()["kind"] == "budget_exhausted" and "'a'" in refused.json()["error"]
        assert api.spent("a") == 20
        answered = _post(client, base, _batch(1, seed=310), "b")
        assert answered.status_code == 200 and answered.headers["x-queries-remaining"] == "19"
        usage = client.get(base + f"/v2/models/{MODEL}/usage", headers={CLIENT_HEADER: "a"}).json()
        assert usage == {"client": "a", "spent": 20, "remaining": 0, "burst": None}
    assert (api.spent("a"), api.spent("b")) == (20, 1)


def test_each_clients_dawn_evidence_holds_only_its_own_marked_queries() -> None:
    api = ServedAPI(_victim(), name=MODEL, defence='dawn:{"fraction": 0.5}')
    plain = _victim()  # the same weights, undefended
    xa, xb = _batch(24, seed=400), _batch(10, seed=401)
    with running(create_app(api)) as base, httpx.Client() as client:
        ra = _post(client, base, xa, "a")
        rb = _post(client, base, xb, "b")
        again = _post(client, base, xa[:6], "a")  # repeats: marked the same way, recorded once
    assert ra.status_code == rb.status_code == again.status_code == 200
    oracle_a, oracle_b = api.oracle("a"), api.oracle("b")
    assert isinstance(oracle_a, DawnWatermark) and isinstance(oracle_b, DawnWatermark)
    marked_a = oracle_a.decide(torch.from_numpy(xa))[0].numpy()
    marked_b = oracle_b.decide(torch.from_numpy(xb))[0].numpy()
    assert 0 < marked_a.sum() < len(xa) and 0 < marked_b.sum() < len(xb)
    assert (len(oracle_a), len(oracle_b)) == (int(marked_a.sum()), int(marked_b.sum()))
    np.testing.assert_array_equal(oracle_a.watermark_set[0].numpy(), xa[marked_a])
    np.testing.assert_array_equal(oracle_b.watermark_set[0].numpy(), xb[marked_b])
    # what the clients got: the marked answers' top-1 moved, the others' did not
    truth = plain.query(torch.from_numpy(xa)).argmax(1).numpy()
    assert ((_answers(ra).argmax(1) != truth) == marked_a).all()
    np.testing.assert_array_equal(_answers(again), _answers(ra)[:6])
    untouched = api.oracle("c")
    assert isinstance(untouched, DawnWatermark) and len(untouched) == 0


def test_concurrent_clients_are_each_counted_exactly(url: str, api: ServedAPI) -> None:
    clients = [f"concurrent-{i}" for i in range(4)]
    batches = {(t, r): _batch(5, seed=1000 + 10 * t + r) for t in range(8) for r in range(10)}
    expected = {key: _local(api, x) for key, x in batches.items()}

    def worker(t: int) -> list[str]:
        problems = []
        with httpx.Client() as client:
            for r in range(10):
                response = _post(client, url, batches[t, r], clients[t % 4])
                if response.status_code != 200:
                    problems.append(f"{t}/{r}: {response.status_code} {response.text}")
                elif not np.array_equal(_answers(response), expected[t, r]):
                    problems.append(f"{t}/{r}: wrong answers")
        return problems

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for found in pool.map(worker, range(8)) for p in found]
    assert problems == []
    assert [api.spent(c) for c in clients] == [100] * 4
