"""The server most people write first: a sync route that classifies each upload alone (batch of 1).

FastAPI runs a sync `def` route in its thread pool, so concurrent requests call the model at the
same time from several threads, unbatched. Same model, preprocessing and JSON as the service.
Run: `python bench/naive_server.py --port 5002`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the service's modules live in the repo root

import uvicorn  # noqa: E402
from fastapi import FastAPI, File, HTTPException, UploadFile  # noqa: E402
from fastapi.responses import PlainTextResponse  # noqa: E402

import classification  # noqa: E402
from settings import Settings  # noqa: E402

model = classification.get_model(Settings())
classification.warm_up(model, 1)
app = FastAPI(title="Naive classifier")


@app.post("/cls")
def classify(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    """Classify one image on its own."""
    try:
        item = classification.preprocess(model, file.file.read())
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return {"prediction": classification.batch_classification(model, [item])[0]}


@app.get("/healthz", response_class=PlainTextResponse)
def healthz() -> str:
    return "ok"


@app.get("/readyz", response_class=PlainTextResponse)
def readyz() -> str:
    return "ready"  # the model is loaded and warm before the app exists


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5002)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
