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
ART (``pip install adversarial-robustness-toolbox``) runs in a subprocess with a time
limit, since it does not finish on 784-input networks in reasonable time; it computes
in float32 internally (``ART_NUMPY_DTYPE``) and reads ``np.random``, seeded here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from mextract.attacks.direct import ReLUCryptanalysis, align_relu1, query_floor, relu1_parameters
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


def gaussian_net(d: int, h: int, k: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net.eval()


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


def victims() -> list[dict[str, Any]]:
    out = []
    for d, h, k in [(20, 8, 3), (50, 16, 5)]:
        net = gaussian_net(d, h, k, seed=0)
        gen = torch.Generator().manual_seed(1)
        test = torch.randn(10_000, d, generator=gen, dtype=torch.float64)
        out.append(
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
        net, test = mnist_net(h, k, seed=0)
        w0, b0, a1, b1 = relu1_parameters(net)
        served: nn.Module = net
        if k == 1:
            served = PadZero(net).eval()
            a1, b1 = np.vstack([np.zeros_like(a1), a1]), np.concatenate([[0.0], b1])
        out.append(
            dict(
                name=f"784-{h}-{k} mnist",
                net=served,
                shape=(1, 28, 28),
                k=max(k, 2),
                kt=k,
                test=test,
                params=(w0, b0, a1, b1),
            )
        )
    return out


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


def _art_worker(v: dict[str, Any], queue: Any) -> None:
    import art.attacks.extraction.functionally_equivalent_extraction as fee_module
    from art.attacks.extraction import FunctionallyEquivalentExtraction
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    if v.get("art_float64"):
        fee_module.NUMPY_DTYPE = np.float64  # ART computes in float32 by default

    np.random.seed(0)
    d = int(np.prod(v["shape"]))
    oracle = VictimOracle(
        v["net"], input_shape=v["shape"], num_classes=v["k"], mode="logits", dtype=torch.float64, device="cpu"
    )

    def predict(x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.asarray(x, np.float64)).reshape(-1, *v["shape"])
        return oracle.query(xt).numpy()

    clf = BlackBoxClassifierNeuralNetwork(predict, input_shape=(d,), nb_classes=v["k"])
    h = v["params"][0].shape[0]
    fee = FunctionallyEquivalentExtraction(clf, num_neurons=h)
    x_last = v["test"][:100].reshape(100, -1).numpy().astype(np.float32)
    t = time.perf_counter()
    fee.extract(x_last)
    wall = time.perf_counter() - t
    w0, b0 = fee.w_0.T.astype(np.float64), fee.b_0.ravel().astype(np.float64)
    a1, b1 = fee.w_1.T.astype(np.float64), fee.b_1.ravel().astype(np.float64)
    al = align_relu1((w0, b0, a1, b1), v["params"])

    def pred(x: torch.Tensor) -> torch.Tensor:
        z = np.maximum(x.reshape(len(x), -1).numpy() @ w0.T + b0, 0.0) @ a1.T + b1
        return torch.from_numpy(z)

    queue.put(
        dict(
            queries=oracle.ledger.count,
            wall_s=wall,
            max_rel_error=al.max_rel_error,
            units=f"{al.matched}/{h}",
            fid_test=fidelity(v["net"], pred, v["test"]),
            fid_gauss=fidelity(v["net"], pred, gaussian(100_000, v["shape"])),
        )
    )


def _art_guarded(v: dict[str, Any], queue: Any, errors: Any) -> None:
    import warnings

    warnings.simplefilter("ignore")
    try:
        _art_worker(v, queue)
    except Exception as exc:  # report ART's own failure in one line
        errors.put(f"{type(exc).__name__}: {str(exc)[:90]}")


def run_art(v: dict[str, Any], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    queue, errors = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_art_guarded, args=(v, queue, errors))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-art", action="store_true", help="skip IBM ART's FEE")
    ap.add_argument("--art-timeout", type=float, default=300.0, help="seconds per ART run")
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
    for v in victims():
        d = int(np.prod(v["shape"]))
        floor = query_floor(d, v["params"][0].shape[0], v["kt"])
        runs = [("ours", run_ours(v))]
        if not args.no_art:
            runs.append(("ART", run_art(v, args.art_timeout)))
            runs.append(("ART-f64", run_art({**v, "art_float64": True}, args.art_timeout)))
        for who, r in runs:
            rows.append(dict(victim=v["name"], attack=who, floor=floor, **r))
            if "status" in r:
                print(f"{v['name']:<20}{who:<8}  {r['status']}")
                continue
            print(
                f"{v['name']:<20}{who:<8}{r['queries']:>10}{floor:>11.1f}"
                f"{r['queries'] / floor:>8.2f}{r['wall_s']:>9.2f}{r['max_rel_error']:>13.2e}"
                f"{r['units']:>8}{100 * r['fid_test']:>9.2f}%{100 * r['fid_gauss']:>10.3f}%"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
