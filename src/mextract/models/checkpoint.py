"""Checkpoints: weights as safetensors plus a JSON of metadata. No pickle anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from mextract.data.base import ValueRange
from mextract.data.tabular import TabularSchema
from mextract.errors import DataError
from mextract.models.zoo import create_model

WEIGHTS, META = "model.safetensors", "model.json"


def save_checkpoint(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory``.

    ``meta`` must hold ``architecture``, ``input_shape`` and ``num_classes`` (and may hold
    ``options``, ``value_range`` — the declared range of the inputs, see
    :class:`~mextract.data.ValueRange` —, dataset, split, seed, test accuracy ...), enough
    to rebuild the model and describe its inputs.
    """
    missing = {"architecture", "input_shape", "num_classes"} - set(meta)
    if missing:
        raise DataError(f"checkpoint metadata is missing {sorted(missing)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    first = next(model.parameters(), None)
    meta = {**meta, "dtype": str(first.dtype).removeprefix("torch.") if first is not None else "float32"}
    save_file(state, str(d / WEIGHTS))
    (d / META).write_text(json.dumps(meta, indent=2, default=str))
    return d


def split_seed_of(meta: dict[str, Any]) -> int:
    """The seed of the data split a victim was trained on (``meta["split"]["seed"]``; older
    checkpoints: their training seed)."""
    return int(meta.get("split", {}).get("seed", meta.get("seed", 0)))


def schema_of(meta: dict[str, Any]) -> TabularSchema | None:
    """The record fields of a tabular victim's data (``meta["split"]["schema"]``), which its API
    publishes; ``None`` for images and older checkpoints."""
    data = meta.get("split", {}).get("schema")
    return None if data is None else TabularSchema.from_json(data)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata, checked, without building the model or reading weights."""
    d = Path(directory)
    if not (d / WEIGHTS).is_file() or not (d / META).is_file():
        raise DataError(
            f"{d}: expected a checkpoint folder holding {WEIGHTS} and {META} "
            "(as written by `mextract train-victim`)"
        )
    try:
        meta = json.loads((d / META).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{d / META}: malformed checkpoint metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{d / META}: malformed checkpoint metadata (expected a JSON object)")
    missing = {"architecture", "input_shape", "num_classes"} - set(meta)
    if missing:
        raise DataError(f"{d / META}: malformed checkpoint metadata (missing {sorted(missing)})")
    if "value_range" not in meta:  # checkpoints older than the field: the convention for the shape
        meta["value_range"] = ValueRange.for_shape(meta["input_shape"]).to_json()
    return meta


def load_checkpoint(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a zoo model from a checkpoint folder; returns ``(model, meta)`` in eval mode."""
    d = Path(directory)
    meta = read_meta(d)
    model = create_model(
        meta["architecture"], meta["input_shape"], meta["num_classes"], **meta.get("options", {})
    )
    if meta.get("dtype") == "float64":  # e.g. parameters recovered exactly by direct extraction
        model = model.double()
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    return model.eval(), meta
