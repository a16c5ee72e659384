"""Direct extraction benchmark: mextract's ReLU cryptanalysis vs IBM ART's FEE.

Runs both attacks on the same victims, through the same query-counting oracle (float64
logits), and prints queries, the floor ``P / K``, wall time, the max relative parameter
error after alignment (``mextract.attacks.direct.align``: per block, max |error| over
max |true entry|) and fidelity (top-1 agreement) on the test set and on 100,000
Gaussian inputs::

    PYTHONPATH=src python benchmarks/direct_extraction.py            # ours + ART
    PYTHONPATH=src python benchmarks/direct_extraction.py --no-art   # ours only

Victims: Gaussian-initialised 20-8-3 and 50-16-5 networks (float64; their "test set" is
10,000 Gaussian inputs) and zoo ``relu1`` networks trained 5 epochs on mnist
(784-16-10, and 784-32-1: one logit for "digit < 5", served as the logit pair ``(0, f)``).

ART (``pip install adversarial-robustness-toolbox``, 1.20.1 measured) runs in a spawned
subprocess per setting with a time limit (``--art-timeout``), over the small grid
``ART_GRID`` of its ``extract()`` knobs (the best completed run is printed; ``--art-all``
prints every one). It is given a fair float64 pipeline: its ``BlackBoxClassifier``
stores answers as ``art.config.ART_NUMPY_DTYPE`` (float32) and its default
preprocessing casts every query to float32, which alone made FEE fail on every victim
here; both are lifted (answer dtype patched to float64, ``preprocessing=None``). ART
queries its own counting victim function, not our validating oracle, because its
critical-point search can issue NaN/inf queries (``0/0`` slopes); every row it sends is
counted, non-finite ones included (``nonfinite`` in ``--json``). ART sees a single-logit
victim ``f`` as ``(-f/2, f/2)`` (the same softmax as our ``(0, f)`` pair; a constant
output makes its slope ratios ``0/0``, and ART refuses ``nb_classes=1``); its error is
measured against that pair's parameters. ART reads ``np.random``, seeded 0.

    PYTHONPATH=src python benchmarks/direct_extraction.py --art-all --victims 20- 50-
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from mextract.attacks.direct import (
    ReLUCryptanalysis,
    align_relu1,
    gaussian_relu1,
    query_floor,
    relu1_parameters,
)
from mextract.oracle import VictimOracle

Params = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class PadZero(nn.Module):
    """A single-logit network served as the logit pair ``(0, f(x))``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x)
        return torch.cat([torch.zeros_like(f), f], dim=1)


class HalfPair(nn.Module):
    """A single-logit network served as ``(-f/2, f/2)``: the same softmax as ``(0, f)``, but
    with no constant output (ART's per-output slope ratios are ``0/0`` on a constant one)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x)
        return torch.cat([-0.5 * f, 0.5 * f], dim=1)


def mnist_net(h: int, k: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    from mextract.data import load_splits
    from mextract.models import create_model

    s = load_splits("mnist", seed=0)
    torch.manual_seed(seed)
    net = create_model("relu1", (1, 28, 28), max(k, 2), hidden=h)
    if k == 1:
        net[-1] = nn.Linear(h, 1)
    x, y = s.victim_train.x, s.victim_train.y
    assert y is not None
    target = (y < 5).float()[:, None] if k == 1 else y
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    lossf: Any = nn.BCEWithLogitsLoss() if k == 1 else nn.CrossEntropyLoss()
    for _ in range(5):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            lossf(net(x[idx]), target[idx]).backward()
            opt.step()
    return net.double().eval(), s.test.x.double()


def victims(only: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The benchmark's victims, built lazily; ``only``: name prefixes to keep."""

    def wanted(name: str) -> bool:
        return not only or any(name.startswith(p) for p in only)

    for d, h, k in [(20, 8, 3), (50, 16, 5)]:
        if not wanted(f"{d}-{h}-{k} gaussian"):
            continue
        net = gaussian_relu1(d, h, k, seed=0)
        gen = torch.Generator().manual_seed(1)
        test = torch.randn(10_000, d, generator=gen, dtype=torch.float64)
        yield (
            dict(
                name=f"{d}-{h}-{k} gaussian",
                net=net,
                shape=(d,),
                k=k,
                kt=k,
                test=test,
                params=relu1_parameters(net),
            )
        )
    for h, k in [(16, 10), (32, 1)]:
        if not wanted(f"784-{h}-{k} mnist"):
            continue
        net, test = mnist_net(h, k, seed=0)
        w0, b0, a1, b1 = relu1_parameters(net)
        served: nn.Module = net
        art_net: nn.Module = net
        art_params = (w0, b0, a1, b1)
        if k == 1:
            served = PadZero(net).eval()
            art_net = HalfPair(net).eval()
            art_params = (w0, b0, np.vstack([-0.5 * a1, 0.5 * a1]), np.concatenate([-0.5 * b1, 0.5 * b1]))
            a1, b1 = np.vstack([np.zeros_like(a1), a1]), np.concatenate([[0.0], b1])
        yield (
            dict(
                name=f"784-{h}-{k} mnist",
                net=served,
                shape=(1, 28, 28),
                k=max(k, 2),
                kt=k,
                test=test,
                params=(w0, b0, a1, b1),
                art_net=art_net,  # ART sees a single logit f as (-f/2, f/2), not our (0, f)
                art_params=art_params,
            )
        )


@torch.no_grad()
def fidelity(victim: nn.Module, predict: Any, x: torch.Tensor) -> float:
    agree = 0
    for i in range(0, len(x), 10_000):
        xb = x[i : i + 10_000]
        agree += int((predict(xb).argmax(1) == victim(xb).argmax(1)).sum())
    return agree / len(x)


def gaussian(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(12345)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


def run_ours(v: dict[str, Any]) -> dict[str, Any]:
    oracle = VictimOracle(
        v["net"], input_shape=v["shape"], num_classes=v["k"], mode="logits", dtype=torch.float64, device="cpu"
    )
    t = time.perf_counter()
    res = ReLUCryptanalysis()(oracle, None, 10_000_000, seed=0)
    wall = time.perf_counter() - t
    al = align_relu1(res.model, v["params"])
    model = res.model
    return dict(
        queries=res.queries,
        wall_s=wall,
        max_rel_error=al.max_rel_error,
        units=f"{al.matched}/{v['params'][0].shape[0]}",
        fid_test=fidelity(v["net"], model, v["test"]),
        fid_gauss=fidelity(v["net"], model, gaussian(100_000, v["shape"])),
    )


# ART's extract() knobs tried on every victim (the best completed run is reported, all are
# printed with --art-all). ``default``: ART 1.20.1's defaults. ``fd``: finite-difference steps
# of the weight and sign recovery (``delta_init_value``, ``delta_sign``; ``d_step`` scaled with
# them) cut from 0.1 / 0.02 to 1e-3, so that the steps at one unit's critical point do not
# cross a neighbouring unit's hyperplane (possible in float64). ``fd+search``: also a 10x
# finer critical-point search step ``delta_0`` (ART scans ``t`` in [-H^2, H^2] in steps of
# ``delta_0``; two hyperplanes closer than a step along the line are missed or merged).
ART_GRID: dict[str, dict[str, float]] = {
    "default": {},
    "fd": dict(delta_init_value=1e-3, d_step=1e-4, delta_sign=1e-3),
    "fd+search": dict(delta_0=0.005, delta_init_value=1e-3, d_step=1e-4, delta_sign=1e-3),
}


def _art_worker(v: dict[str, Any], settings: dict[str, float], queue: Any) -> None:
    import art.config
    from art.attacks.extraction import FunctionallyEquivalentExtraction
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    # ART's BlackBoxClassifier stores answers as art.config.ART_NUMPY_DTYPE (float32) and its
    # default preprocessing (StandardisationMeanStd(0, 1)) casts every query to float32: the
    # finite differences of FEE then drown in rounding noise. Full float64: patch the answer
    # dtype and pass preprocessing=None (the identity anyway).
    art.config.ART_NUMPY_DTYPE = np.float64  # type: ignore[attr-defined]
    np.random.seed(0)  # FEE draws its search line and least-squares starts from np.random
    d = int(np.prod(v["shape"]))
    net = v.get("art_net", v["net"])
    params = v.get("art_params", v["params"])
    k = len(params[3])
    counts = {"queries": 0, "nonfinite": 0}

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        # ART's own counting victim: every row is counted, non-finite rows included (our
        # VictimOracle refuses NaN queries, which ART's critical-point search can produce).
        xa = np.asarray(x, np.float64).reshape(len(x), -1)
        counts["queries"] += len(xa)
        counts["nonfinite"] += int((~np.isfinite(xa).all(axis=1)).sum())
        return net(torch.from_numpy(xa).reshape(-1, *v["shape"])).numpy()

    clf = BlackBoxClassifierNeuralNetwork(predict, input_shape=(d,), nb_classes=k, preprocessing=None)
    h = params[0].shape[0]
    fee = FunctionallyEquivalentExtraction(clf, num_neurons=h)
    x_last = v["test"][:100].reshape(100, -1).numpy()
    t = time.perf_counter()
    fee.extract(x_last, **settings)
    wall = time.perf_counter() - t
    assert fee.w_0 is not None and fee.b_0 is not None and fee.w_1 is not None and fee.b_1 is not None
    w0, b0 = fee.w_0.T.astype(np.float64), fee.b_0.ravel().astype(np.float64)
    a1, b1 = fee.w_1.T.astype(np.float64), fee.b_1.ravel().astype(np.float64)
    al = align_relu1((w0, b0, a1, b1), params)

    def pred(x: torch.Tensor) -> torch.Tensor:
        z = np.maximum(x.reshape(len(x), -1).numpy() @ w0.T + b0, 0.0) @ a1.T + b1
        return torch.from_numpy(z)  # same argmax as the served victim (also for (-f/2, f/2))

    queue.put(
        dict(
            queries=counts["queries"],
            nonfinite=counts["nonfinite"],
            wall_s=wall,
            max_rel_error=al.max_rel_error,
            units=f"{al.matched}/{h}",
            fid_test=fidelity(v["net"], pred, v["test"]),
            fid_gauss=fidelity(v["net"], pred, gaussian(100_000, v["shape"])),
        )
    )


def _art_guarded(v: dict[str, Any], settings: dict[str, float], queue: Any, errors: Any) -> None:
    import warnings

    warnings.simplefilter("ignore")
    try:
        _art_worker(v, settings, queue)
    except Exception as exc:  # report ART's own failure in one line
        errors.put(f"{type(exc).__name__}: {str(exc)[:90]}")


def run_art(v: dict[str, Any], settings: dict[str, float], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # fork after torch threads can deadlock the child
    queue, errors = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_art_guarded, args=(v, settings, queue, errors))
    t = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return dict(status=f"did not finish in {timeout:.0f} s")
    if queue.empty():
        err = errors.get() if not errors.empty() else f"exit code {proc.exitcode}"
        return dict(status=f"crashed after {time.perf_counter() - t:.1f} s: {err}")
    return queue.get()


def best_art(runs: dict[str, dict[str, Any]]) -> str | None:
    """The completed ART run with the smallest max rel error (then fewest queries)."""
    done = [name for name, r in runs.items() if "status" not in r]
    return min(done, key=lambda n: (runs[n]["max_rel_error"], runs[n]["queries"])) if done else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-art", action="store_true", help="skip IBM ART's FEE")
    ap.add_argument("--art-timeout", type=float, default=300.0, help="seconds per ART run")
    ap.add_argument(
        "--art-settings",
        nargs="+",
        default=list(ART_GRID),
        choices=list(ART_GRID),
        help="ART grid points to run",
    )
    ap.add_argument("--art-all", action="store_true", help="print every ART grid point, not only the best")
    ap.add_argument("--victims", nargs="+", help="only victims whose name starts with one of these")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    header = (
        f"{'victim':<20}{'attack':<8}{'queries':>10}{'floor P/K':>11}{'ratio':>8}"
        f"{'time s':>9}{'max rel err':>13}{'units':>8}{'fid test':>10}{'fid gauss':>11}"
    )
    print(header)
    print("-" * len(header))
    for v in victims(args.victims):
        d = int(np.prod(v["shape"]))
        floor = query_floor(d, v["params"][0].shape[0], v["kt"])
        runs = [("ours", run_ours(v))]
        if not args.no_art:
            art_runs = {name: run_art(v, ART_GRID[name], args.art_timeout) for name in args.art_settings}
            best = best_art(art_runs)
            for name, r in art_runs.items():
                r["settings"] = name
                if args.art_all or name == best or best is None:
                    runs.append(("ART*" if name == best and args.art_all else "ART", r))
        for who, r in runs:
            rows.append(dict(victim=v["name"], attack=who, floor=floor, **r))
            tag = f"  [{r['settings']}]" if "settings" in r else ""
            if "status" in r:
                print(f"{v['name']:<20}{who:<8}  {r['status']}{tag}", flush=True)
                continue
            print(
                f"{v['name']:<20}{who:<8}{r['queries']:>10}{floor:>11.1f}"
                f"{r['queries'] / floor:>8.2f}{r['wall_s']:>9.2f}{r['max_rel_error']:>13.2e}"
                f"{r['units']:>8}{100 * r['fid_test']:>9.2f}%{100 * r['fid_gauss']:>10.3f}%{tag}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
