"""Plans and cells: every experiment of the lab is a list of complete, hashable configurations.

A :class:`CellSpec` says everything one unit of work needs: the victim (as a
:class:`VictimSpec`), the protection in front of it, the thief, the budget, the seed and the
measures to take of the stolen copy. Its :meth:`~CellSpec.key` is a digest of that
configuration, of the victim's weights (so a retrained victim never reuses a stale record)
and of the mextract version. One function runs a cell (:func:`~mextract.experiments.cells.run_cell`)
and writes one record; a backend only decides where cells run
(:mod:`~mextract.experiments.backends`); reports are built from the records alone.

A :class:`Plan` is a named list of cells plus what it deliberately leaves out, stated so a
reader of its report knows. ``matrix``, the sources' stage 3 and the owner's audit are plans.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from mextract.errors import InputError

Kind = Literal["victim", "defence", "cell"]
DataKind = Literal["in-domain", "out-of-domain", "none"]
Answers = Literal["soft", "label"]


def digest(obj: Any, n: int = 16) -> str:
    """A short SHA-256 of ``obj``'s canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


class VictimSpec(BaseModel):
    """The victim a cell attacks: trained by the lab from a dataset and recipe, the user's
    checkpoint folder (``checkpoint``) used as it is, or a prediction API (``url``, with
    ``dataset`` naming the thieves' data and the test set).

    ``trigger_target`` embeds the sources' 3×3 trigger watermark; ``adversarial`` (the fields
    of :class:`~mextract.defences.adversarial.PGDConfig`) trains it with PGD adversarial
    training. Both are protections *in* the victim, so they make variants of it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str | None = "mnist"
    split_seed: int = 0
    architecture: str | None = None
    preset: str = "fast"
    trigger_target: int | None = None
    adversarial: dict[str, Any] | None = None
    checkpoint: str | None = None
    #: a prediction API (an Open Inference Protocol model endpoint) instead of a model:
    #: thieves reach it over HTTP, the lab's measurements through a second client
    url: str | None = None

    @property
    def variant(self) -> str:
        if self.url is not None:
            return "remote"
        if self.adversarial is not None:
            return "adversarial"
        return "trigger" if self.trigger_target is not None else "plain"

    def key(self) -> str:
        return digest(self.model_dump())


class CellSpec(BaseModel):
    """One unit of work.

    * ``kind="victim"``: train (or read) the victim, and prepare what the measures of later
      cells need of it (a reference model, fingerprints).
    * ``kind="defence"``: what the protection costs honest users (top-1 accuracy, how far
      the answers move, calibration; PRADA's false alarm on a benign stream with ``detect``).
    * ``kind="cell"``: one thief (``attack``, a spec of the attack registry) against the
      defended API, with ``budget`` queries and ``seed``; then ``measures`` of the stolen copy.

    ``answers="label"`` puts ``label_only`` on top of the defence: the thief sees top-1
    labels only. ``substitute`` is the thief's architecture (default: the victim's, the
    lab's usual assumption; the sources' CIFAR-10 thieves are ``vgg11``).
    ``data`` and ``pool`` say what data the thief has: the lab's in-domain pool
    (disjoint from the victim's data and the test set), an out-of-domain pool named by
    ``pool``, or none (data-free attacks).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    victim: VictimSpec = VictimSpec()
    protection: str = "none"
    defence: str = "none"
    detect: bool = False
    attack: str | None = None
    thief: str | None = None
    substitute: str | None = None
    data: DataKind = "in-domain"
    pool: str | None = None
    answers: Answers = "soft"
    budget: int = 0
    seed: int = 0
    measures: tuple[str, ...] = ()

    def model_post_init(self, _: Any) -> None:
        if self.kind == "cell":
            if self.attack is None:
                raise InputError("a thief's cell needs an attack spec")
            if self.budget < 1:
                raise InputError(f"budget: expected a positive number of queries, got {self.budget}")
            if self.substitute is not None:
                from mextract.models import check_model_name

                check_model_name(self.substitute)
            if (self.data == "out-of-domain") != (self.pool is not None):
                raise InputError("an out-of-domain thief names its pool, and only it does")

    @property
    def api_spec(self) -> str:
        """The defence stack the thief (or honest user) faces."""
        if self.answers == "soft":
            return self.defence
        return "label_only" if self.defence == "none" else f"{self.defence}+label_only"

    def key(self, victim_digest: str = "") -> str:
        from mextract import __version__

        return digest({"spec": self.model_dump(), "victim": victim_digest, "mextract": __version__})

    def label(self) -> str:
        if self.kind == "victim":
            return f"victim ({self.victim.variant})"
        if self.kind == "defence":
            return f"honest users vs {self.protection}"
        return f"{self.thief or self.attack} vs {self.protection} ({self.budget} queries, seed {self.seed})"


@dataclass
class Plan:
    """A named list of cells, and what the plan leaves out (stated in its report)."""

    name: str
    cells: list[CellSpec]
    left_out: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        unique = []
        for c in self.cells:
            k = digest(c.model_dump())
            if k not in seen:
                seen.add(k)
                unique.append(c)
        self.cells = unique

    @property
    def victims(self) -> list[VictimSpec]:
        return list({c.victim.key(): c.victim for c in self.cells}.values())

    def measures_for(self, victim: VictimSpec) -> tuple[str, ...]:
        """Every measure some cell takes against copies of ``victim`` (prepared once per victim)."""
        names = (m for c in self.cells if c.victim.key() == victim.key() for m in c.measures)
        return tuple(sorted(set(names)))

    def work(self) -> list[CellSpec]:
        """The victims first, then every other cell (defences, then thieves), as run."""
        # adversarial training takes several times longer: start it first, so it is not the tail
        ordered = sorted(self.victims, key=lambda v: v.adversarial is None)
        victims = [CellSpec(kind="victim", victim=v, measures=self.measures_for(v)) for v in ordered]
        rest = [c for c in self.cells if c.kind != "victim"]
        return victims + sorted(rest, key=lambda c: c.kind != "defence")


def log_budgets(low: int, high: int) -> list[int]:
    """Log-spaced budgets from ``low`` to ``high`` inclusive: ``low`` and ``high`` and every
    1·10ᵏ and 3·10ᵏ between them (100, 300, 1000, 3000, ...), two per factor of ten."""
    if not 1 <= low <= high:
        raise InputError(f"budgets: expected 1 <= low <= high, got {low} and {high}")
    out = {low, high}
    k = 1
    while k <= high:
        out.update(b for b in (k, 3 * k) if low < b < high)
        k *= 10
    return sorted(out)
