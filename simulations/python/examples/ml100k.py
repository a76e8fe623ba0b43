"""Reproduces the README's MovieLens-100K results with the Python package, and draws the privacy/utility frontier.

    pip install ./simulations/python        # once (add matplotlib for the plot)
    python simulations/python/examples/ml100k.py [--data-dir DIR] [--no-frontier] [--plot frontier.png]

Part 1 is the federated rows of the README's results table (`fedrec-sim run --dataset ml-100k`
and `--objective implicit`: 300 rounds x 100 devices, seed 1, non-private). Part 2 is the
README's ML-100K frontier (`fedrec-sim sweep --dataset ml-100k --epsilons 1,2,4,8,16,inf`, for
both objectives): RMSE of the explicit model and Recall@20 / NDCG@10 of the implicit one per
ε; with matplotlib installed it is drawn to --plot. The numbers are the CLI's, to the last
digit, since both call the same code with the same seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import fedrec
from fedrec import data, privacy

EPSILONS: list[float | None] = [1, 2, 4, 8, 16, None]


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def table(rows: list[tuple[str, dict[str, Any], str]]) -> None:
    print("| method | RMSE | Recall@20 | NDCG@10 | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for name, m, secs in rows:
        print(f"| {name} | {fmt(m['rmse'])} | {m['recall_at_20']:.4f} | {m['ndcg_at_10']:.4f} | {secs} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="where ml-100k/ is (default: $FEDREC_DATA or ./data)")
    ap.add_argument("--no-frontier", action="store_true", help="only the results table")
    ap.add_argument("--plot", type=Path, default=Path("ml100k-frontier.png"), help="where to draw the frontier")
    args = ap.parse_args()

    ds = data.ml100k(args.data_dir)
    split = ds.split(0.2, "random", seed=1)  # the CLI's default split: --test-fraction 0.2 --seed 1
    print(f"{ds!r} -> {split!r}\n")

    rows = []
    for objective in ("explicit", "implicit"):
        t0 = time.perf_counter()
        res = fedrec.simulate(split, objective=objective, seed=1)
        rows.append((f"fedrec, federated, {objective}", res.metrics, f"{time.perf_counter() - t0:.1f}"))
    table(rows)

    if args.no_frontier:
        return
    q = 100 / ds.n_users
    print(f"\nprivacy/utility frontier (δ = 1e-6, RDP, adaptive clipping, 300 rounds, q = {q:.3f})\n")
    sweeps = {}
    for objective in ("explicit", "implicit"):
        t0 = time.perf_counter()
        sweeps[objective] = fedrec.sweep(split, EPSILONS, objective=objective, seed=1)["points"]
        print(f"  {objective}: {time.perf_counter() - t0:.1f} s")
    print("\n| ε | σ | spent ε | RMSE (explicit) | Recall@20 (implicit) | NDCG@10 (implicit) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ex, im in zip(sweeps["explicit"], sweeps["implicit"], strict=True):
        eps = ex["target_epsilon"]
        spent = ex["privacy"]["epsilon"] if ex["privacy"] else None
        print(
            f"| {'∞' if eps is None else f'{eps:g}'} | {ex['noise_multiplier']:.2f} | {fmt(spent)} "
            f"| {fmt(ex['metrics']['rmse'])} | {im['metrics']['recall_at_20']:.4f} | {im['metrics']['ndcg_at_10']:.4f} |"
        )
    # The accountant alone: the noise multiplier each ε allows a round at this q over 300
    # rounds (fedrec.privacy); the σ column above is the update's share of it.
    charged = {e: round(privacy.sigma(e, 1e-6, q, 300), 3) for e in EPSILONS if e}
    print(f"\nnoise multiplier charged per round (fedrec.privacy.sigma): {charged}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nmatplotlib is not installed: no plot (pip install matplotlib)")
        return
    private = [p for p in sweeps["explicit"] if p["target_epsilon"] is not None]
    eps = [p["target_epsilon"] for p in private]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(eps, [p["metrics"]["rmse"] for p in private], "o-", label="federated, DP")
    a.axhline(sweeps["explicit"][-1]["metrics"]["rmse"], ls="--", c="gray", label="non-private")
    a.set(xscale="log", xlabel="ε (δ = 1e-6)", ylabel="RMSE", title="explicit objective")
    a.legend()
    ipriv = [p for p in sweeps["implicit"] if p["target_epsilon"] is not None]
    for key, label in (("recall_at_20", "Recall@20"), ("ndcg_at_10", "NDCG@10")):
        b.plot(eps, [p["metrics"][key] for p in ipriv], "o-", label=label)
        b.axhline(sweeps["implicit"][-1]["metrics"][key], ls="--", c="gray")
    b.set(xscale="log", xlabel="ε (δ = 1e-6)", title="implicit objective (dashed: non-private)")
    b.legend()
    fig.suptitle(f"fedrec on MovieLens-100K: privacy/utility frontier (q = {q:.3f}, 300 rounds)")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nfrontier drawn to {args.plot}")


if __name__ == "__main__":
    main()
