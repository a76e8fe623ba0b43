"""fedrec.privacy: the shared accountants and calibration, and their errors."""

from __future__ import annotations

import math

import pytest

import fedrec
from fedrec import privacy


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    e = privacy.epsilon(0.01, 1.0, 1000, 1e-6)
    assert 0 < e < math.inf
    assert privacy.epsilon(0.01, 1.0, 2000, 1e-6) > e
    assert privacy.epsilon(0.01, 2.0, 1000, 1e-6) < e


def test_pld_is_tighter_than_rdp() -> None:
    rdp = privacy.epsilon(0.01, 1.0, 1000, 1e-6, "rdp")
    pld = privacy.epsilon(0.01, 1.0, 1000, 1e-6, "pld")
    assert 0 < pld < rdp


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_sigma_meets_the_target_and_is_tight(accountant: privacy.Accountant) -> None:
    s = privacy.sigma(2.0, 1e-6, 0.01, 500, accountant)
    assert privacy.epsilon(0.01, s, 500, 1e-6, accountant) <= 2.0
    # 1% less noise overspends: the calibration is not just safe but close.
    assert privacy.epsilon(0.01, s * 0.99, 500, 1e-6, accountant) > 2.0


def test_delta_is_the_inverse_of_epsilon() -> None:
    e = privacy.epsilon(0.05, 1.2, 300, 1e-5)
    assert privacy.delta(0.05, 1.2, 300, e) == pytest.approx(1e-5, rel=1e-3)


def test_a_composition_of_one_event_is_that_event() -> None:
    one = privacy.epsilon(0.02, 1.1, 400, 1e-6)
    assert privacy.epsilon_of_events([(0.02, 1.1, 400)], 1e-6) == one
    assert privacy.epsilon_of_events([(0.02, 1.1, 200), (0.02, 1.1, 200)], 1e-6) == pytest.approx(one, rel=1e-9)


def test_combined_noise_inverts() -> None:
    z = privacy.combined_noise_multiplier(1.0, 5.0)
    assert 0 < z < 1.0
    assert privacy.update_noise_multiplier(z, 5.0) == pytest.approx(1.0, rel=1e-12)
    assert privacy.combined_noise_multiplier(1.0) == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: privacy.epsilon(1.5, 1.0, 10), "sampling probability must be in [0, 1], got 1.5"),
        (lambda: privacy.epsilon(0.1, -1.0, 10), "noise multiplier must be positive and finite, got -1"),
        (lambda: privacy.epsilon(0.1, 1.0, 10, 2.0), "delta must be in (0, 1), got 2"),
        (lambda: privacy.sigma(-1.0, 1e-6, 0.1, 10), "got -1"),
    ],
)
def test_bad_inputs_raise_privacy_error_with_the_cli_message(call, message: str) -> None:
    with pytest.raises(fedrec.PrivacyError) as err:
        call()
    assert message in str(err.value)
    assert isinstance(err.value, fedrec.FedrecError)


def test_unknown_accountant_is_a_config_error() -> None:
    with pytest.raises(fedrec.ConfigError, match="rdp"):
        privacy.epsilon(0.1, 1.0, 10, 1e-6, "moments")  # type: ignore[arg-type]


def test_privacy_agrees_with_the_cli(cli) -> None:
    for accountant in ("rdp", "pld"):
        rep = cli("privacy", "epsilon", "--q", "0.02", "--sigma", "0.9", "--steps", "250", "--accountant", accountant)
        assert privacy.epsilon(0.02, 0.9, 250, 1e-6, accountant) == rep["epsilon"]
    rep = cli("privacy", "sigma", "--epsilon", "3", "--q", "0.02", "--steps", "250", "--delta", "1e-5")
    assert privacy.sigma(3.0, 1e-5, 0.02, 250) == rep["sigma"]


DDP = dict(dim=4096, cohort=1000, min_reports=800, bits=20)


def test_distributed_epsilon_is_at_least_central_and_calibration_meets_it() -> None:
    q, steps, delta = 0.01, 500, 1e-6
    for s in (0.8, 1.0, 2.0):
        central = privacy.epsilon(q, s, steps, delta)
        distributed = privacy.distributed_epsilon(q, s, steps, delta, **DDP)
        # The distributed accountant is never below the central one at the same noise.
        assert distributed >= central, (s, central, distributed)
    s = privacy.distributed_sigma(4.0, delta, q, steps, **DDP)
    assert privacy.distributed_epsilon(q, s, steps, delta, **DDP) <= 4.0
    assert privacy.distributed_epsilon(q, s * 0.99, steps, delta, **DDP) > 4.0


def test_distributed_noise_that_bits_cannot_hold_is_a_privacy_error() -> None:
    # Eight bits cannot hold the sum of a thousand devices.
    with pytest.raises(fedrec.PrivacyError):
        privacy.distributed_epsilon(0.01, 1.0, 100, 1e-6, dim=4096, cohort=1000, min_reports=800, bits=8)
