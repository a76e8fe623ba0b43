"""fedrec.simulate, sweep, audit and the Model: the same federation as `fedrec-sim`, from Python."""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import pytest

import fedrec
from fedrec import data

# Small and quick: 200 users, 80 items, 12 rounds of 25 devices, evaluated every 4 rounds.
RUN = {"rounds": 12, "clients_per_round": 25, "eval_every": 4, "seed": 11}
CLI_RUN = ["--dataset", "synthetic", "--users", "200", "--items", "80", "--seed", "11",
           "--rounds", "12", "--clients-per-round", "25", "--eval-every", "4", "--quiet"]  # fmt: skip

# What differs between two identical runs: the clocks.
TIMINGS = {"wall_seconds", "train_seconds", "client_updates_per_second"}


def _same_run(py: dict[str, Any], cli: dict[str, Any]) -> None:
    """Every field of the two reports but the timings, compared exactly (floats to the last bit)."""
    assert set(py) == set(cli)
    for key in set(py) - TIMINGS:
        assert py[key] == cli[key], key


def test_simulate_agrees_with_the_cli_to_the_last_digit(cli, small: data.Dataset) -> None:
    res = fedrec.simulate(small, **RUN)
    rep = cli("run", *CLI_RUN)
    _same_run(res.report, rep)
    assert res.metrics["rmse"] == rep["metrics"]["rmse"]  # the headline number, spelled out
    assert [h["metrics"] for h in res.history if h["metrics"]] == [h["metrics"] for h in rep["history"] if h["metrics"]]


def test_a_private_run_agrees_with_the_cli(cli, small: data.Dataset) -> None:
    res = fedrec.simulate(small, epsilon=4.0, dropout=0.1, **RUN)
    rep = cli("run", *CLI_RUN, "--epsilon", "4", "--dropout", "0.1")
    _same_run(res.report, rep)
    assert res.privacy is not None and 0 < res.privacy["epsilon"] <= 4.0
    assert res.config["adaptive_clip"] is True  # --clip auto: adaptive when noisy, as the CLI


def test_distributed_noise_agrees_with_the_cli(cli, small: data.Dataset) -> None:
    dist = {"aggregation": "secure", "mechanism": "distributed", "clip": "fixed", "epsilon": 8.0}
    res = fedrec.simulate(small, **dist, **RUN)  # type: ignore[arg-type]
    rep = cli("run", *CLI_RUN, "--aggregation", "secure", "--mechanism", "distributed", "--clip", "fixed",
              "--epsilon", "8")  # fmt: skip
    _same_run(res.report, rep)
    assert res.config["mechanism"] == "distributed" and res.config["adaptive_clip"] is False


def test_sweep_agrees_with_the_cli(cli, small: data.Dataset) -> None:
    py = fedrec.sweep(small, [2.0, None], **RUN)
    rep = cli("sweep", *CLI_RUN, "--epsilons", "2,inf")
    assert [p["metrics"] for p in py["points"]] == [p["metrics"] for p in rep["points"]]
    assert [p["noise_multiplier"] for p in py["points"]] == [p["noise_multiplier"] for p in rep["points"]]
    assert py["points"][1]["target_epsilon"] is None and py["dataset"] == rep["dataset"]


def test_audit_agrees_with_the_cli(cli, small: data.Dataset) -> None:
    py = fedrec.audit(small, canaries=40, epsilon=8.0, **RUN)
    rep = cli("audit", *CLI_RUN, "--canaries", "40", "--epsilon", "8")
    assert py["audit"] == rep["audit"]
    assert py["epsilon_lower_bound"] <= py["epsilon"]


def test_the_callback_sees_every_round_as_it_ends(small_split: data.Split) -> None:
    seen: list[dict[str, Any]] = []
    res = fedrec.simulate(small_split, on_round=seen.append, **RUN)
    assert [r["round"] for r in seen] == list(range(1, 13))
    assert seen == res.history
    assert [r["round"] for r in seen if r["metrics"]] == [4, 8, 12]


def test_an_exception_in_the_callback_is_raised_after_the_run(small_split: data.Split) -> None:
    calls = []

    def boom(rec: dict[str, Any]) -> None:
        calls.append(rec["round"])
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        fedrec.simulate(small_split, on_round=boom, **RUN)
    assert calls == [1]


def test_returning_false_stops_the_run_after_that_round(small_split: data.Split) -> None:
    calls = []

    def stop_at_3(rec: dict[str, Any]) -> bool:
        calls.append(rec["round"])
        return rec["round"] < 3

    res = fedrec.simulate(small_split, on_round=stop_at_3, **RUN)
    assert calls == [1, 2, 3]
    assert res.stop_requested_round == 3
    assert len(res.history) == 3
    # The first three rounds are the full run's first three, to the last digit.
    full = fedrec.simulate(small_split, **RUN)
    assert res.history == full.history[:3]


def test_the_model_arrays_and_evaluation(small_split: data.Split) -> None:
    res = fedrec.simulate(small_split, **RUN)
    m = res.model
    assert m.item_factors.shape == (small_split.n_items, 32) and m.item_factors.dtype == np.float32
    assert m.item_bias.shape == (small_split.n_items,) and m.centroids.shape == (8, 32)
    assert m.version == 12 and m.objective == "explicit"
    assert np.isfinite(m.item_factors).all() and m.item_factors.any()
    # Evaluating the final model as the run does gives the run's metrics.
    assert fedrec.evaluate(m, small_split, seed=11) == res.metrics
    # A smaller evaluation sample: fewer users ranked.
    assert fedrec.evaluate(m, small_split, seed=11, eval_users=50)["n_eval_users"] <= 50 < res.metrics["n_eval_users"]


def test_reconstruction_is_the_devices_solve(small_split: data.Split) -> None:
    res = fedrec.simulate(small_split, **RUN)
    tr = small_split.train
    mine = tr["user"] == 0
    u, bias = fedrec.reconstruct(res.model, tr["item"][mine], tr["rating"][mine])
    assert u.shape == (32,) and np.isfinite(u).all()
    # The scores are the model's prediction for that user vector.
    scores = res.model.scores(tr["item"][mine], tr["rating"][mine])
    expected = res.model.global_mean + bias + res.model.item_bias + res.model.item_factors @ u
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    seg, dist = res.model.segment(u)
    assert 0 <= seg < 8 and dist >= 0
    with pytest.raises(fedrec.DataError, match="appears more than once"):
        fedrec.reconstruct(res.model, [1, 1], [4.0, 5.0])
    with pytest.raises(fedrec.DataError, match="catalogue"):
        fedrec.reconstruct(res.model, [10_000], [4.0])


def test_bad_options_raise_config_errors(small_split: data.Split) -> None:
    with pytest.raises(fedrec.ConfigError, match='unknown option "roundz"'):
        fedrec.simulate(small_split, roundz=3)  # type: ignore[call-arg]
    with pytest.raises(fedrec.ConfigError, match="possible values: adam, sgd"):
        fedrec.simulate(small_split, optimizer="lbfgs")  # type: ignore[typeddict-item]
    with pytest.raises(fedrec.ConfigError, match="rounds"):
        fedrec.simulate(small_split, rounds="many")  # type: ignore[typeddict-item]
    with pytest.raises(fedrec.ConfigError, match="already split"):
        fedrec.simulate(small_split, test_fraction=0.3)
    with pytest.raises(fedrec.ConfigError, match="config: "):
        fedrec.simulate(small_split, config="/nonexistent/fedrec-config.json")


def test_simulator_errors_carry_the_cli_message(small_split: data.Split, small: data.Dataset) -> None:
    with pytest.raises(fedrec.SimulationError, match="an audit needs a private run"):
        fedrec.audit(small_split, canaries=10, **RUN)
    with pytest.raises(fedrec.SimulationError, match="the test set is empty"):
        fedrec.simulate(small, test_fraction=0.0, **RUN)
    with pytest.raises(fedrec.PrivacyError, match="calibrating the noise to --epsilon: delta must be in"):
        fedrec.simulate(small_split, epsilon=1.0, delta=3.0, **RUN)


def _helper_ran_during_simulate(split: data.Split) -> bool:
    """Whether a waiting Python thread got to run while simulate ran."""
    go = threading.Event()
    flag: list[bool] = []

    def helper() -> None:
        go.wait()
        flag.append(True)

    t = threading.Thread(target=helper)
    t.start()
    go.set()
    fedrec.simulate(split, **RUN)
    during = bool(flag)
    t.join()
    return during


def test_runs_release_the_gil(small_split: data.Split) -> None:
    # With a huge switch interval a thread waiting for the GIL gets it only when the running
    # one lets go of it, so the helper can run during simulate only if the run released the
    # GIL. Without the release no attempt can succeed; with it, one missed attempt (the
    # helper woke too late) is retried.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        assert any(_helper_ran_during_simulate(small_split) for _ in range(5))
    finally:
        sys.setswitchinterval(old)
