"""Settings: environment names, defaults, and settings that refuse to start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from settings import Settings


def test_seed_lowercase_timeout_env_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("timeout", "1.0")  # as docker-compose.yml writes it
    monkeypatch.setenv("MAX_BATCH_SIZE", "16")
    settings = Settings()
    assert settings.timeout == 1.0 and settings.max_batch_size == 16


def test_defaults_batch_without_delay_in_two_model_processes() -> None:
    settings = Settings()
    assert (settings.timeout, settings.max_batch_size, settings.max_batch_delay_ms, settings.top_k) == (2.0, 8, 0, 5)
    assert (settings.inference_process, settings.model_workers, settings.preprocess_in_batch) == (True, 2, True)


def test_batch_delay_must_be_below_timeout() -> None:
    with pytest.raises(ValidationError, match=r"max_batch_delay_ms \(3000.0\) must be below timeout \(2.0 s\)"):
        Settings(max_batch_delay_ms=3000)


@pytest.mark.parametrize("field", ["timeout", "max_batch_size", "max_queue_size", "top_k"])
def test_non_positive_values_are_refused(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings.model_validate({field: 0})


def test_openmp_spin_count_defaults_to_20000_and_reads_gomp_spincount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert Settings().gomp_spincount == 20_000
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")  # libgomp's own name, so that both read the same value
    assert Settings().gomp_spincount == 300000


def test_model_workers_share_the_cpus_unless_threads_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("settings.available_cpus", lambda: 8)
    assert Settings(model_workers=1).torch_threads() == 8
    assert Settings().torch_threads() == 4  # two workers by default
    assert Settings(model_workers=16).torch_threads() == 1
    assert Settings(model_workers=2, threads=3).torch_threads() == 3
    assert Settings().torch_threads(busy_workers=1) == 8  # a batch alone: every CPU
    assert Settings(threads=3).torch_threads(busy_workers=1) == 3  # THREADS fixes it
