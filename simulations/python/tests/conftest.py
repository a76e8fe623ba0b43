"""Shared fixtures: small generated data, and the `fedrec-sim` CLI for the parity tests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import fedrec

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def small() -> fedrec.data.Dataset:
    """A 200-user, 80-item synthetic population (seed 11)."""
    return fedrec.data.synthetic(200, 80, seed=11)


@pytest.fixture(scope="session")
def small_split(small: fedrec.data.Dataset) -> fedrec.data.Split:
    return small.split(0.2, "random", 11)


def _cli_command() -> list[str]:
    """`$FEDREC_SIM_BIN` (.ci/python sets it), or `cargo run -p fedrec-sim --release` in this repository."""
    if binary := os.environ.get("FEDREC_SIM_BIN"):
        return [binary]
    return ["cargo", "run", "--quiet", "--locked", "--release", "-p", "fedrec-sim", "--"]


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory):
    """Runs `fedrec-sim ARGS --json FILE` and returns the JSON report."""
    out_dir = tmp_path_factory.mktemp("cli")
    counter = iter(range(1_000_000))

    def run(*args: str) -> dict[str, Any]:
        out = out_dir / f"report-{next(counter)}.json"
        cmd = [*_cli_command(), *args, "--json", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())

    return run
