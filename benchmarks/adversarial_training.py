"""PGD adversarial training of the bundled mnist victim: what it costs honest users and
what robustness it buys.

    python benchmarks/adversarial_training.py              # eps 0.1 and 0.3
    python benchmarks/adversarial_training.py --eps 0.2

For each radius the victim (the `fast` recipe, seed 0) is trained with
``PGDConfig.for_eps(eps)`` (7 steps of 2.5·ε/7, random start) into
``runs/matrix-adv-<eps>`` (the folder ``mextract matrix --pgd-eps EPS`` uses when given
that ``--out``; an existing run is reused), and compared with the plain victim of
``runs/bench-art``: clean test accuracy (the honest users' cost) and accuracy under a
stronger PGD (20 steps of ε/8, random start) at every radius.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mextract.data import load_splits
from mextract.defences.adversarial import PGDConfig, pgd
from mextract.experiments import train_victim_run
from mextract.models import load_checkpoint


def robust_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    config = PGDConfig(eps=eps, alpha=eps / 8, steps=20)
    correct = 0
    for i in range(0, len(x), 250):
        adv = pgd(model, x[i : i + 250], y[i : i + 250], config, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == y[i : i + 250]).sum())
    return correct / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3])
    args = p.parse_args()
    splits = load_splits("mnist", seed=0)
    x, y = splits.test.x, splits.test.y
    rows = [("plain", Path("runs/bench-art"), None)]
    rows += [(f"PGD eps={e:g}", Path(f"runs/matrix-adv-{e:g}"), PGDConfig.for_eps(e)) for e in args.eps]
    radii = sorted({0.1, 0.3, *args.eps})
    print("| victim | clean test acc % | " + " | ".join(f"PGD-20 eps={r:g} acc %" for r in radii) + " |")
    print("|---|---:|" + "---:|" * len(radii))
    for label, out, config in rows:
        record = train_victim_run(out, dataset="mnist", seed=0, adversarial=config)
        model, _ = load_checkpoint(out / "victim")
        robust = [robust_accuracy(model, x, y, r) for r in radii]
        cells = " | ".join(f"{100 * a:.1f}" for a in robust)
        print(f"| {label} | {100 * record.metrics['test_accuracy']:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
