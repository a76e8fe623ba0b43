"""fedrec for researchers: the ``fedrec-sim`` federation, its datasets and its privacy accounting, from Python.

- :mod:`fedrec.privacy` — ε of a mechanism and the noise a target ε needs (RDP and PLD).
- :mod:`fedrec.data` — MovieLens-100K, ratings files, synthetic populations and splits, as
  numpy arrays.
- :func:`simulate` — one federation, the same as ``fedrec-sim run`` (the same code, the same
  defaults, the same numbers for the same seed), with a per-round callback; the trained
  :class:`Model` (item embeddings, biases, centroids as numpy arrays, user reconstruction,
  evaluation).
- :func:`sweep` and :func:`audit` — ``fedrec-sim sweep`` and ``fedrec-sim audit``, returning
  the CLI's JSON reports as dicts.

Runs release the GIL. Errors are :class:`FedrecError` subclasses carrying the CLI's messages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, Unpack

import numpy as np

from . import _fedrec, data, privacy
from ._fedrec import (
    ChecksumError,
    ConfigError,
    DataError,
    FedrecError,
    FetchError,
    MalformedDataError,
    Model,
    PrivacyError,
    SimulationError,
)
from .data import Dataset, Split, SplitKind

__version__: str = _fedrec.__version__

__all__ = [
    "ChecksumError",
    "ConfigError",
    "DataError",
    "Dataset",
    "FedrecError",
    "FetchError",
    "MalformedDataError",
    "Model",
    "PrivacyError",
    "RunOptions",
    "RunResult",
    "SimulationError",
    "Split",
    "audit",
    "data",
    "evaluate",
    "privacy",
    "reconstruct",
    "run_config",
    "simulate",
    "sweep",
]


class RunOptions(TypedDict, total=False):
    """The ``fedrec-sim run`` flags, with underscores. Leave one out for the CLI's default
    (``RunConfig::defaults`` of the objective, as the README's tables use)."""

    config: str | os.PathLike[str]
    """A configuration file (JSON, as ``fedrec-sim tune --out`` writes it); other options override it."""
    objective: Literal["explicit", "implicit"]
    rounds: int
    clients_per_round: int
    dim: int
    segments: int
    l2_user: float
    l2_user_bias: float
    l2_item: float
    l2_item_bias: float
    alpha: float
    optimizer: Literal["adam", "sgd"]
    server_lr: float
    momentum: float
    clip_norm: float
    noise_multiplier: float
    dropout: float
    epsilon: float
    delta: float
    accountant: Literal["rdp", "pld"]
    clip: Literal["auto", "fixed", "adaptive"]
    target_quantile: float
    clip_lr: float
    clip_count_noise: float
    init_std: float
    eval_every: int
    eval_users: int
    threads: int
    seed: int
    transport: Literal["inproc", "quic"]
    checkin_window_ms: int
    report_window_ms: int
    aggregation: Literal["plain", "secure"]
    secagg_dropout: float
    secagg_corrupt: float
    mechanism: Literal["central", "distributed"]
    bits: int
    relevance_threshold: float
    test_fraction: float
    split: SplitKind


@dataclass(frozen=True)
class RunResult:
    """What :func:`simulate` returns."""

    report: dict[str, Any]
    """The report ``fedrec-sim run --json`` writes, key for key."""
    model: Model
    """The final global model."""
    stop_requested_round: int | None = None
    """The round after which ``on_round`` returned ``False`` and the run stopped (``None``: it
    ran all its rounds). The model, metrics and privacy spend are those of the rounds run."""

    @property
    def metrics(self) -> dict[str, Any]:
        """Final metrics: ``rmse`` (explicit only), ``recall_at_20``, ``ndcg_at_10``, ``n_eval_users``, ``n_test_ratings``."""
        return self.report["metrics"]

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per round (``metrics`` on evaluated rounds)."""
        return self.report["history"]

    @property
    def privacy(self) -> dict[str, Any] | None:
        """What the ledger charged (ε, δ, q, noise multipliers, rounds), when the run was noisy."""
        return self.report["privacy"]

    @property
    def config(self) -> dict[str, Any]:
        """The full configuration (noise calibrated): rerunning it reproduces the run."""
        return self.report["config"]

    @property
    def dataset(self) -> dict[str, Any]:
        """What the data was."""
        return self.report["dataset"]

    @property
    def item_factors(self) -> np.ndarray:
        """Item embeddings, ``n_items × dim`` float32."""
        return self.model.item_factors

    @property
    def item_bias(self) -> np.ndarray:
        """Item biases, ``n_items`` float32."""
        return self.model.item_bias

    @property
    def centroids(self) -> np.ndarray:
        """Segment centroids, ``n_segments × dim`` float32."""
        return self.model.centroids


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in opts.items() if v is not None and k not in ("test_fraction", "split")}
    if "config" in out:
        out["config"] = os.fspath(out["config"])
    return out


def _as_split(data: Dataset | Split, opts: dict[str, Any]) -> Split:
    """A Dataset is split as the CLI splits it: ``test_fraction`` (0.2), ``split`` ("random"), ``seed`` (1)."""
    if isinstance(data, Split):
        if "test_fraction" in opts or "split" in opts:
            raise ConfigError("test_fraction and split go with a Dataset; this data is already split")
        return data
    if isinstance(data, Dataset):
        return data.split(opts.get("test_fraction", 0.2), opts.get("split", "random"), opts.get("seed", 1))
    raise ConfigError(f"data must be a fedrec.data.Dataset or Split, not {type(data).__name__}")


def simulate(
    data: Dataset | Split,
    *,
    on_round: Callable[[dict[str, Any]], bool | None] | None = None,
    **options: Unpack[RunOptions],
) -> RunResult:
    """Runs a federation: the same as ``fedrec-sim run`` with the same flags.

    ``data`` is a :class:`~fedrec.data.Split`, or a :class:`~fedrec.data.Dataset` that is
    split as the CLI splits it (``test_fraction``, ``split`` and ``seed``). With
    ``fedrec.data.synthetic(users, items, seed=S)`` and ``seed=S`` this is
    ``fedrec-sim run --dataset synthetic --users U --items I --seed S`` and gives the same
    numbers to the last digit.

    ``on_round(record)`` is called after every round with the round's record (a dict:
    ``round``, ``committed``, ``n_reported``, ``n_dropped``, ``clipped_fraction``,
    ``clip_norm``, ``unclipped_fraction_estimate``, ``metrics`` on evaluated rounds). If it
    raises, the run stops after that round and the exception is re-raised; if it returns
    ``False`` the run stops after that round (early stopping): the result holds the model,
    metrics and privacy spend of the rounds that ran.

    The GIL is released while the rounds run (the callback takes it back briefly).
    """
    opts = dict(options)
    split = _as_split(data, opts)
    report, model, stop = _fedrec.simulate(split, _options(opts), on_round)
    return RunResult(report=report, model=model, stop_requested_round=stop)


def sweep(
    data: Dataset | Split,
    epsilons: Iterable[float | None] = (0.5, 1, 2, 4, 8, 16, None),
    *,
    distributed_bits: Iterable[int] = (),
    on_point: Callable[[dict[str, Any]], bool | None] | None = None,
    **options: Unpack[RunOptions],
) -> dict[str, Any]:
    """A privacy/utility frontier: ``fedrec-sim sweep``, one run per target ε (``None`` or
    ``float('inf')``: the non-private run). Returns the CLI's JSON report (``points``: one
    dict per ε with the calibrated noise, the spend and the metrics). ``on_point(point)`` sees
    each point as it finishes; returning ``False`` ends the sweep there.

    ``distributed_bits`` (``--distributed-bits``, needs ``aggregation="secure"``): at every
    finite ε, the central mechanism and then distributed noise at each of these bit widths;
    a distributed point the bit width cannot reach is left out, as the CLI leaves it out.
    """
    targets = [None if e is None or e == float("inf") else float(e) for e in epsilons]
    opts = dict(options)
    split = _as_split(data, opts)
    return _fedrec.sweep(split, targets, [int(b) for b in distributed_bits], _options(opts), on_point)


def audit(
    data: Dataset | Split,
    *,
    canaries: int = 1000,
    guesses: int | None = None,
    confidence: float = 0.95,
    danger_weaken_noise: float | None = None,
    **options: Unpack[RunOptions],
) -> dict[str, Any]:
    """An empirical privacy audit with canary devices: ``fedrec-sim audit``. Returns the CLI's
    JSON report: the accountant's ``epsilon``, the one-run ``epsilon_lower_bound`` at
    ``confidence``, the canary-cosine estimate. Needs ``epsilon`` or ``noise_multiplier``.

    ``danger_weaken_noise`` divides the released noise while the ledger charges the
    configured noise: a broken mechanism, to show that the audit has power.
    """
    opts = dict(options)
    split = _as_split(data, opts)
    return _fedrec.audit_run(split, canaries, guesses, confidence, danger_weaken_noise, _options(opts))


def run_config(data: Dataset | Split, **options: Unpack[RunOptions]) -> dict[str, Any]:
    """The configuration :func:`simulate` would run with (noise calibrated to ``epsilon``), as
    the ``config`` of the CLI's report — without running."""
    opts = dict(options)
    split = _as_split(data, opts)
    return _fedrec.run_config(split, _options(opts))


def evaluate(
    model: Model,
    split: Split,
    *,
    relevance_threshold: float | None = None,
    eval_users: int = 10_000,
    seed: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """The README's metrics of ``model`` on ``split``, computed the way devices would: each
    held-out user's vector is reconstructed from their training interactions, then their
    held-out interactions are scored. RMSE (explicit objective; predictions clipped to the
    rating range), Recall@20 and NDCG@10 over the items the user did not train on, relevant
    meaning rating ≥ ``relevance_threshold`` (default 4, or every test item on implicit
    data). At most ``eval_users`` users (a fixed sample drawn from ``seed`` when there are
    more), as the run evaluates: with the run's options this equals ``RunResult.metrics``.
    """
    return model.evaluate(split, relevance_threshold, eval_users, seed, threads)


def reconstruct(
    model: Model, items: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, float]:
    """A user's vector and bias from their interactions (dense item indices and ratings, or
    interaction strengths for the implicit objective): the device's closed-form solve."""
    return model.reconstruct(
        np.ascontiguousarray(items, dtype=np.int64), np.ascontiguousarray(values, dtype=np.float32)
    )
