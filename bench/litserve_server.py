"""The same model served by LitServe with its recommended batching (max_batch_size=8, batch_timeout=0.01).

LitServe decodes each request in `decode_request` inside the inference worker, then calls `predict`
on the batch. Same preprocessing, model call and JSON as the service; /readyz is LitServe's health check.
Run: `python bench/litserve_server.py --port 5003`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the service's modules live in the repo root; spawned workers inherit sys.path

import litserve as ls  # noqa: E402
import numpy as np  # noqa: E402
from fastapi import HTTPException  # noqa: E402

import classification  # noqa: E402
from settings import Settings  # noqa: E402


class ClassifierAPI(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        self.model = classification.get_model(Settings())
        classification.warm_up(self.model, self.max_batch_size)

    # `request` stays unannotated: LitServe reads this annotation as the route's body type, and under
    # PEP 563 it would be a string (a query parameter to FastAPI). Unannotated, LitServe passes the form.
    def decode_request(self, request) -> np.ndarray:  # type: ignore[no-untyped-def]
        try:
            item: np.ndarray = classification.preprocess(self.model, request["file"].file.read())
            return item
        except ValueError as exc:  # LitServe's way to answer 4xx; it fails the whole batch
            raise HTTPException(400, str(exc)) from exc

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs  # batch_classification stacks them itself

    def predict(self, x: list[np.ndarray]) -> list[Any]:
        predictions: list[Any] = classification.batch_classification(self.model, x)
        return predictions

    def encode_response(self, output: Any) -> dict[str, Any]:
        return {"prediction": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5003)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to wait for a batch to fill")
    parser.add_argument("--timeout", type=float, default=2.0, help="request timeout, s (the service's default)")
    args = parser.parse_args()
    api = ClassifierAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, api_path="/cls")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=args.timeout,
                          healthcheck_path="/readyz")
    # No client.py written into the working directory, no per-request access log (as for the other servers).
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
