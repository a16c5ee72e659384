"""One function runs any cell of a plan and writes its record: :func:`run_cell`.

File layout of a run folder ``out``:

* ``out/victims/<victim key>/``: the victim's checkpoint (and ``victim.json``), with the
  artifacts measures prepare beside it (``<key>-reference/``, ``<key>-fingerprints.pt``);
* ``out/records/<kind>-<cell key>.json``: one record per cell, written atomically. Its
  ``key`` is the cell's :meth:`~mextract.experiments.plan.CellSpec.key`: the configuration,
  the victim's weights digest and the mextract version. A record whose key matches is a
  finished cell and is never recomputed.

Data flows one way: data → victim → oracle (+ defences, PRADA) → attack → substitute →
metrics and measures → record. The attack gets the client view of the defended API and
its own pool only; the evaluator and the measures run on the owner's side, after it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mextract._utils import seeded
from mextract.attacks import create_attack
from mextract.attacks.base import Callback
from mextract.attacks.registry import parse_attack_spec
from mextract.data import Dataset, ValueRange, load_splits
from mextract.defences.adversarial import PGDConfig
from mextract.defences.detection import Prada
from mextract.defences.registry import Owner, build_defence
from mextract.errors import DataError, InputError, MextractError
from mextract.experiments.measures import MEASURES, CellContext, VictimContext
from mextract.experiments.plan import CellSpec, VictimSpec
from mextract.experiments.records import Record
from mextract.metrics import Evaluator, answer_probs, answer_shift, expected_calibration_error, predict_probs
from mextract.models import load_checkpoint, schema_of, split_seed_of
from mextract.oracle import APIDescription, Oracle, VictimOracle
from mextract.oracle.base import oracle_layers

logger = logging.getLogger(__name__)

RECORDS = "records"


#: the environment variables a remote victim's API keys come from (never written to a record)
API_KEY_ENV, EVALUATOR_KEY_ENV = "MEXTRACT_API_KEY", "MEXTRACT_EVALUATOR_KEY"


def victim_folder(out: Path, victim: VictimSpec) -> Path:
    if victim.checkpoint is not None and victim.url is None:
        return Path(victim.checkpoint)
    from mextract.experiments.runner import VICTIM_DIR

    return Path(out) / "victims" / victim.key() / VICTIM_DIR


def weights_digest(folder: Path) -> str:
    """SHA-256 of a checkpoint's weights and metadata files."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "model.json"):
        p = folder / name
        if not p.is_file():
            raise DataError(f"{folder}: expected a checkpoint folder holding {name}")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def record_path(out: Path, spec: CellSpec, victim_digest: str) -> Path:
    return Path(out) / RECORDS / f"{spec.kind}-{spec.key(victim_digest)}.json"


def finished(out: Path, spec: CellSpec, victim_digest: str) -> Record | None:
    """The cell's record if it is done (same key), else ``None``."""
    path = record_path(out, spec, victim_digest)
    if not path.is_file():
        return None
    try:
        record = Record.load(path)
    except DataError:
        return None  # a damaged record is recomputed
    return record if record.key == spec.key(victim_digest) else None


# --------------------------------------------------------------------------- the victim


def _victim_splits(meta: dict[str, Any]) -> Any:
    dataset = meta.get("dataset")
    if dataset is None:
        raise DataError("this victim was trained on files only: an audit needs a victim of a named dataset")
    split_seed = split_seed_of(meta)
    return load_splits(dataset, seed=split_seed, root=meta.get("data_root"))


@lru_cache(maxsize=4)
def load_victim(folder: str, digest: str, device: str | None, seed: int) -> VictimContext:
    """A victim and its data, loaded once per process (keyed by its weights' digest)."""
    model, meta = load_checkpoint(folder)
    return VictimContext(Path(folder), model.eval(), meta, _victim_splits(meta), digest, device, seed)


def _remote_oracle(url: str, client_id: str, evaluator: bool = False) -> Any:
    import os

    from mextract.oracle import RemoteOracle

    key = os.environ.get(EVALUATOR_KEY_ENV if evaluator else API_KEY_ENV)
    return RemoteOracle(url, client_id=client_id, api_key=key)


def _remote_digest(url: str) -> str:
    """A prediction API's stand-in for a weights digest: its address and public description."""
    from mextract.experiments.plan import digest

    with _remote_oracle(url, "mextract-audit-evaluator", evaluator=True) as api:
        return digest({"url": url, "api": APIDescription.of(api).to_json()})


def digest_of(out: Path, victim: VictimSpec) -> str:
    """The victim's weights digest (a checkpoint), or its API's (a url)."""
    return (
        _remote_digest(victim.url) if victim.url is not None else weights_digest(victim_folder(out, victim))
    )


@lru_cache(maxsize=4)
def load_remote_victim(url: str, dataset: str, split_seed: int, folder: str, digest: str) -> VictimContext:
    """A prediction API as the measurements see it: its public description, the lab's split of
    ``dataset`` (the thieves' pool, the test set) and its top-1 answers through an evaluator
    client (``$MEXTRACT_EVALUATOR_KEY`` on a server with accounts)."""
    from mextract.models import default_model_for

    judge_api = _remote_oracle(url, "mextract-audit-evaluator", evaluator=True)
    desc = APIDescription.of(judge_api)
    splits = load_splits(dataset, seed=split_seed)
    if (
        tuple(splits.test.input_shape) != tuple(desc.input_shape)
        or splits.test.num_classes != desc.num_classes
    ):
        raise DataError(
            f"{dataset}: inputs {tuple(splits.test.input_shape)} and {splits.test.num_classes} classes, "
            f"the API takes {tuple(desc.input_shape)} and answers {desc.num_classes}"
        )
    meta = {"architecture": default_model_for(desc.input_shape), "input_shape": list(desc.input_shape),
            "num_classes": desc.num_classes, "dataset": dataset, "value_range": desc.value_range.to_json(),
            "url": url, "seed": split_seed}  # fmt: skip

    def judge(x: torch.Tensor) -> torch.Tensor:
        return judge_api.query(x).argmax(1)

    Path(folder).mkdir(parents=True, exist_ok=True)
    return VictimContext(Path(folder), None, meta, splits, digest, None, split_seed, judge=judge)


def victim_context(out: Path, victim: VictimSpec, digest: str, device: str | None) -> VictimContext:
    folder = victim_folder(out, victim)
    if victim.url is not None:
        if victim.dataset is None:
            raise InputError("a prediction API's audit needs a dataset: the thieves' pool and the test set")
        return load_remote_victim(victim.url, victim.dataset, victim.split_seed, str(folder), digest)
    return load_victim(str(folder), digest, device, victim.split_seed)


def _train_victim(out: Path, spec: VictimSpec, device: str | None, callback: Callback | None) -> Record:
    from mextract.experiments.runner import train_victim_run

    adversarial = None if spec.adversarial is None else PGDConfig(**spec.adversarial)
    return train_victim_run(
        victim_folder(out, spec).parent,
        dataset=spec.dataset,
        model=spec.architecture,
        preset=spec.preset,
        seed=spec.split_seed,
        device=device,
        callback=callback,
        trigger_target=spec.trigger_target,
        adversarial=adversarial,
    )


def _run_victim(out: Path, spec: CellSpec, device: str | None, callback: Callback | None) -> Record:
    metrics: dict[str, Any] = {}
    config: dict[str, Any] = {"variant": spec.victim.variant}
    if spec.victim.checkpoint is None and spec.victim.url is None:
        trained = _train_victim(out, spec.victim, device, callback)
        metrics.update(trained.metrics)
        config.update(trained.config)
    digest = digest_of(out, spec.victim)
    v = victim_context(out, spec.victim, digest, device)
    if spec.victim.checkpoint is not None or spec.victim.url is not None:
        metrics["test_accuracy"] = _evaluator(v).victim_accuracy
        config.update({"dataset": v.meta.get("dataset"), "architecture": v.meta["architecture"]})
    for name in spec.measures:
        prepare = MEASURES[name].prepare
        if prepare is not None:
            if callback is not None:
                callback({"stage": "prepare", "name": name})
            with seeded(spec.victim.split_seed):
                metrics.update(prepare(v))
    config.update({"cell": spec.model_dump(), "victim_digest": digest})
    return Record(
        kind="victim",
        name=v.meta["architecture"],
        seed=spec.victim.split_seed,
        config=config,
        metrics=metrics,
        key=spec.key(""),
    )


# --------------------------------------------------------------------------- APIs


def _owner(v: VictimContext) -> Owner:
    return _owners(str(v.folder), v.digest, v.device, v.seed)


@lru_cache(maxsize=4)
def _owners(folder: str, digest: str, device: str | None, seed: int) -> Owner:
    v = load_victim(folder, digest, device, seed)
    assert v.model is not None  # a checkpoint
    return Owner(
        victim=v.model,
        train=v.splits.victim_train,
        architecture=v.meta["architecture"],
        seed=seed,
        device=device,
    )


def defended_api(v: VictimContext, spec: str, client_id: str = "") -> Oracle:
    """A fresh defended API: the victim's answers (probabilities undefended, logits under a
    defence, which sets the answer itself), wrapped in the defence stack ``spec``. For a
    prediction API, a new client of it (``client_id``) with ``spec`` on the client's side
    (``label_only`` for a label-only thief)."""
    if v.model is None:
        return build_defence(spec, _remote_oracle(str(v.meta["url"]), client_id))
    base = VictimOracle(
        v.model,
        input_shape=v.meta["input_shape"],
        num_classes=v.meta["num_classes"],
        mode="probs" if spec == "none" else "logits",
        device=v.device,
        value_range=ValueRange.from_json(v.meta.get("value_range"), v.meta["input_shape"]),
        features=schema_of(v.meta),
    )
    return build_defence(spec, base, _owner(v))


def _run_defence(v: VictimContext, spec: CellSpec) -> dict[str, Any]:
    if v.model is None:
        raise InputError(
            "honest users' cost compares answers with the undefended model's: not for a remote API"
        )
    test = v.splits.test
    if test.y is None:
        raise DataError(f"{test.name}: measuring honest users' cost needs test labels")
    api = defended_api(v, spec.api_spec)
    mode = APIDescription.of(api).mode.value
    with seeded(spec.seed):
        defended = answer_probs(api.query(test.x), mode)
    undefended = predict_probs(v.model, test.x, device=v.device).to(torch.float64)
    metrics: dict[str, Any] = {
        "honest_accuracy": float((defended.argmax(1) == test.y).float().mean()),
        "undefended_accuracy": float((undefended.argmax(1) == test.y).float().mean()),
        **answer_shift(defended, undefended),
        "ece": expected_calibration_error(defended, test.y),
        "undefended_ece": expected_calibration_error(undefended, test.y),
        "answer_mode": mode,
    }
    if spec.detect:  # PRADA on a benign stream: the test images in a random order, one client
        monitor = Prada()
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(spec.seed))
        monitor.client("benign", defended_api(v, spec.api_spec)).query(test.x[order])
        report = monitor.report("benign")
        metrics.update(
            {
                "prada_benign_flagged": report.flagged,
                "prada_benign_first_alarm": report.first_alarm,
                "prada_benign_w": [list(p) for p in report.w_history],
            }
        )
    return metrics


# --------------------------------------------------------------------------- thieves


def _pool(v: VictimContext, spec: CellSpec) -> Dataset | None:
    if spec.data == "none":
        return None
    if spec.data == "in-domain":
        return v.splits.pool
    from mextract.data import check_disjoint
    from mextract.data.transfer import check_pool, load_pool

    assert spec.pool is not None
    check_pool(spec.pool, v.meta["input_shape"], v.meta.get("data_root"))
    pool = load_pool(spec.pool, v.meta["input_shape"], seed=spec.seed, root=v.meta.get("data_root"))
    check_disjoint(pool, {"the victim's training data": v.splits.victim_train, "the test set": v.splits.test})
    return pool


def _run_thief(
    v: VictimContext, spec: CellSpec, device: str | None, callback: Callback | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from dataclasses import fields, is_dataclass

    from mextract.attacks import ATTACKS

    assert spec.attack is not None
    name, options = parse_attack_spec(spec.attack)
    pool = _pool(v, spec)
    cls = ATTACKS.get(name)
    if (
        spec.data == "out-of-domain"
        and pool is not None
        and pool.y is not None
        and is_dataclass(cls)
        and any(f.name == "pool_labels" for f in fields(cls))
        and "pool_labels" not in options
    ):
        options["pool_labels"] = pool.y  # the pool's own labels (adaptive Knockoff's taxonomy)
    api = defended_api(v, spec.api_spec, client_id=f"mextract-audit-{spec.key(v.digest)[:12]}")
    try:
        return _steal(v, spec, api, name, options, pool, device, callback)
    finally:
        _close(api)  # a remote API's client lives for one cell, whatever happens in it


def _steal(
    v: VictimContext,
    spec: CellSpec,
    api: Oracle,
    name: str,
    options: dict[str, Any],
    pool: Dataset | None,
    device: str | None,
    callback: Callback | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The thief's run against ``api``, then PRADA's report and every measure."""
    monitor = Prada() if spec.detect else None
    attacked = api if monitor is None else monitor.client("attacker", api)
    evaluator = _evaluator(v)
    try:
        attack = create_attack(name, **options)
        result = attack(
            attacked,
            None if pool is None else pool.unlabeled(),
            spec.budget,
            substitute=spec.substitute or v.meta["architecture"],
            evaluator=evaluator,
            seed=spec.seed,
            device=device,
            callback=callback,
        )
    except InputError as exc:  # e.g. a soft-label attack against a label-only API
        logger.info("%s: not applicable (%s)", spec.label(), exc)
        return {"status": f"n/a: {exc}"}, []
    if result.queries != api.ledger.count:
        raise MextractError(f"internal error: {result.queries} reported, {api.ledger.count} answered")
    metrics: dict[str, Any] = {
        "status": "ok",
        "queries": result.queries,
        "budget": spec.budget,
        "wall_time_s": result.wall_time_s,
        **result.metrics,
    }
    if monitor is not None:
        report = monitor.report("attacker")
        metrics.update(
            {
                "prada_flagged": report.flagged,
                "prada_first_alarm": report.first_alarm,
                "prada_w": [list(p) for p in report.w_history],
                "prada_threshold": monitor.delta,
            }
        )
    ctx = CellContext(spec, v, api, result.model.eval(), monitor)
    for m in spec.measures:
        with seeded(spec.seed):
            found = MEASURES[m].measure(ctx)
        if found is not None:
            metrics.update(found)
    return metrics, [asdict(h) for h in result.history]


def _close(api: Oracle) -> None:
    """Close a remote API's connections."""
    for layer in oracle_layers(api):
        close = getattr(layer, "close", None)
        if callable(close):
            close()


_EVALUATORS: dict[str, Evaluator] = {}


def _evaluator(v: VictimContext) -> Evaluator:
    """The victim's test labels, asked once per process (the owner's side, never a thief's budget)."""
    if v.digest not in _EVALUATORS:
        test = v.splits.test
        if v.model is not None:
            _EVALUATORS[v.digest] = Evaluator.from_victim(v.model, test, device=v.device)
        else:
            assert callable(v.judge)
            _EVALUATORS[v.digest] = Evaluator(test, v.judge(test.x))
    return _EVALUATORS[v.digest]


# --------------------------------------------------------------------------- the one entry point


def run_cell(
    spec: CellSpec,
    out: str | Path,
    *,
    victim_digest: str = "",
    device: str | None = None,
    callback: Callback | None = None,
) -> Record:
    """Run one cell and write its record (atomically) to ``out/records/``; return it.

    ``victim_digest`` is the digest of the victim's weights (from its cell's record); a
    victim cell computes it. Raises :class:`~mextract.errors.MextractError` for a cell that
    cannot be run; a thief that cannot run against its API (a soft-label attack against
    label answers) is a finished cell with ``status: "n/a: <why>"``.
    """
    out = Path(out)
    if spec.kind == "victim":
        record = _run_victim(out, spec, device, callback)
        record.save(out / RECORDS / f"victim-{record.key}.json")
        return record
    digest = digest_of(out, spec.victim)
    if victim_digest and digest != victim_digest:
        where = spec.victim.url or victim_folder(out, spec.victim)
        raise DataError(
            f"{where}: the victim changed since its cell ran (digest {digest}, expected {victim_digest})"
        )
    v = victim_context(out, spec.victim, digest, device)
    history: list[dict[str, Any]] = []
    if spec.kind == "defence":
        metrics = _run_defence(v, spec)
        name = spec.protection
    else:
        metrics, history = _run_thief(v, spec, device, callback)
        name = parse_attack_spec(spec.attack or "")[0]
    config = {
        "cell": spec.model_dump(),
        "victim_digest": digest,
        "dataset": v.meta.get("dataset"),
        "variant": spec.victim.variant,
        "protection": spec.protection,
        "defence": spec.defence,
        "detect": spec.detect,
    }
    if spec.kind == "cell":
        config.update(
            {
                "attack": spec.attack,
                "thief": spec.thief or spec.attack,
                "data": spec.data,
                "pool": spec.pool,
                "answers": spec.answers,
                "budget": spec.budget,
                "substitute": spec.substitute or v.meta["architecture"],
            }
        )
    record = Record(
        kind=spec.kind,
        name=name,
        seed=spec.seed,
        config=config,
        metrics=metrics,
        history=history,
        key=spec.key(digest),
    )
    record.save(record_path(out, spec, digest))
    return record
