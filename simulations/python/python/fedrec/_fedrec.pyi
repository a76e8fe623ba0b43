"""Type stubs of the native module ``fedrec._fedrec`` (PyO3). Use the ``fedrec`` package's functions; these are its building blocks."""

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
RECBOLE_VERSION: str
RECBOLE_WHEEL_SHA256: str
OPTION_NAMES: list[str]

class FedrecError(Exception):
    """Base class of every error fedrec raises."""

class PrivacyError(FedrecError):
    """An accountant or calibration refused its inputs."""

class ConfigError(FedrecError):
    """A keyword argument has an unknown name or an unusable value."""

class DataError(FedrecError):
    """A dataset could not be loaded, split or fetched."""

class MalformedDataError(DataError):
    """A line of a data file does not have the expected shape."""

class FetchError(DataError):
    """Downloading or unpacking a dataset failed."""

class ChecksumError(FetchError):
    """A downloaded file does not have the expected SHA-256 digest."""

class SimulationError(FedrecError):
    """A federation, sweep or audit failed."""

Columns = dict[str, npt.NDArray[Any] | None]

class Dataset:
    """A loaded dataset: dense user and item indices, with the original ids."""

    @property
    def name(self) -> str: ...
    @property
    def n_users(self) -> int: ...
    @property
    def n_items(self) -> int: ...
    @property
    def user_ids(self) -> list[str]: ...
    @property
    def item_ids(self) -> list[str]: ...
    def __len__(self) -> int: ...
    def columns(self) -> Columns:
        """``user``, ``item`` (int64), ``rating`` (float32), ``timestamp`` (int64, -1 where missing; ``None`` when the data has none)."""
    def split(self, test_fraction: float = 0.2, kind: str = "random", seed: int = 1) -> Split:
        """The per-user holdout of ``fedrec-sim --test-fraction --split --seed``."""

class Split:
    """A train/test split over one index space."""

    @property
    def name(self) -> str: ...
    @property
    def n_users(self) -> int: ...
    @property
    def n_items(self) -> int: ...
    @property
    def user_ids(self) -> list[str]: ...
    @property
    def item_ids(self) -> list[str]: ...
    @property
    def kind(self) -> str:
        """``random``, ``temporal`` or ``given``."""
    @property
    def rating_range(self) -> tuple[float, float]: ...
    @property
    def train(self) -> Columns:
        """Training interactions, as :meth:`Dataset.columns`."""
    @property
    def test(self) -> Columns:
        """Held-out interactions, as :meth:`Dataset.columns`."""
    def info(self) -> dict[str, Any]:
        """The ``dataset`` entry of the CLI's reports."""

class Model:
    """The global model after a run, and the device-side parameters that reconstruct users."""

    @property
    def item_factors(self) -> npt.NDArray[np.float32]:
        """``n_items × dim``."""
    @property
    def item_bias(self) -> npt.NDArray[np.float32]: ...
    @property
    def centroids(self) -> npt.NDArray[np.float32]:
        """``n_segments × dim``."""
    @property
    def global_mean(self) -> float: ...
    @property
    def version(self) -> int: ...
    @property
    def objective(self) -> str: ...
    def reconstruct(
        self, items: npt.NDArray[np.int64], values: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], float]:
        """The user vector and bias from interactions (int64 item indices, float32 values)."""
    def scores(self, items: npt.NDArray[np.int64], values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Every item's score for the reconstructed user."""
    def segment(self, user_vector: npt.NDArray[np.float32]) -> tuple[int, float]:
        """The nearest centroid and its squared distance."""
    def evaluate(
        self,
        split: Split,
        relevance_threshold: float | None = None,
        eval_users: int = 10000,
        seed: int = 1,
        threads: int | None = None,
    ) -> dict[str, Any]:
        """The README's metrics on a split, evaluated as the run evaluates."""

def privacy_epsilon(q: float, sigma: float, steps: int, delta: float, accountant: str) -> float: ...
def privacy_epsilon_of_events(events: list[tuple[float, float, int]], delta: float, accountant: str) -> float: ...
def privacy_delta(q: float, sigma: float, steps: int, epsilon: float, accountant: str) -> float: ...
def privacy_sigma(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float: ...
def privacy_distributed_epsilon(
    q: float, sigma: float, steps: int, delta: float, dim: int, cohort: int, min_reports: int, bits: int, clip_norm: float
) -> float: ...
def privacy_distributed_sigma(
    epsilon: float, delta: float, q: float, steps: int, dim: int, cohort: int, min_reports: int, bits: int, clip_norm: float
) -> float: ...
def privacy_combined_noise_multiplier(noise_multiplier: float, clip_bits_noise: float | None = None) -> float: ...
def privacy_update_noise_multiplier(combined: float, clip_bits_noise: float) -> float: ...
def data_default_dir() -> str: ...
def data_fetch_ml100k(data_dir: str | None = None) -> str: ...
def data_ml100k(data_dir: str | None = None) -> Dataset: ...
def data_load_ratings(path: str) -> Dataset: ...
def data_load_train_test(train: str, test: str) -> Split: ...
def data_synthetic(
    users: int,
    items: int,
    seed: int,
    preference_strength: float | None = None,
    popularity_exponent: float | None = None,
) -> Dataset: ...
def data_from_columns(
    users: list[str],
    items: list[str],
    ratings: npt.NDArray[np.float32],
    timestamps: npt.NDArray[np.int64] | None,
    name: str,
) -> Dataset: ...
def simulate(
    split: Split, options: dict[str, Any], on_round: Callable[[dict[str, Any]], Any] | None = None
) -> tuple[dict[str, Any], Model, int | None]: ...
def sweep(
    split: Split,
    epsilons: list[float | None],
    distributed_bits: list[int],
    options: dict[str, Any],
    on_point: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]: ...
def audit_run(
    split: Split,
    canaries: int,
    guesses: int | None,
    confidence: float,
    danger_weaken_noise: float | None,
    options: dict[str, Any],
) -> dict[str, Any]: ...
def run_config(split: Split, options: dict[str, Any]) -> dict[str, Any]: ...
