"""Service settings, read from the environment (names are case-insensitive)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cpu_runtime import available_cpus


class Settings(BaseSettings):
    """Every knob of the service; each default is listed in the README table."""

    model_config = SettingsConfigDict(extra="ignore")

    # The task module: get_model / preprocess / batch_classification.
    task_module: str = "classification"

    # One deadline per request, from arrival to answer. The seed's name: compose sets `timeout=1.0`.
    timeout: float = Field(default=2.0, gt=0)
    max_batch_size: int = Field(default=8, ge=1)
    max_batch_delay_ms: float = Field(default=0.0, ge=0)
    max_queue_size: int = Field(default=64, ge=1)
    # Admit a request only if the work ahead of it fits in this fraction of its remaining time.
    admit_fraction: float = Field(default=0.7, gt=0, le=1)

    # Model.
    model: str = "efficientnet_lite0"
    model_weights: str | None = None
    top_k: int = Field(default=5, ge=1)
    device: str = "cpu"
    threads: int = Field(default=0, ge=0)  # torch intra-op threads per model worker; 0 = a share of the CPUs
    # Batches computed at once: model child processes (threads without inference_process), one model each.
    model_workers: int = Field(default=2, ge=1)
    preprocess_workers: int = Field(default=1, ge=1)  # threads decoding uploads
    # Decode on arrival, overlapping the model (false), or decode each batch's uploads just before computing
    # it, on the model's side: its own preprocess threads, in the child process with inference_process (true).
    preprocess_in_batch: bool = True
    inference_process: bool = True  # compute in child processes, out of reach of the server's GIL
    malloc_tuning: bool = True  # keep freed activation buffers mapped (glibc mallopt)
    gomp_spincount: int = Field(default=20_000, ge=0)  # idle OpenMP threads spin this long, then sleep
    bf16: bool = False
    torch_compile: bool = False  # torch.compile, one graph per batch size, compiled during warm-up

    # Input limits.
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=50_000_000, ge=1)

    # Process.
    host: str = "0.0.0.0"
    port: int = Field(default=5001, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = False
    log_requests: bool = False

    def torch_threads(self, busy_workers: int | None = None) -> int:
        """Intra-op threads per model worker: THREADS, or the available CPUs divided among the workers
        computing at once (MODEL_WORKERS unless given; 1: a batch alone gets every CPU)."""
        return self.threads or max(1, available_cpus() // (busy_workers or self.model_workers))

    @model_validator(mode="after")
    def _delay_below_timeout(self) -> Settings:
        if self.max_batch_delay_ms / 1000 >= self.timeout:
            raise ValueError(
                f"max_batch_delay_ms ({self.max_batch_delay_ms}) must be below "
                f"timeout ({self.timeout} s): every request would time out"
            )
        return self
