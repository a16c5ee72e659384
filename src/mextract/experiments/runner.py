"""Runs: train a victim, attack a saved victim, the demo. Each writes records and resumes.

These functions are what the command line calls; they own file layout and records,
while the library pieces they compose (data, models, oracle, attacks, metrics) know
nothing of files. Data flows one way: data → victim → oracle → attack → substitute →
metrics → record.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mextract._utils import resolve_device, seeded
from mextract.attacks import ATTACKS, AttackResult, create_attack
from mextract.attacks.base import Attack, Callback
from mextract.attacks.tabular import SklearnSubstitute
from mextract.attacks.tree import ExtractedTreeModel
from mextract.data import Dataset, ValueRange, check_disjoint, dataset_info, load_file, load_splits
from mextract.data.tabular import TabularSchema
from mextract.defences.adversarial import PGDConfig, adversarial_training
from mextract.errors import DataError, InputError, MextractError, UnknownNameError
from mextract.experiments.records import Record, same_config
from mextract.metrics import Evaluator, accuracy
from mextract.models import (
    ExternalModel,
    check_model_name,
    create_model,
    default_model_for,
    is_model_file,
    load_checkpoint,
    load_external,
    save_checkpoint,
    schema_of,
    split_seed_of,
)
from mextract.oracle import AnswerMode, APIDescription, Oracle, VictimOracle
from mextract.training import train_victim, victim_recipe

if TYPE_CHECKING:
    from mextract.defences.pow import PowGate
    from mextract.server import ServedAPI

logger = logging.getLogger(__name__)

VICTIM_DIR, VICTIM_RECORD = "victim", "victim.json"
#: the client id an attack on a url states unless told otherwise (its evaluator: "<id>-evaluator")
DEFAULT_ATTACKER = "mextract-attacker"


def train_victim_run(
    out: str | Path,
    *,
    dataset: str | None = "mnist",
    model: str | None = None,
    preset: str = "fast",
    seed: int = 0,
    data_root: str | Path | None = None,
    victim_data: str | Path | None = None,
    pool_data: str | Path | None = None,
    test_data: str | Path | None = None,
    device: str | None = None,
    callback: Callback | None = None,
    resume: bool = True,
    trigger_target: int | None = None,
    adversarial: PGDConfig | None = None,
    scale: float | None = None,
) -> Record:
    """Stage 0: train a victim, save ``out/victim/`` (checkpoint) and ``out/victim.json``.

    ``scale`` divides the values of the user's files (``victim_data``, ``pool_data``,
    ``test_data``), e.g. 255 for float pixel values; see :func:`~mextract.data.load_splits`.

    ``adversarial`` trains it with PGD adversarial training instead (Madry et al. 2018;
    :func:`~mextract.defences.adversarial.adversarial_training`), a defence whose price is
    the clean test accuracy in the record.

    ``trigger_target`` embeds the sources' trigger-set watermark: a 3×3 white patch at the
    bottom-right corner mapped to that class (:class:`~mextract.defences.TriggerWatermark`);
    the record then holds the victim's own watermark success rate (``trigger_wsr``).
    """
    out = Path(out)
    recipe = victim_recipe(preset)
    if model is not None:
        check_model_name(model)
    if dataset is not None:
        dataset_info(dataset, data_root)
    resolve_device(device)
    splits = load_splits(dataset, seed=seed, root=data_root, victim_data=victim_data,
                         pool_data=pool_data, test_data=test_data, scale=scale)  # fmt: skip
    arch = model or default_model_for(splits.test.input_shape)
    config: dict[str, Any] = {
        "dataset": dataset,
        "split": splits.describe(),
        "architecture": arch,
        "preset": preset,
        "recipe": asdict(recipe),
        "data_root": None if data_root is None else str(data_root),
        "trigger_target": trigger_target,
    }
    if scale is not None:  # absent otherwise, so that earlier records still match
        config["scale"] = scale
    if adversarial is not None:  # absent otherwise, so that earlier records still match
        config["adversarial"] = asdict(adversarial)
    record_path = out / VICTIM_RECORD
    if resume and record_path.is_file() and (out / VICTIM_DIR / "model.json").is_file():
        old = Record.load(record_path)
        if same_config(old.config, config) and old.seed == seed:
            logger.info("reusing the victim in %s (same configuration)", out)
            if callback is not None:
                callback({"stage": "victim", "done": 1, "total": 1, "resumed": True})
            return old
    with seeded(seed):
        net = create_model(arch, splits.test.input_shape, splits.test.num_classes)
    epochs = recipe.train.epochs

    def on_epoch(epoch: int, m: Any) -> None:
        if callback is not None:
            callback({"stage": "victim", "done": epoch, "total": epochs})

    train_data = splits.victim_train
    started = time.perf_counter()
    trigger = None
    if trigger_target is not None:
        from mextract.defences.ownership import TriggerWatermark, watermark_training_set

        trigger = TriggerWatermark(target=trigger_target)
        train_data = watermark_training_set(train_data, trigger, seed=seed)
    if adversarial is None:
        train_victim(net, train_data, recipe, seed=seed, device=device, on_epoch=on_epoch)
    else:
        adversarial_training(net, train_data, recipe, attack=adversarial, seed=seed, device=device,
                             on_epoch=on_epoch)  # fmt: skip
    wall = time.perf_counter() - started
    acc = accuracy(net, splits.test)
    metrics = {"test_accuracy": acc, "wall_time_s": wall}
    if trigger is not None and splits.test.y is not None:
        metrics["trigger_wsr"] = trigger.wsr(net, splits.test.x, splits.test.y)
    meta = {
        "architecture": arch,
        "input_shape": list(splits.test.input_shape),
        "value_range": splits.victim_train.declared_range.to_json(),
        "num_classes": splits.test.num_classes,
        "classes": list(splits.test.classes),
        "dataset": dataset,
        "split": splits.meta,
        "seed": seed,
        "data_root": config["data_root"],
        "test_accuracy": acc,
    }
    save_checkpoint(out / VICTIM_DIR, net, meta)
    record = Record(kind="victim", name=arch, seed=seed, config=config, metrics=metrics)
    record.save(record_path)
    return record


def attack_run(
    victim: str | Path | None = None,
    *,
    attack: str,
    budget: int,
    url: str | None = None,
    client_id: str | None = None,
    api_key: str | None = None,
    evaluator_key: str | None = None,
    dataset: str | None = None,
    split_seed: int = 0,
    mode: str | None = None,
    k: int | None = None,
    decimals: int | None = None,
    precision: str = "float32",
    substitute: str | None = None,
    seed: int = 0,
    pool_data: str | Path | None = None,
    pool_dataset: str | None = None,
    test_data: str | Path | None = None,
    data_root: str | Path | None = None,
    scale: float | None = None,
    attack_options: dict[str, Any] | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    callback: Callback | None = None,
    resume: bool = True,
    input_shape: Sequence[int] | str | None = None,
    num_classes: int | None = None,
    value_range: ValueRange | str | None = None,
    trusted: Sequence[str] | None = None,
    missing: str | None = None,
) -> Record:
    """Attack the victim checkpoint in ``victim`` (a folder written by :func:`train_victim_run`),
    a model file (``.onnx``, ``.skops``, XGBoost ``.json``/``.ubj``, LightGBM ``.txt``: see
    :func:`~mextract.models.load_external`), or the prediction API at ``url`` (any Open
    Inference Protocol model endpoint).

    For a checkpoint, the pool and test set come from the victim's dataset and split seed,
    so the pool is disjoint from the victim's training data, unless ``pool_data``/``test_data``
    replace them (checked against the value range declared in the checkpoint; ``scale``
    divides their values first). A victim trained on files only needs both. ``pool_dataset``
    names an out-of-domain pool (a dataset name, ``natural_patches`` or ``font_glyphs``)
    conformed to the victim's input; its own labels go to attacks with a ``pool_labels`` field (adaptive
    Knockoff). Any pool the user names is refused if it shares samples with the victim's
    training data or the test set.

    For a ``url``, the attacker has only what a remote client has: the API's description
    and answers (``mode``/``k``/``decimals`` state what the answers are when the endpoint
    does not declare it); ``api_key`` is the thief's account on a server with accounts,
    ``evaluator_key`` a second account that asks the test labels. Its data: ``dataset``
    (the lab's seeded split of that dataset, ``split_seed``: its pool and test parts), or
    ``pool_data``/``pool_dataset`` and ``test_data``. Fidelity is agreement with the API's
    top-1 answers on the test set, asked by a second client (``<client_id>-evaluator``, or
    the evaluator's account) so that the attacker's ledger holds the attack's queries only.

    A model file is read with ``input_shape``, ``num_classes``, ``value_range`` and
    ``trusted`` where the file does not say (see :func:`~mextract.models.load_external`); its
    data is given as for a ``url`` (``dataset`` and ``split_seed``, or files), and the
    record names the file and its SHA-256. ``missing="stop"`` serves a decision tree file
    (``.skops``) with incomplete queries (BigML's behaviour: a missing feature stops the path
    at the node that tests it; see :class:`~mextract.oracle.VictimOracle`).

    With ``out``, the record is ``out/attack-<name>-<mode>-<budget>-s<seed>.json`` and the
    substitute is saved beside it.
    """
    if (victim is None) == (url is None):
        raise InputError("give a victim checkpoint or model file, or a prediction API's url, exactly one")
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if precision not in dtypes:
        raise UnknownNameError("precision", precision, list(dtypes))
    resolve_device(device)
    options = dict(attack_options or {})
    create_attack(attack, **dict(options))  # a bad name or option fails before any data is read
    external: dict[str, Any] = {"input_shape": input_shape, "num_classes": num_classes,
                                "value_range": value_range, "trusted": trusted}  # fmt: skip
    if missing is not None and (victim is None or not is_model_file(victim)):
        raise InputError("missing: incomplete queries are for a decision tree model file (.skops)")
    if victim is not None and is_model_file(victim):
        target = _file_target(Path(victim), external, mode or "probs", k, decimals, dtypes[precision],
                              dataset, split_seed, pool_data, pool_dataset, test_data, data_root, scale,
                              seed, device, missing)  # fmt: skip
    elif url is not None:
        target = _remote_target(url, client_id, (api_key, evaluator_key), mode, k, decimals, dataset,
                                split_seed, pool_data, pool_dataset, test_data, data_root, scale,
                                seed)  # fmt: skip
    else:
        assert victim is not None
        if any(v is not None for v in external.values()):
            raise InputError("input_shape, num_classes, value_range and trusted are for model files")
        target = _local_target(victim, mode or "probs", k, decimals, dtypes[precision], pool_data,
                               pool_dataset, test_data, data_root, scale, seed, device)  # fmt: skip
    oracle, desc = target.oracle, target.description
    config: dict[str, Any] = {
        **target.config,
        "attack": attack,
        "options": attack_options or {},
        "budget": budget,
        "mode": desc.mode.value,
        "k": desc.k,
        "decimals": desc.decimals,
        "precision": str(desc.dtype).removeprefix("torch."),
        "substitute": substitute or default_model_for(desc.input_shape),
        "pool_data": None if pool_data is None else str(pool_data),
        "pool_dataset": pool_dataset,
        "test_data": None if test_data is None else str(test_data),
    }
    if scale is not None:  # absent otherwise, so that earlier records still match
        config["scale"] = scale
    stem = f"attack-{attack}-{desc.mode.value}-{budget}-s{seed}"
    record_path = None if out is None else Path(out) / f"{stem}.json"
    if resume and record_path is not None and record_path.is_file():
        old = Record.load(record_path)
        if same_config(old.config, config) and old.seed == seed:
            logger.info("reusing %s (same configuration)", record_path)
            return old
    pool = target.pool
    cls = ATTACKS.get(attack)
    takes_labels = is_dataclass(cls) and any(f.name == "pool_labels" for f in fields(cls))
    if pool_dataset is not None and takes_labels and "pool_labels" not in options and pool.y is not None:
        options["pool_labels"] = pool.y
    atk = create_attack(attack, **options)
    evaluator = target.evaluator()
    result = atk(oracle, pool.unlabeled(), budget, substitute=config["substitute"],
                 evaluator=evaluator, seed=seed, device=device, callback=callback)  # fmt: skip
    if result.queries != oracle.ledger.count:  # the attack must report the ledger's count
        raise MextractError(f"internal error: {result.queries} reported, {oracle.ledger.count} answered")
    record = attack_record(result, config, seed, evaluator)
    if out is not None and record_path is not None:
        _save_model(result.model, Path(out), stem[len("attack-") :], atk, config, desc, attack, seed, record)
        record.save(record_path)
    return record


def _save_model(
    model: nn.Module,
    out: Path,
    name: str,
    atk: Attack,
    config: dict[str, Any],
    desc: APIDescription,
    attack: str,
    seed: int,
    record: Record,
) -> None:
    """The attack's model beside its record: a scikit-learn substitute with skops
    (``substitute-<name>.skops``), an extracted tree as JSON (``tree-<name>.json``), any other
    module as a checkpoint (``substitute-<name>/``)."""
    if isinstance(model, SklearnSubstitute):
        model.save(out / f"substitute-{name}.skops")
    elif isinstance(model, ExtractedTreeModel):
        out.mkdir(parents=True, exist_ok=True)
        (out / f"tree-{name}.json").write_text(json.dumps(model.tree.to_json(), indent=1))
    else:
        arch, arch_options = atk.model_spec(model) or (config["substitute"], {})
        meta = {
            "architecture": arch,
            "options": arch_options,
            "input_shape": list(desc.input_shape),
            "num_classes": desc.num_classes,
            "attack": attack,
            "seed": seed,
            "metrics": record.metrics,
        }
        save_checkpoint(out / f"substitute-{name}", model, meta)  # fmt: skip


@dataclass
class _Target:
    """What an attack run aims at: the oracle, the attacker's pool, and how to score."""

    oracle: Oracle
    pool: Dataset
    evaluator: Callable[[], Evaluator]
    config: dict[str, Any]

    @property
    def description(self) -> APIDescription:
        return APIDescription.of(self.oracle)


def _named_pool(pool_dataset: str, input_shape: Sequence[int], seed: int, root: str | Path | None) -> Dataset:
    from mextract.data.transfer import check_pool, load_pool

    check_pool(pool_dataset, input_shape, root)
    return load_pool(pool_dataset, input_shape, seed=seed, root=root)


def _pool_and_test_files(
    pool: Dataset | None,
    pool_data: str | Path | None,
    test_data: str | Path,
    like: Dataset,
    scale: float | None,
) -> tuple[Dataset, Dataset]:
    """The user's test file, and their pool file unless a named pool was given."""
    test = load_file(test_data, like=like, require_labels=True, name="test", scale=scale)
    if pool is None:
        assert pool_data is not None
        pool = load_file(pool_data, like=like, require_labels=False, name="pool", scale=scale)
    return pool, test


def _attacker_data(
    like: Dataset,
    what: str,
    dataset: str | None,
    split_seed: int,
    pool_data: str | Path | None,
    pool_dataset: str | None,
    test_data: str | Path | None,
    data_root: str | Path | None,
    scale: float | None,
    seed: int,
) -> tuple[Dataset, Dataset, TabularSchema | None]:
    """The attacker's pool and test set for a victim the lab knows only by its inputs and
    classes (``like``: an empty dataset of its shape, classes and value range): the lab's
    split of ``dataset`` (its pool and test parts), or the user's files, or a named pool;
    a pool that shares samples with the test set is refused. ``what`` names the victim in
    messages ("the API", a file name). Third: the record fields of the lab's tabular split,
    which an API serving that data publishes."""
    shape = like.input_shape
    features = None
    pool = None if pool_dataset is None else _named_pool(pool_dataset, shape, seed, data_root)
    if dataset is not None:
        splits = load_splits(dataset, seed=split_seed, root=data_root, pool_data=pool_data,
                             test_data=test_data, scale=scale)  # fmt: skip
        if splits.test.input_shape != shape:
            raise DataError(f"{dataset}: inputs of shape {splits.test.input_shape}, {what} takes {shape}")
        test, pool = splits.test, splits.pool if pool is None else pool
        features = splits.schema
    else:
        if (pool_data is None and pool is None) or test_data is None:
            target = "a url" if what == "the API" else what
            raise DataError(f"to attack {target}, give --dataset, or an attacker pool and test_data")
        pool, test = _pool_and_test_files(pool, pool_data, test_data, like, scale)
    if test.num_classes != like.num_classes:
        answers = "the API answers" if what == "the API" else f"{what} answers"
        raise DataError(f"the test set has {test.num_classes} classes, {answers} {like.num_classes}")
    check_disjoint(pool, {"the test set": test})
    return pool, test, features


def _within(inner: ValueRange, outer: ValueRange) -> bool:
    low_ok = outer.low is None or (inner.low is not None and inner.low >= outer.low - 1e-6)
    high_ok = outer.high is None or (inner.high is not None and inner.high <= outer.high + 1e-6)
    return low_ok and high_ok


def _file_target(
    path: Path,
    external: dict[str, Any],
    mode: str,
    k: int | None,
    decimals: int | None,
    dtype: torch.dtype,
    dataset: str | None,
    split_seed: int,
    pool_data: str | Path | None,
    pool_dataset: str | None,
    test_data: str | Path | None,
    data_root: str | Path | None,
    scale: float | None,
    seed: int,
    device: str | None,
    missing: str | None = None,
) -> _Target:
    model = load_external(path, **external)
    like = _external_template(model)
    pool, test, features = _attacker_data(like, path.name, dataset, split_seed, pool_data, pool_dataset,
                                          test_data, data_root, scale, seed)  # fmt: skip
    data_range = test.declared_range
    if not _within(data_range, model.value_range):
        raise DataError(f"the test set's values are declared in {data_range}, outside the range "
                        f"{model.value_range} that {path.name} takes (give its range)")  # fmt: skip
    oracle = VictimOracle(model, mode=AnswerMode.parse(mode), k=k, decimals=decimals, dtype=dtype,
                          value_range=model.value_range, features=features, missing=missing)  # fmt: skip
    config = {**model.to_json(), "dataset": dataset}
    if missing is not None:
        config["missing"] = missing
    if dataset is not None:
        config["split_seed"] = split_seed

    def evaluator() -> Evaluator:
        return Evaluator.from_victim(model, test, value_range=model.value_range)

    return _Target(oracle, pool, evaluator, config)


def _external_template(model: ExternalModel) -> Dataset:
    """An empty dataset shaped like a model file's inputs (its classes, declared range)."""
    return Dataset(torch.empty(0, *model.input_shape), None, model.classes, "template", model.value_range)


def _local_target(
    victim: str | Path,
    mode: str,
    k: int | None,
    decimals: int | None,
    dtype: torch.dtype,
    pool_data: str | Path | None,
    pool_dataset: str | None,
    test_data: str | Path | None,
    data_root: str | Path | None,
    scale: float | None,
    seed: int,
    device: str | None,
) -> _Target:
    net, meta = load_checkpoint(victim)
    answer_mode = AnswerMode.parse(mode)
    pool = None if pool_dataset is None else _named_pool(pool_dataset, meta["input_shape"], seed, data_root)
    split_seed = split_seed_of(meta)
    dataset = meta.get("dataset")
    like = _template(meta)
    victim_file = meta.get("split", {}).get("files", {}).get("victim_data")
    known: dict[str, Dataset] = {}  # what the lab knows of the owner's data, to keep the pool clean
    if dataset is None:
        if (pool_data is None and pool is None) or test_data is None:
            raise DataError("this victim was trained on files: give its attacker pool and test_data")
        pool, test = _pool_and_test_files(pool, pool_data, test_data, like, scale)
    else:
        splits = load_splits(dataset, seed=split_seed, root=data_root or meta.get("data_root"),
                             pool_data=pool_data, test_data=test_data, scale=scale)  # fmt: skip
        test = splits.test
        pool = splits.pool if pool is None else pool
        if victim_file is None:
            known["the victim's training data"] = splits.victim_train
    if victim_file is not None and Path(victim_file).exists():  # the owner's own file
        known["the victim's training data"] = load_file(
            victim_file, like=like, require_labels=False, name="victim_train", meta=meta.get("split")
        )
    known["the test set"] = test
    if pool_data is not None or pool_dataset is not None:  # the lab's own split is disjoint by construction
        check_disjoint(pool, known)
    oracle = VictimOracle(net, input_shape=meta["input_shape"], num_classes=meta["num_classes"],
                          mode=answer_mode, k=k, decimals=decimals, dtype=dtype,
                          device=device, value_range=like.declared_range,
                          features=schema_of(meta))  # fmt: skip
    config = {
        "victim": str(Path(victim).resolve()),
        "victim_architecture": meta["architecture"],
        "dataset": meta.get("dataset"),
    }
    return _Target(oracle, pool, lambda: Evaluator.from_victim(net, test, device=device), config)


def _remote_target(
    url: str,
    client_id: str | None,
    keys: tuple[str | None, str | None],
    mode: str | None,
    k: int | None,
    decimals: int | None,
    dataset: str | None,
    split_seed: int,
    pool_data: str | Path | None,
    pool_dataset: str | None,
    test_data: str | Path | None,
    data_root: str | Path | None,
    scale: float | None,
    seed: int,
) -> _Target:
    from mextract.oracle import RemoteOracle

    cid = client_id or DEFAULT_ATTACKER
    stated: dict[str, Any] = {"mode": mode, "k": k, "decimals": decimals}
    api_key, evaluator_key = keys
    if api_key is not None and evaluator_key is None:
        raise InputError("with an API key, give an evaluator key too (a second account for scoring)")
    oracle = RemoteOracle(url, client_id=cid, api_key=api_key, **stated)
    shape = oracle.input_shape
    like = Dataset(torch.empty(0, *shape), None, tuple(str(i) for i in range(oracle.num_classes)), "template",
                   oracle.value_range)  # fmt: skip
    pool, test, _ = _attacker_data(like, "the API", dataset, split_seed, pool_data, pool_dataset, test_data,
                                   data_root, scale, seed)  # the API publishes its own fields  # fmt: skip

    def evaluator() -> Evaluator:
        with RemoteOracle(url, client_id=f"{cid}-evaluator", api_key=evaluator_key, **stated) as judge:
            labels = judge.query(test.x)[:, : judge.num_classes].argmax(1)  # (mode leaf: + the node id)
        return Evaluator(test, labels)

    return _Target(oracle, pool, evaluator, {"victim": url, "dataset": dataset, "client_id": cid})


def served_api(
    victim: str | Path,
    *,
    defence: str = "none",
    mode: str = "probs",
    k: int | None = None,
    decimals: int | None = None,
    precision: str = "float32",
    budget: int | None = None,
    detect: bool = False,
    on_alarm: str = "log",
    store: str | Path | None = None,
    snapshot_every: int = 100,
    pow: bool = False,
    name: str = "victim",
    seed: int = 0,
    data_root: str | Path | None = None,
    device: str | None = None,
    input_shape: Sequence[int] | str | None = None,
    num_classes: int | None = None,
    value_range: ValueRange | str | None = None,
    trusted: Sequence[str] | None = None,
    dataset: str | None = None,
    split_seed: int = 0,
    missing: str | None = None,
) -> ServedAPI:
    """The prediction API of the victim checkpoint in ``victim`` (or of a model file, read
    with ``input_shape``/``num_classes``/``value_range``/``trusted`` where it does not say:
    see :func:`~mextract.models.load_external`), ready for
    :func:`mextract.server.create_app`: its answer mode, ``defence`` stack and per-client
    ``budget``; with ``detect``, PRADA watches every client (``on_alarm``: what an alarm
    does). With ``store`` (an SQLite file), clients are its accounts, every answer is
    logged there and state survives restarts. The owner's side that some defences need
    (its training data, the victim's architecture) comes from the checkpoint: the lab's
    split of its dataset, or the owner's training file. A model file brings no owner's side:
    the defences that need one (mad, adaptive_misinformation, cosine) and ``pow`` are refused.
    A tabular model file publishes the record fields of ``dataset``'s split (``split_seed``),
    as a checkpoint publishes its own; ``missing="stop"`` serves a decision tree file with
    incomplete queries (BigML's behaviour)."""
    from mextract.defences.detection import Prada
    from mextract.defences.registry import Owner
    from mextract.server import ServedAPI

    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if precision not in dtypes:
        raise UnknownNameError("precision", precision, list(dtypes))
    owner: Owner | None = None
    external: dict[str, Any] = {"input_shape": input_shape, "num_classes": num_classes,
                                "value_range": value_range, "trusted": trusted}  # fmt: skip
    if is_model_file(victim):
        if pow:
            raise InputError("proof of work prices queries on the owner's training data: a model file "
                             "brings none (serve a checkpoint)")  # fmt: skip
        model = load_external(victim, **external)
        features = None if dataset is None else load_splits(dataset, seed=split_seed, root=data_root).schema
        oracle = VictimOracle(model, mode=AnswerMode.parse(mode), k=k, decimals=decimals,
                              dtype=dtypes[precision], value_range=model.value_range, features=features,
                              missing=missing)  # fmt: skip
    elif any(v is not None for v in external.values()) or dataset is not None or missing is not None:
        raise InputError("input_shape, num_classes, value_range, trusted, dataset and missing are for "
                         "model files")  # fmt: skip
    else:
        net, meta = load_checkpoint(victim)
        like = _template(meta)
        oracle = VictimOracle(net, input_shape=meta["input_shape"], num_classes=meta["num_classes"],
                              mode=AnswerMode.parse(mode), k=k, decimals=decimals, dtype=dtypes[precision],
                              device=device, value_range=like.declared_range,
                              features=schema_of(meta))  # fmt: skip
        if defence.strip() not in ("", "none") or pow:
            owner = Owner(victim=net, train=_owner_data(meta, like, data_root),
                          architecture=meta["architecture"], seed=seed, device=device)  # fmt: skip
    gate = None if owner is None or not pow else pow_gate(owner.train, oracle, seed=seed, device=device)
    from mextract.server.store import Store

    return ServedAPI(oracle, name=name, defence=defence, owner=owner, budget=budget,
                     detect=Prada() if detect else None, on_alarm=on_alarm, snapshot_every=snapshot_every,
                     store=None if store is None else Store(store), pow=gate)  # fmt: skip


def pow_gate(owner_train: Dataset, oracle: Oracle, *, seed: int = 0, device: str | None = None) -> PowGate:
    """Calibrated proof of work for an API, as Dziedzic et al. (ICLR 2022) set it up: PATE
    teachers on 80% of the owner's training data, the benign baseline from the other 20%
    (natural inputs the teachers never saw), and the price of a query's answer measured on
    this machine (seconds per answered query × SHA-256 evaluations per second), so that a
    benign client's puzzles cost about what its answers cost the server. The puzzles'
    HMAC key is new at every start: a restart voids puzzles issued before it."""
    import hashlib
    import secrets
    import time

    from mextract.defences.pow import Calibrator, PateCost, PowGate

    perm = torch.randperm(len(owner_train), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(owner_train))
    teachers, held_out = owner_train.subset(perm[:cut], "teachers"), owner_train.subset(perm[cut:], "benign")
    cost = PateCost.fit(teachers, seed=seed, device=device)
    probe = held_out.x[:64]
    oracle.query(probe)  # warm up
    start = time.perf_counter()
    oracle.query(probe)
    per_query = (time.perf_counter() - start) / len(probe)
    hashes, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:  # this machine's SHA-256 rate, as the client solves
        for i in range(1000):
            hashlib.sha256(b"mextract-rate:%d" % i).digest()
        hashes += 1000
    baseline = max(1.0, per_query * hashes / (time.perf_counter() - start))
    benign = cost.query_rdp(held_out.x)
    calibrator = Calibrator.fit(benign, baseline_work=baseline, orders=cost.orders, seed=seed)
    return PowGate(cost, calibrator, secrets.token_bytes(32))


def _owner_data(meta: dict[str, Any], like: Dataset, data_root: str | Path | None) -> Dataset:
    """The victim's training data, as its owner has it."""
    victim_file = meta.get("split", {}).get("files", {}).get("victim_data")
    if victim_file is not None:
        if not Path(victim_file).exists():
            raise DataError(f"the owner's training data {victim_file} (named in the checkpoint) is gone")
        split = meta.get("split")
        return load_file(victim_file, like=like, require_labels=True, name="victim_train", meta=split)
    if meta.get("dataset") is None:
        raise DataError("the checkpoint names neither a dataset nor the owner's training file")
    split_seed = split_seed_of(meta)
    root = data_root or meta.get("data_root")
    return load_splits(meta["dataset"], seed=split_seed, root=root).victim_train


def _template(meta: dict[str, Any]) -> Dataset:
    """An empty dataset shaped like the checkpoint's inputs (classes, declared value range),
    for reading a files-only victim's pool and test files."""
    shape = [int(s) for s in meta["input_shape"]]
    classes = tuple(meta.get("classes") or (str(i) for i in range(int(meta["num_classes"]))))
    return Dataset(torch.empty(0, *shape), None, classes, "template",
                   ValueRange.from_json(meta.get("value_range"), shape))  # fmt: skip


def attack_record(result: AttackResult, config: dict[str, Any], seed: int, evaluator: Evaluator) -> Record:
    summary = result.to_record()
    return Record(
        kind="attack",
        name=result.attack,
        seed=seed,
        config={**config, "attack_config": summary["config"]},
        metrics={
            "queries": result.queries,
            "budget": result.budget,
            "wall_time_s": result.wall_time_s,
            "victim_accuracy": evaluator.victim_accuracy,
            **result.metrics,
        },
        history=summary["history"],
    )


#: The demo's rows: (attack, answer mode, budget) — both baselines at a small budget and at
#: half of the bundled MNIST split's 2,000-image pool (measured on 2 cores: the whole pool
#: gained at most 0.2 points of fidelity and took the demo past two minutes).
DEMO_RUNS: tuple[tuple[str, str, int], ...] = (
    ("kd", "probs", 250),
    ("kd", "probs", 1000),
    ("hard", "label", 250),
    ("hard", "label", 1000),
)


def demo(
    out: str | Path = "runs/demo",
    *,
    seed: int = 0,
    device: str | None = None,
    callback: Callback | None = None,
    resume: bool = True,
) -> list[Record]:
    """Train a victim on bundled MNIST and steal it with both baselines; returns the records."""
    out = Path(out)
    records = [train_victim_run(out, dataset="mnist", seed=seed, device=device,
                                callback=callback, resume=resume)]  # fmt: skip
    for attack, mode, budget in DEMO_RUNS:
        if callback is not None:
            callback({"stage": "attack", "name": f"{attack} ({mode}, {budget})"})
        records.append(
            attack_run(
                out / VICTIM_DIR,
                attack=attack,
                budget=budget,
                mode=mode,
                seed=seed,
                out=out,
                device=device,
                callback=callback,
                resume=resume,
            )
        )
    return records
