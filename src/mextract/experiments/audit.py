"""The owner's audit: how cheaply can my API be cloned, and what does a protection cost?

:func:`audit_plan` builds a plan a model owner can run without choosing anything:

* **Thieves** (:data:`THIEVES`): in-domain data, out-of-domain data (:func:`ood_pool`: photo
  patches, or rendered glyphs for single-channel images) and no data, each with
  soft answers (probabilities) and label-only answers, over log-spaced budgets and several
  seeds, against the undefended API. From these, the report reads how many queries a thief
  needs for 90/95/99% fidelity, with confidence intervals over seeds.
* **Protections** (:data:`PROTECTIONS`, one registry): the output defences of the defence
  registry at their defaults, the ownership marks that answer queries (DAWN, the cosine
  watermark), marks in the victim (the trigger watermark) and an adversarially trained victim.
  Each gets a cell measuring its honest-user cost and the in-domain thieves at the largest
  budget. PRADA watches every API (``detect``), and every stolen copy is checked by every
  ownership test that applies (DAWN, cosine, trigger, fingerprints) and for model deception
  (transfer of PGD examples to the victim).

``quick=True`` is a smaller plan for a first look; both plans say what they leave out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mextract.attacks.registry import check_attack_spec
from mextract.data import dataset_info
from mextract.defences.adversarial import PGDConfig
from mextract.defences.registry import check_defence_spec
from mextract.errors import InputError, UnknownNameError
from mextract.experiments.measures import check_measures
from mextract.experiments.plan import Answers, CellSpec, DataKind, Plan, VictimSpec, log_budgets
from mextract.models import default_model_for
from mextract.oracle import APIDescription


@dataclass(frozen=True)
class Thief:
    """A kind of thief: what data it has, what answers it gets, and the attack it runs."""

    label: str
    attack: str
    data: DataKind
    answers: Answers


#: The natural-image pool of the lab (patches of photos, no digit or object class of any
#: victim's task): the Knockoff Nets setting, a thief with plenty of unrelated natural images.
OOD_POOL = "natural_patches"
#: For single-channel image victims (digits, letters, sketches): letters and symbols rendered
#: from matplotlib's fonts, no digit. Strokes on a plain ground are what such a victim knows;
#: on photo patches the mnist victim answers almost only a few classes and a Knockoff thief
#: stays at chance (10.3% fidelity at 1,000 queries, against 90.8% with glyphs; docs/attacks.md).
OOD_POOL_GREY = "font_glyphs"


def ood_pool(input_shape: Sequence[int]) -> str:
    """The out-of-domain thieves' pool for a victim's input shape (see the two constants)."""
    return OOD_POOL_GREY if len(input_shape) == 3 and input_shape[0] == 1 else OOD_POOL

THIEVES: dict[str, Thief] = {
    "in-domain-soft": Thief("in-domain data, soft labels", "kd", "in-domain", "soft"),
    "in-domain-label": Thief("in-domain data, label only", "hard", "in-domain", "label"),
    "ood-soft": Thief("out-of-domain data, soft labels", "knockoff", "out-of-domain", "soft"),
    "ood-label": Thief("out-of-domain data, label only", "hard", "out-of-domain", "label"),
    "data-free-soft": Thief("no data, soft labels", "dfme", "none", "soft"),
    "data-free-label": Thief("no data, label only", "dfme_hard", "none", "label"),
}


@dataclass(frozen=True)
class Protection:
    """One protection the lab has: a defence stack in front of the API and/or a change to the
    victim itself, and the measures that verify it."""

    label: str
    kind: str  # "output", "mark", "victim"
    defence: str = "none"
    victim: dict[str, Any] = field(default_factory=dict)  # VictimSpec fields it changes
    measures: tuple[str, ...] = ()
    #: it never changes a top-1 label, so a label-only thief meets the undefended API
    #: (its exposure cells already measure it)
    keeps_top1: bool = False


def _adversarial(input_shape: Sequence[int]) -> dict[str, Any]:
    """Madry et al. (ICLR 2018): ε = 0.3 on MNIST, 8/255 on CIFAR-10 (colour images)."""
    eps = 0.3 if input_shape[0] == 1 else 8 / 255
    return {"adversarial": asdict(PGDConfig.for_eps(eps))}


PROTECTIONS: dict[str, Protection] = {
    "topk": Protection("top-1 probability only (topk)", "output", "topk", keeps_top1=True),
    "rounding": Protection("rounding to 2 decimals", "output", "rounding", keeps_top1=True),
    "label_only": Protection("label only", "output", "label_only", keeps_top1=True),
    "reverse_sigmoid": Protection("reverse sigmoid", "output", "reverse_sigmoid", keeps_top1=True),
    "dp_noise": Protection("Laplace noise (epsilon 10)", "output", 'dp_noise:{"epsilon": 10}'),
    "mad": Protection("MAD (epsilon 1)", "output", "mad"),
    "mad_argmax": Protection("MAD-argmax", "output", 'mad:{"argmax": true}', keeps_top1=True),
    "adaptive_misinformation": Protection("adaptive misinformation", "output", "adaptive_misinformation"),
    "honey": Protection("honey labels", "output", "honey"),
    "dawn": Protection("DAWN watermark", "mark", "dawn", measures=("dawn",)),
    "cosine": Protection("cosine watermark", "mark", "cosine", measures=("cosine",)),
    "trigger": Protection("trigger watermark", "mark", victim={"trigger_target": 0}, measures=("trigger",)),
    "adversarial": Protection("adversarial training", "victim"),
}

#: what every stolen copy is checked for (where it applies)
MEASURES_ALL = ("transfer", "fingerprints", "dawn", "cosine", "trigger")
#: the quick plan: no fingerprints (their generation takes minutes)
MEASURES_QUICK = ("transfer", "dawn", "cosine")
QUICK_THIEVES = ("in-domain-soft", "in-domain-label")
QUICK_PROTECTIONS = ("rounding", "cosine")
#: in-domain thieves face every protection (the strongest thieves at the smallest cost)
PROTECTION_THIEVES = ("in-domain-soft", "in-domain-label")


def _pick(
    names: Sequence[str] | None, registry: dict[str, Any], what: str, default: Sequence[str]
) -> list[str]:
    chosen = list(default if names is None else names)
    for n in chosen:
        if n not in registry:
            raise UnknownNameError(what, n, list(registry))
    return chosen


def audit_plan(
    victim: VictimSpec,
    *,
    quick: bool = False,
    seeds: int | None = None,
    budgets: Sequence[int] | None = None,
    thieves: Sequence[str] | None = None,
    protections: Sequence[str] | None = None,
    measures: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> Plan:
    """The audit of ``victim`` (see the module docstring); every choice has a default.

    Defaults: 3 seeds and budgets 100, 300, 1000 (``quick``: 1 seed, the two in-domain
    thieves, four protections and no fingerprints). ``input_shape``/``num_classes`` describe
    a user's checkpoint (read from its metadata by the caller); for a lab victim they come
    from its dataset.
    """
    if input_shape is None or num_classes is None:
        if victim.dataset is None:
            raise InputError("the victim's dataset or input shape is needed to plan its audit")
        info = dataset_info(victim.dataset)
        input_shape, num_classes = info.input_shape, info.num_classes
    shape = tuple(int(s) for s in input_shape)
    n_seeds = (1 if quick else 3) if seeds is None else seeds
    if n_seeds < 1:
        raise InputError(f"seeds: expected at least 1, got {n_seeds}")
    spend = sorted(set(budgets)) if budgets is not None else log_budgets(100, 1000)
    if not spend or spend[0] < 1:
        raise InputError(f"budgets: expected positive numbers of queries, got {list(spend)}")
    thief_names = _pick(thieves, THIEVES, "thief", QUICK_THIEVES if quick else list(THIEVES))
    prot_names = _pick(
        protections, PROTECTIONS, "protection", QUICK_PROTECTIONS if quick else list(PROTECTIONS)
    )
    measure_names = tuple(measures) if measures is not None else MEASURES_QUICK if quick else MEASURES_ALL
    check_measures(list(measure_names))
    left_out: list[str] = []
    image = len(shape) == 3
    if not image:
        dropped = [t for t in thief_names if THIEVES[t].data == "out-of-domain"]
        thief_names = [t for t in thief_names if t not in dropped]
        if dropped:
            left_out.append(
                f"out-of-domain thieves ({', '.join(dropped)}): the lab's out-of-domain pools are images"
            )
        if "adversarial" in prot_names:
            prot_names.remove("adversarial")
            left_out.append("adversarial training: the lab's PGD training is for images in [0, 1]")
    if victim.url is not None:  # a prediction API: its protections are whatever the server runs
        prot_names = []
        measure_names = tuple(m for m in measure_names if m == "transfer")
        left_out.append(
            "the lab's protections and honest users' cost: a remote API is measured as it is served "
            "(the owner's marks, fingerprints and the undefended answers need the model)"
        )
    arch = victim.architecture or default_model_for(shape)
    plain = APIDescription(shape, num_classes)
    affordable: dict[str, list[int]] = {}  # e.g. a data-free thief's first iteration costs hundreds
    for t in list(thief_names):
        reasons: dict[int, str] = {}
        for b in spend:
            try:
                check_attack_spec(THIEVES[t].attack, plain, b)
            except InputError as exc:
                reasons[b] = str(exc)
        affordable[t] = [b for b in spend if b not in reasons]
        if not affordable[t]:
            thief_names.remove(t)
            why = reasons[max(spend)]
            left_out.append(f"the thief with {THIEVES[t].label} cannot run at these budgets ({why})")
        elif reasons:
            low = ", ".join(str(b) for b in reasons)
            left_out.append(f"the thief with {THIEVES[t].label} at {low} queries ({reasons[max(reasons)]})")
    for p in prot_names:
        check_defence_spec(PROTECTIONS[p].defence, shape, num_classes, arch, victim.split_seed)
    cells: list[CellSpec] = []

    def thief_cell(
        v: VictimSpec, name: str, protection: str, defence: str, budget: int, seed: int
    ) -> CellSpec:
        t = THIEVES[name]
        # fingerprints are made once, of the victim as served; a retrained variant is another model
        measures = measure_names if v == victim else tuple(m for m in measure_names if m != "fingerprints")
        pool = ood_pool(shape) if t.data == "out-of-domain" else None
        return CellSpec(kind="cell", victim=v, protection=protection, defence=defence, detect=True,
                        attack=t.attack, thief=t.label, data=t.data, pool=pool, answers=t.answers,
                        budget=budget, seed=seed, measures=measures)  # fmt: skip

    if victim.url is None:
        cells.append(CellSpec(kind="defence", victim=victim, protection="none", detect=True))
    for name in thief_names:
        for budget in affordable[name]:
            for seed in range(n_seeds):
                cells.append(thief_cell(victim, name, "none", "none", budget, seed))
    top = max(spend)
    for p in prot_names:
        prot = PROTECTIONS[p]
        changes = _adversarial(shape) if p == "adversarial" else dict(prot.victim)
        v = victim.model_copy(update={**changes, "checkpoint": None}) if changes else victim
        if changes and v.dataset is None:
            raise InputError(f"{prot.label}: retraining the victim needs its dataset")
        cells.append(
            CellSpec(kind="defence", victim=v, protection=prot.label, defence=prot.defence, detect=True)
        )
        for name in (t for t in PROTECTION_THIEVES if t in thief_names):
            if prot.keeps_top1 and THIEVES[name].answers == "label":
                continue
            cells.append(thief_cell(v, name, prot.label, prot.defence, top, 0))
    if quick:
        left_out.append(
            f"the quick plan: {n_seeds} seed(s), thieves {', '.join(thief_names)} only, protections "
            f"{', '.join(prot_names)} only, no fingerprints; run without --quick for the full audit"
        )
    missing = [p for p in PROTECTIONS if p not in prot_names and not quick]
    if missing:
        left_out.append(f"protections not chosen: {', '.join(missing)}")
    left_out += [
        f"protections are measured with one seed, against the in-domain thieves, at {top} queries; "
        "label-only thieves are not run again against protections that keep every top-1 label",
        f"budgets above {top} queries",
    ]
    return Plan("audit-quick" if quick else "audit", cells, left_out)


#: Rough seconds per cell on the 2-core reference machine, one torch thread, for an
#: mnist-size input (784 values) and the lab's default models; measured with
#: ``mextract attack`` (kd, hard and knockoff at 1,000 queries: 21–24 s) and the victim's
#: training. Scaled by input size for other victims. Only the estimate printed before an
#: audit uses them.
_PER_QUERY_S = 0.021
_VICTIM_S = 30.0
_ADVERSARIAL_S = 240.0
_PREPARE_S = {"transfer": 30.0, "fingerprints": 120.0}
_MEASURE_S = {"transfer": 1.5}


def estimate_seconds(plan: Plan, *, jobs: int = 1, input_size: int = 784) -> float:
    """A rough wall-clock estimate of ``plan`` (see the constants above)."""
    scale = max(1.0, input_size / 784)
    total = 0.0
    for c in plan.work():
        if c.kind == "victim":
            total += (_ADVERSARIAL_S if c.victim.adversarial else _VICTIM_S) * scale
            total += sum(_PREPARE_S.get(m, 0.0) for m in c.measures) * scale
        elif c.kind == "defence":
            total += 3.0
        else:
            total += (_PER_QUERY_S * c.budget + sum(_MEASURE_S.get(m, 0.0) for m in c.measures)) * scale
    return total / max(1, jobs)
