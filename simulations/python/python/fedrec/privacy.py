"""Privacy accounting: ε of the Poisson-subsampled Gaussian mechanism, and the noise a target ε needs.

These call ``fedrec_shared::privacy`` — the accountants the coordinator's ledger and
``fedrec-sim privacy`` use (RDP, and PLD for tighter numbers), checked against Google's
dp-accounting. ``q`` is the probability that a device takes part in a round (Poisson
sampling), ``sigma`` the noise multiplier, ``steps`` the number of rounds; neighbouring
datasets differ by one user (add or remove).

Invalid inputs raise :class:`fedrec.PrivacyError` with the CLI's message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from . import _fedrec

__all__ = [
    "Accountant",
    "combined_noise_multiplier",
    "delta",
    "epsilon",
    "epsilon_of_events",
    "sigma",
    "distributed_epsilon",
    "distributed_sigma",
    "update_noise_multiplier",
]

Accountant = Literal["rdp", "pld"]


def epsilon(q: float, sigma: float, steps: int, delta: float = 1e-6, accountant: Accountant = "rdp") -> float:
    """ε spent by ``steps`` rounds with sampling probability ``q`` and noise multiplier ``sigma``.

    The same number as ``fedrec-sim privacy epsilon --q Q --sigma S --steps N --delta D``.

    >>> round(epsilon(0.01, 1.0, 1000, 1e-5), 3) > 0
    True
    """
    return _fedrec.privacy_epsilon(q, sigma, steps, delta, accountant)


def epsilon_of_events(
    events: Iterable[tuple[float, float, int]], delta: float = 1e-6, accountant: Accountant = "rdp"
) -> float:
    """ε of a composition of mechanisms, each given as ``(q, sigma, steps)``."""
    return _fedrec.privacy_epsilon_of_events([(float(q), float(s), int(n)) for q, s, n in events], delta, accountant)


def delta(q: float, sigma: float, steps: int, epsilon: float, accountant: Accountant = "rdp") -> float:
    """The smallest δ for which ``steps`` rounds at ``q`` and ``sigma`` are (ε, δ)-DP."""
    return _fedrec.privacy_delta(q, sigma, steps, epsilon, accountant)


def sigma(epsilon: float, delta: float, q: float, steps: int, accountant: Accountant = "rdp") -> float:
    """The smallest noise multiplier for which ``steps`` rounds at ``q`` spend at most ``epsilon``.

    The same calibration as ``fedrec-sim privacy sigma`` and ``fedrec-sim run --epsilon``
    (bisection to a relative tolerance of 1e-4, always on the safe side).
    """
    return _fedrec.privacy_sigma(epsilon, delta, q, steps, accountant)


def distributed_epsilon(
    q: float,
    sigma: float,
    steps: int,
    delta: float,
    *,
    dim: int,
    cohort: int,
    min_reports: int,
    bits: int = 16,
    clip_norm: float = 1.0,
) -> float:
    """ε of ``steps`` rounds of distributed noise (``mechanism = "distributed"``, docs/ddp.md).

    Each round Poisson-samples devices with probability ``q`` (at most ``cohort`` of them) and
    is charged the noise of ``min_reports`` shares; ``sigma`` is the target noise on the sum
    over ``clip_norm``, for updates of length ``dim`` encoded on ``bits`` bits. The accountant
    is the coordinator's ledger's for distributed rounds (DDGauss Proposition 14 with the
    Zhu–Wang bound for sampling), the rounding's inflation of the sensitivity included, so it
    is at least the central :func:`epsilon` of the same ``sigma``.
    """
    return _fedrec.privacy_distributed_epsilon(q, sigma, steps, delta, dim, cohort, min_reports, bits, clip_norm)


def distributed_sigma(
    epsilon: float,
    delta: float,
    q: float,
    steps: int,
    *,
    dim: int,
    cohort: int,
    min_reports: int,
    bits: int = 16,
    clip_norm: float = 1.0,
) -> float:
    """The smallest ``sigma`` for which :func:`distributed_epsilon` is at most ``epsilon``
    (what ``fedrec-sim run --mechanism distributed --epsilon`` calibrates with)."""
    return _fedrec.privacy_distributed_sigma(epsilon, delta, q, steps, dim, cohort, min_reports, bits, clip_norm)


def combined_noise_multiplier(noise_multiplier: float, clip_bits_noise: float | None = None) -> float:
    """The noise multiplier a round is charged: the update's, combined with the noise on the
    clip bits under adaptive clipping (``None``: fixed clipping, the update's alone)."""
    return _fedrec.privacy_combined_noise_multiplier(noise_multiplier, clip_bits_noise)


def update_noise_multiplier(combined: float, clip_bits_noise: float) -> float:
    """The inverse of :func:`combined_noise_multiplier`: the update's share of a combined noise
    multiplier, given the clip bits' noise."""
    return _fedrec.privacy_update_noise_multiplier(combined, clip_bits_noise)
