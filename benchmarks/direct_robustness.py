"""Robustness of the direct (cryptanalytic) attacks over many seeds per network shape.

For each case the victim is queried only through a counting :class:`VictimOracle`, the
attack runs with its defaults, and the outcome is one of

* ``ok``: a model came back and it reproduces the victim (functional error below the
  case's threshold on held-out inputs);
* ``raised``: a :class:`~mextract.errors.MextractError` (the reason is tallied);
* ``SILENT``: a model came back that is wrong — the failure this benchmark exists to
  catch (the goal is zero).

Cases (``--cases``, comma separated)::

    gauss:D-H-K        N(0,1)-initialised one-hidden-layer net, net seed = run seed
    gauss2:D-H1-H2-K   the same with two hidden layers (ReLU2Cryptanalysis)
    mnist:784-H-10     zoo relu1 net trained 5 epochs on the mnist split (trained once,
                       the run seed is the attack's seed)
    mnist2:784-H1-H2-10  the same recipe with two hidden layers (ReLU2Cryptanalysis)
    sklearn:D-H-K      scikit-learn MLPClassifier(relu) on a synthetic task (logits mode:
                       the oracle answers log predict_proba)
    lrpipe:30-2        Pipeline(StandardScaler, LogisticRegression) on breast cancer (400
                       random rows per seed), raw features, equation solving; logits mode
                       (log predict_proba); ``lrpipe-probs:30-2`` the same with probabilities

``--dtype 32`` serves float32 answers (the oracle casts queries and answers). Functional
error = max |extracted − victim| logit difference (class-0 gauge) over the held-out
inputs, divided by the largest |victim| logit difference there (both in float64).
Prints the torch thread count and total wall time::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/direct_robustness.py \\
        --cases gauss:20-8-3,gauss:50-16-5 --seeds 20 --dtype 64
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import time
from typing import Any

import numpy as np
import torch
from direct_extraction import PadZero  # benchmarks/ is on sys.path when run as a script
from torch import nn

from mextract.attacks.direct import (
    EquationSolving,
    ReLU2Cryptanalysis,
    ReLUCryptanalysis,
    align_relu1,
    gaussian_relu1,
)
from mextract.errors import MextractError
from mextract.oracle import VictimOracle


def _gauss2(d: int, h1: int, h2: int, k: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, k)]
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net.eval()


_MNIST: dict[tuple[int, int], tuple[nn.Module, torch.Tensor]] = {}


def _mnist(h: int, k: int) -> tuple[nn.Module, torch.Tensor]:
    """The zoo relu1 net of ``direct_extraction.py`` (5 epochs on the mnist split, seed 0)."""
    if (h, k) not in _MNIST:
        from direct_extraction import mnist_net

        net, test = mnist_net(h, k, seed=0)
        _MNIST[h, k] = (net, test)
    return _MNIST[h, k]


def _mnist2(h1: int, h2: int) -> tuple[nn.Module, torch.Tensor]:
    """A two-hidden-layer net trained like ``direct_extraction.mnist_net`` (5 epochs, seed 0)."""
    from mextract.data import load_splits

    s = load_splits("mnist", seed=0)
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(784, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10)]
    net = nn.Sequential(*layers)
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
    return net.double().eval(), s.test.x.double()


def _sklearn(d: int, h: int, k: int, seed: int) -> tuple[Any, np.ndarray]:
    from sklearn.datasets import make_classification
    from sklearn.neural_network import MLPClassifier

    x, y = make_classification(
        n_samples=600, n_features=d, n_informative=min(d, 6), n_classes=k, random_state=seed
    )
    est = MLPClassifier(hidden_layer_sizes=(h,), activation="relu", max_iter=300, random_state=seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(x[:400], y[:400])
    return est, x[400:]


def build(case: str, seed: int, dtype: torch.dtype) -> dict[str, Any]:
    kind, shape = case.split(":")
    dims = [int(v) for v in shape.split("-")]
    g = torch.Generator().manual_seed(10_000 + seed)
    if kind == "gauss":
        d, h, k = dims
        net = gaussian_relu1(d, h, k, seed)
        x = torch.randn(10_000, d, dtype=torch.float64, generator=g)
        attack: Any = ReLUCryptanalysis()
        victim: Any = net
    elif kind == "gauss2":
        d, h1, h2, k = dims
        net = _gauss2(d, h1, h2, k, seed)
        x = torch.randn(10_000, d, dtype=torch.float64, generator=g)
        attack = ReLU2Cryptanalysis()
        victim = net
    elif kind == "mnist2":
        d, h1, h2, k = dims
        net, x = _mnist2(h1, h2)
        attack = ReLU2Cryptanalysis()
        victim = net
        kind = "mnist"  # same input shape and scoring
    elif kind == "mnist":
        d, h, k = dims
        net, x = _mnist(h, k)
        attack = ReLUCryptanalysis()
        victim = net
    elif kind == "sklearn":
        d, h, k = dims
        est, xt = _sklearn(d, h, k, seed)
        x = torch.from_numpy(xt)
        attack = ReLUCryptanalysis()
        victim = est
    elif kind in ("lrpipe", "lrpipe-probs"):
        from sklearn.datasets import load_breast_cancer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        xa, ya = load_breast_cancer(return_X_y=True)
        idx = np.random.default_rng(seed).permutation(len(xa))[:400]
        victim = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(xa[idx], ya[idx])
        x = torch.from_numpy(xa)
        attack = EquationSolving()
        d, k = xa.shape[1], 2
        mode = "probs" if kind == "lrpipe-probs" else "logits"
        oracle = VictimOracle(victim, mode=mode, dtype=dtype)
        kind = "sklearn"  # scored like the other scikit-learn victims (log predict_proba)
        return {"oracle": oracle, "attack": attack, "x": x, "victim": victim, "kind": kind, "params": d + 1}
    else:
        raise SystemExit(f"unknown case kind {kind!r}")
    params = sum(a * b + b for a, b in itertools.pairwise(dims))
    if kind != "sklearn" and k == 1:  # a single logit f is served as the pair (0, f)
        victim, k = PadZero(victim).eval(), 2
    if kind == "mnist":
        oracle = VictimOracle(victim, input_shape=(1, 28, 28), num_classes=k, mode="logits", dtype=dtype)
    elif kind == "sklearn":
        oracle = VictimOracle(victim, mode="logits", dtype=dtype)
    else:
        oracle = VictimOracle(victim, input_shape=(d,), num_classes=k, mode="logits", dtype=dtype)
    return {"oracle": oracle, "attack": attack, "x": x, "victim": victim, "kind": kind, "params": params}


def _scores(kind: str, victim: Any, x: torch.Tensor) -> np.ndarray:
    if kind == "sklearn":
        p = victim.predict_proba(x.numpy())
        out = np.log(np.clip(p, 1e-300, None))
    else:
        with torch.no_grad():
            out = victim(x.reshape(len(x), *victim_shape(kind))).numpy()
    return out - out[:, :1]


def victim_shape(kind: str) -> tuple[int, ...]:
    return (1, 28, 28) if kind == "mnist" else (-1,)


def run_one(case: str, seed: int, dtype: torch.dtype, silent_tol: float) -> dict[str, Any]:
    v = build(case, seed, dtype)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"case": case, "seed": seed}
    try:
        res = v["attack"](v["oracle"], None, 10**8, seed=seed)
    except MextractError as exc:
        out.update(status="raised", reason=f"{type(exc).__name__}: {str(exc)[:90]}")
        out["time_s"] = time.perf_counter() - t0
        return out
    out["time_s"] = time.perf_counter() - t0
    want = _scores(v["kind"], v["victim"], v["x"])
    with torch.no_grad():
        got = res.model(v["x"].reshape(len(v["x"]), -1) if v["kind"] != "mnist" else v["x"]).numpy()
    got = got - got[:, :1]
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    if dtype == torch.float32 and v["kind"] != "sklearn":
        # the victim's own float32 resolution: its float32 answers against float64 ones
        import copy

        v32 = copy.deepcopy(v["victim"]).float()
        with torch.no_grad():
            a32 = v32(v["x"].float()).double().numpy()
        a32 = a32 - a32[:, :1]
        out["f32_resolution"] = float(np.abs(a32 - want).max() / max(np.abs(want).max(), 1e-300))
    relu1 = isinstance(v["attack"], ReLUCryptanalysis) and v["kind"] in ("gauss", "mnist")
    if relu1 and not isinstance(v["victim"], PadZero):
        out["param_error"] = align_relu1(res.model, v["victim"]).max_rel_error
    # float32 answers: an argmax may flip where two logits tie to within the roundoff
    min_agree = 1.0 if dtype == torch.float64 else 0.999
    out.update(
        status="ok" if err <= silent_tol and agree >= min_agree else "SILENT",
        error=err,
        fidelity=agree,
        queries=res.queries,
        per_param=res.queries / v["params"],
        verify_queries=res.metrics.get("verify_queries", float("nan")),
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="gauss:20-8-3,gauss:50-16-5")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["32", "64"], default="64")
    ap.add_argument("--silent-tol", type=float, default=None, help="functional error counted as wrong")
    ap.add_argument("--json", default=None, help="write every run's record here")
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "32" else torch.float64
    silent_tol = args.silent_tol or (1e-3 if dtype == torch.float32 else 1e-6)
    t_all = time.perf_counter()
    threads = torch.get_num_threads()
    print(f"torch threads: {threads}  answers: float{args.dtype}  silent if error > {silent_tol:g}")
    records = []
    header = f"{'case':<22}{'runs':>5}{'ok':>5}{'raised':>7}{'SILENT':>7}{'err median':>12}{'err max':>10}"
    header += f"{'param err max':>15}"
    header += f"{'queries med':>13}{'q/param':>9}{'time med s':>11}"
    lines = [header, "-" * len(header)]
    for case in args.cases.split(","):
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        recs = [run_one(case, s, dtype, silent_tol) for s in seeds]
        records += recs
        ok = [r for r in recs if r["status"] == "ok"]
        errs = [r["error"] for r in recs if "error" in r]
        perr = [r["param_error"] for r in recs if "param_error" in r]
        reasons = collections.Counter(r["reason"] for r in recs if r["status"] == "raised")
        n_sil = sum(r["status"] == "SILENT" for r in recs)
        med = lambda v: float(np.median(v)) if v else float("nan")  # noqa: E731
        lines.append(
            f"{case:<22}{len(recs):>5}{len(ok):>5}{len(recs) - len(ok) - n_sil:>7}{n_sil:>7}"
            f"{med(errs):>12.2e}{max(errs) if errs else float('nan'):>10.2e}"
            f"{max(perr) if perr else float('nan'):>15.2e}"
            f"{med([r['queries'] for r in ok]):>13.0f}{med([r['per_param'] for r in ok]):>9.2f}"
            f"{med([r['time_s'] for r in recs]):>11.2f}"
        )
        res32 = [r["error"] / r["f32_resolution"] for r in recs if "f32_resolution" in r and "error" in r]
        if res32:
            lines.append(
                f"    error / victim's own float32 resolution: median {med(res32):.1f}, max {max(res32):.1f}"
            )
        for reason, n in reasons.most_common():
            lines.append(f"    raised x{n}: {reason}")
        print("\n".join(lines[-1 - len(reasons) - bool(res32) :]), flush=True)
    print()
    print("\n".join(lines))
    print(f"wall time {time.perf_counter() - t_all:.1f} s, torch threads {torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
