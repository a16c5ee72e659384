"""Runs: train a victim, attack a saved victim, the demo. Each writes records and resumes.

These functions are what the command line calls; they own file layout and records,
while the library pieces they compose (data, models, oracle, attacks, metrics) know
nothing of files. Data flows one way: data → victim → oracle → attack → substitute →
metrics → record.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from mextract._utils import resolve_device, seeded
from mextract.attacks import ATTACKS, AttackResult, create_attack
from mextract.attacks.base import Callback
from mextract.data import Dataset, ValueRange, check_disjoint, dataset_info, load_file, load_splits
from mextract.defences.adversarial import PGDConfig, adversarial_training
from mextract.errors import DataError, MextractError, UnknownNameError
from mextract.experiments.records import Record, same_config
from mextract.metrics import Evaluator, accuracy
from mextract.models import (
    check_model_name,
    create_model,
    default_model_for,
    load_checkpoint,
    save_checkpoint,
)
from mextract.oracle import AnswerMode, VictimOracle
from mextract.training import train_victim, victim_recipe

logger = logging.getLogger(__name__)

VICTIM_DIR, VICTIM_RECORD = "victim", "victim.json"


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
    acc = accuracy(net, splits.test)
    metrics = {"test_accuracy": acc}
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
    victim: str | Path,
    *,
    attack: str,
    budget: int,
    mode: str = "probs",
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
) -> Record:
    """Attack the victim checkpoint in ``victim`` (a folder written by :func:`train_victim_run`).

    The pool and test set come from the victim's dataset and split seed, so the pool is
    disjoint from the victim's training data, unless ``pool_data``/``test_data`` replace
    them (checked against the value range declared in the checkpoint; ``scale`` divides
    their values first). A victim trained on files only needs both. ``pool_dataset``
    names an out-of-domain pool (a dataset name or ``natural_patches``) conformed to the
    victim's input; its own labels go to attacks with a ``pool_labels`` field (adaptive
    Knockoff). With ``out``, the record is
    ``out/attack-<name>-<mode>-<budget>-s<seed>.json`` and the substitute is saved beside it.
    """
    net, meta = load_checkpoint(victim)
    answer_mode = AnswerMode.parse(mode)
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if precision not in dtypes:
        raise UnknownNameError("precision", precision, list(dtypes))
    resolve_device(device)
    config: dict[str, Any] = {
        "victim": str(Path(victim).resolve()),
        "victim_architecture": meta["architecture"],
        "dataset": meta.get("dataset"),
        "attack": attack,
        "options": attack_options or {},
        "budget": budget,
        "mode": answer_mode.value,
        "k": k,
        "decimals": decimals,
        "precision": precision,
        "substitute": substitute or default_model_for(meta["input_shape"]),
        "pool_data": None if pool_data is None else str(pool_data),
        "pool_dataset": pool_dataset,
        "test_data": None if test_data is None else str(test_data),
    }
    if scale is not None:  # absent otherwise, so that earlier records still match
        config["scale"] = scale
    stem = f"attack-{attack}-{answer_mode.value}-{budget}-s{seed}"
    record_path = None if out is None else Path(out) / f"{stem}.json"
    if resume and record_path is not None and record_path.is_file():
        old = Record.load(record_path)
        if same_config(old.config, config) and old.seed == seed:
            logger.info("reusing %s (same configuration)", record_path)
            return old
    options = dict(attack_options or {})
    create_attack(attack, **dict(options))  # a bad name or option fails before any data is read
    pool = None
    if pool_dataset is not None:
        from mextract.data.transfer import check_pool, load_pool

        check_pool(pool_dataset, meta["input_shape"], data_root)
        pool = load_pool(pool_dataset, meta["input_shape"], seed=seed, root=data_root)
        cls = ATTACKS.get(attack)
        takes_labels = is_dataclass(cls) and any(f.name == "pool_labels" for f in fields(cls))
        if takes_labels and "pool_labels" not in options and pool.y is not None:
            options["pool_labels"] = pool.y
    atk = create_attack(attack, **options)
    split_seed = int(meta.get("split", {}).get("seed", meta.get("seed", 0)))
    dataset = meta.get("dataset")
    like = _template(meta)
    victim_file = meta.get("split", {}).get("files", {}).get("victim_data")
    known: dict[str, Dataset] = {}  # what the lab knows of the owner's data, to keep the pool clean
    if dataset is None:
        if (pool_data is None and pool is None) or test_data is None:
            raise DataError("this victim was trained on files: give its attacker pool and test_data")
        test = load_file(test_data, like=like, require_labels=True, name="test", scale=scale)
        if pool is None:
            assert pool_data is not None
            pool = load_file(pool_data, like=like, require_labels=False, name="pool", scale=scale)
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
                          mode=answer_mode, k=k, decimals=decimals, dtype=dtypes[precision],
                          device=device, value_range=like.declared_range)  # fmt: skip
    evaluator = Evaluator.from_victim(net, test, device=device)
    result = atk(oracle, pool.unlabeled(), budget, substitute=config["substitute"],
                 evaluator=evaluator, seed=seed, device=device, callback=callback)  # fmt: skip
    if result.queries != oracle.ledger.count:  # the attack must report the ledger's count
        raise MextractError(f"internal error: {result.queries} reported, {oracle.ledger.count} answered")
    record = attack_record(result, config, seed, evaluator)
    if out is not None and record_path is not None:
        arch, options = atk.model_spec(result.model) or (config["substitute"], {})
        save_checkpoint(
            Path(out) / f"substitute-{stem[len('attack-') :]}",
            result.model,
            {
                "architecture": arch,
                "options": options,
                "input_shape": meta["input_shape"],
                "num_classes": meta["num_classes"],
                "attack": attack,
                "seed": seed,
                "metrics": record.metrics,
            },
        )
        record.save(record_path)
    return record


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


#: The demo's rows: (attack, answer mode, budget) — both baselines at a small and the
#: whole-pool budget of the bundled MNIST split.
DEMO_RUNS: tuple[tuple[str, str, int], ...] = (
    ("kd", "probs", 250),
    ("kd", "probs", 2000),
    ("hard", "label", 250),
    ("hard", "label", 2000),
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
