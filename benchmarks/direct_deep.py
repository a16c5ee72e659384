"""Layer-peeling prototype (``mextract.attacks.direct.peel``) over seeds and depths.

Each run builds a float64 ReLU victim, queries it only through a counting
:class:`VictimOracle` and runs :class:`DeepReLUCryptanalysis` (depth = hidden layers of
the case). Outcomes: ``ok`` (a model came back and reproduces the victim on 10,000 held-out
inputs to ``--silent-tol`` relative logit error), ``raised`` (a
:class:`~mextract.errors.MextractError`, reason tallied) or ``SILENT`` (a wrong model came
back: the failure the attack's verification exists to prevent; the goal is zero).

Cases (``--cases``, comma separated)::

    gauss:D-H1-...-Hk-K   N(0,1) weights and biases, net seed = run seed
    torch:D-H1-...-Hk-K   PyTorch's default Linear initialisation, torch seed = run seed
    mnist:784-H1-...-Hk-10  trained 5 epochs on the lab's mnist split (Adam, seed 0, trained
                          once); the run seed is the attack's seed; held-out = mnist test images

Runs with one torch thread unless ``--threads`` says otherwise; prints the thread count,
each run's wall time and the total wall time::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/direct_deep.py \\
        --cases gauss:8-6-5-4-2,gauss:12-10-8-6-3,gauss:20-10-10-10-1 --seeds 10
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from mextract.attacks.direct.peel import DeepReLUCryptanalysis, align_relu_deep
from mextract.errors import MextractError
from mextract.oracle import VictimOracle

_MNIST: dict[tuple[int, ...], nn.Module] = {}


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _mnist(dims: list[int]) -> tuple[nn.Module, torch.Tensor]:
    from mextract.data import load_splits

    s = load_splits("mnist", seed=0)
    key = tuple(dims)
    if key not in _MNIST:
        torch.manual_seed(0)
        net = _mlp(dims)
        x, y = s.victim_train.x, s.victim_train.y
        assert y is not None
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(5):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        _MNIST[key] = net.double().eval()
    return _MNIST[key], s.test.x.double().reshape(len(s.test.x), -1)


def build(case: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    kind, shape = case.split(":")
    dims = [int(v) for v in shape.split("-")]
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(10_000, dims[0], dtype=torch.float64, generator=g)
    if kind == "gauss":
        net = _mlp(dims).double()
        gw = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gw, dtype=torch.float64))
        return net.eval(), x
    if kind == "torch":
        torch.manual_seed(seed)
        return _mlp(dims).double().eval(), x
    if kind == "mnist":
        return _mnist(dims)
    raise SystemExit(f"unknown case kind {kind!r}")


def run_one(case: str, seed: int, silent_tol: float) -> dict[str, Any]:
    net, x = build(case, seed)
    dims = [int(v) for v in case.split(":")[1].split("-")]
    oracle = VictimOracle(
        net, input_shape=(dims[0],), num_classes=dims[-1], mode="logits", dtype=torch.float64, device="cpu"
    )
    t0 = time.perf_counter()
    out: dict[str, Any] = {"case": case, "seed": seed}
    try:
        res = DeepReLUCryptanalysis(depth=len(dims) - 2)(oracle, None, 10**8, seed=seed)
    except MextractError as exc:
        out.update(
            status="raised", reason=f"{type(exc).__name__}: {str(exc)[:100]}", queries=oracle.ledger.count
        )
        out["time_s"] = time.perf_counter() - t0
        return out
    out["time_s"] = time.perf_counter() - t0
    with torch.no_grad():
        want, got = net(x).numpy(), res.model(x).numpy()
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))
    out.update(
        status="ok" if err <= silent_tol else "SILENT",
        error=err,
        param_error=align_relu_deep(res.model, net).max_rel_error,
        queries=res.queries,
        ledger=oracle.ledger.count,
        metrics={
            k: v for k, v in res.metrics.items() if k.startswith(("signs_", "rows_", "filled", "attempts"))
        },
    )
    assert res.queries == oracle.ledger.count, "reported queries differ from the ledger"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="gauss:10-8-6-2,gauss:8-6-5-4-2")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--silent-tol", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    print(f"torch threads: {torch.get_num_threads()}  silent if error > {args.silent_tol:g}", flush=True)
    header = (
        f"{'case':<24}{'runs':>5}{'ok':>5}{'raised':>7}{'SILENT':>7}{'func err max':>13}"
        f"{'hidden param err max':>21}{'queries med':>12}{'queries max':>12}"
        f"{'time med s':>11}{'time max s':>11}"
    )
    lines = [header, "-" * len(header)]
    for case in args.cases.split(","):
        recs = []
        for s in range(args.first_seed, args.first_seed + args.seeds):
            r = run_one(case, s, args.silent_tol)
            print(f"  {case} seed {s}: {r['status']} {r.get('error', r.get('reason'))} "
                  f"queries {r['queries']} {r['time_s']:.1f}s {r.get('metrics', '')}",
                  flush=True)  # fmt: skip
            recs.append(r)
        ok = [r for r in recs if r["status"] == "ok"]
        n_sil = sum(r["status"] == "SILENT" for r in recs)
        errs = [r["error"] for r in recs if "error" in r]
        perr = [r["param_error"] for r in ok]
        med = lambda v: float(np.median(v)) if v else float("nan")  # noqa: E731
        lines.append(
            f"{case:<24}{len(recs):>5}{len(ok):>5}{len(recs) - len(ok) - n_sil:>7}{n_sil:>7}"
            f"{max(errs) if errs else float('nan'):>13.2e}{max(perr) if perr else float('nan'):>21.2e}"
            f"{med([r['queries'] for r in ok]):>12.0f}"
            f"{max([r['queries'] for r in ok] or [float('nan')]):>12.0f}"
            f"{med([r['time_s'] for r in recs]):>11.2f}{max(r['time_s'] for r in recs):>11.2f}"
        )
        reasons = collections.Counter(r["reason"].split(":")[0] + ": " + r["reason"].split(":", 1)[1][:60]
                                      for r in recs if r["status"] == "raised")  # fmt: skip
        for reason, n in reasons.most_common():
            lines.append(f"    raised x{n}: {reason}")
    print()
    print("\n".join(lines))
    print(f"wall time {time.perf_counter() - t_all:.1f} s, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
