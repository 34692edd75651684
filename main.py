"""The HTTP service: create_app(settings) -> FastAPI. `app` at the bottom is what uvicorn and gunicorn serve.

One request: guard (arrival time, byte limit) -> /cls -> admit? -> preprocess (thread pool)
-> BatchProcessor.submit (queue, batch, inference thread) -> JSON; one deadline bounds it all.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.types import Scope

from batching import BatchProcessor, ItemError, RejectedError
from cpu_runtime import keep_freed_memory, limit_openmp_spinning, torch_threads
from guard import RequestGuard, arrival_time
from inference_process import ModelProcess
from logs import configure_logging
from metrics import Metrics
from settings import Settings
from task import InputTooLargeError, TaskModule, UnsupportedInputError, batch_function

logger = logging.getLogger("service")


class NotReadyError(Exception):
    """The model is still loading or warming up, or the service is shutting down (HTTP 503)."""


class InferenceError(Exception):
    """The batch this request was in failed inside the model (HTTP 500; the traceback is logged)."""


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready; its work was dropped."""


# Looked up along the exception's MRO, most specific first; anything else is a 500.
ERROR_STATUS: dict[type[Exception], int] = {
    InputTooLargeError: 413,
    UnsupportedInputError: 415,
    ValueError: 400,  # the task contract: preprocess raises ValueError on bad input
    RejectedError: 503,
    NotReadyError: 503,
    TimeoutError: 504,
    ClientDisconnectedError: 499,
    InferenceError: 500,
}


class Prediction(BaseModel):
    label: str
    index: int
    score: float


class ClassificationResponse(BaseModel):
    prediction: list[Prediction]


class ErrorResponse(BaseModel):
    detail: str


@dataclass
class ModelSide:
    """Where uploads are decoded and batches computed, as the settings say."""

    handle_batch: Callable[[list[Any]], Sequence[Any]]
    warm_up: Callable[[int], None]
    preprocess: Callable[[bytes], Any] | None  # on arrival; None: each batch decodes its own uploads
    process: ModelProcess | None  # INFERENCE_PROCESS: the models compute in child processes


def _get_model(task: TaskModule, settings: Settings) -> Any:
    torch_threads(settings.torch_threads())  # on the thread that runs the batches: a model worker's share
    return task.get_model(settings)


async def load_model(settings: Settings, model_thread: ThreadPoolExecutor, pool: ThreadPoolExecutor | None
                     ) -> ModelSide:
    """Load the task's model where it will run; a bad MODEL raises here and fails the start."""
    loop = asyncio.get_running_loop()
    process = ModelProcess(settings) if settings.inference_process else None
    try:
        if process and settings.preprocess_in_batch:  # the children decode and compute: no torch in this process
            await loop.run_in_executor(model_thread, process.load)
            return ModelSide(process.handle_batch, process.warm_up, None, process)
        task: TaskModule = importlib.import_module(settings.task_module)
        model = await loop.run_in_executor(model_thread, _get_model, task, settings)
    except BaseException:
        if process:
            process.close()
        raise
    preprocess = None if settings.preprocess_in_batch else partial(task.preprocess, model)
    if process:
        return ModelSide(process.handle_batch, process.warm_up, preprocess, process)
    handle_batch = batch_function(task, model, decode=settings.preprocess_in_batch, pool=pool)
    return ModelSide(handle_batch, partial(task.warm_up, model), preprocess, None)


@dataclass
class Runtime:
    """What the lifespan builds once per process and the routes share."""

    settings: Settings
    model: ModelSide
    batcher: BatchProcessor
    preprocess_pool: ThreadPoolExecutor
    model_thread: ThreadPoolExecutor
    ready: bool = False


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _status_for(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


async def _handle_error(request: Request, exc: Exception) -> JSONResponse:
    status = _status_for(exc)
    if status == 500:
        logger.error("request failed: %r", exc)
    detail = {504: "deadline exceeded: no answer within the timeout"}.get(status, str(exc) or type(exc).__name__)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _until_disconnected(request: Request) -> None:
    # After the body is read, receive() only returns once the client disconnects (or the response is done).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: asyncio.Future[Any]) -> Any:
    """Await `work`, cancelling it (so its batch slot is dropped) if the client disconnects first."""
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        return work.result()
    raise ClientDisconnectedError("client disconnected before the answer was ready")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service for these settings (from the environment when None)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        configure_logging(settings.log_level, settings.log_json)
        if settings.malloc_tuning and not keep_freed_memory():
            logger.warning("MALLOC_TUNING is on but this C library has no glibc mallopt; skipped")
        if not limit_openmp_spinning(settings.gomp_spincount):  # before the task module loads torch
            logger.warning("torch was loaded before the service started: GOMP_SPINCOUNT=%d takes no effect",
                           settings.gomp_spincount)
        # Everything that touches the model (load, warm-up, batches) runs on these threads, one per batch slot.
        model_thread = ThreadPoolExecutor(settings.model_workers, thread_name_prefix="model")
        pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="preprocess")
        # A batch that decodes its uploads uses the pool only if it has threads to spare: with one, the
        # model's thread decodes them itself rather than wait for another thread to do it.
        batch_pool = pool if settings.preprocess_workers > 1 else None
        model = await load_model(settings, model_thread, batch_pool)
        batcher = BatchProcessor(
            model.handle_batch,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            admit_fraction=settings.admit_fraction,
            observer=metrics,
            executor=model_thread,
            max_concurrent_batches=settings.model_workers,
        )
        runtime = Runtime(settings, model, batcher, pool, model_thread)
        runner = asyncio.create_task(batcher.run())
        warming = asyncio.create_task(_warm_up(runtime))
        try:
            yield {"runtime": runtime}
        finally:
            runtime.ready = False
            warming.cancel()
            await batcher.close(runner, drain_timeout_s=settings.timeout)
            pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(model_thread.shutdown, wait=True)
            if model.process:
                await asyncio.to_thread(model.process.close)

    async def _warm_up(runtime: Runtime) -> None:
        # May be slow for a big model: /healthz answers meanwhile, /readyz and /cls say 503.
        started = asyncio.get_running_loop().time()
        try:
            await asyncio.get_running_loop().run_in_executor(runtime.model_thread, runtime.model.warm_up,
                                                             settings.max_batch_size)
        except Exception:
            logger.exception("warm-up failed; the service stays unready")
            return
        metrics.warmed_up(asyncio.get_running_loop().time() - started)
        runtime.ready = True
        logger.info("model warm; ready")

    app = FastAPI(title="Batched image classification", lifespan=lifespan)
    def admit_early(scope: Scope, arrival: float) -> str | None:
        """Refuse an upload before its body is read, when the batcher would refuse it anyway."""
        runtime: Runtime | None = scope.get("state", {}).get("runtime")
        if scope["path"] != "/cls" or runtime is None or not runtime.ready:
            return None  # not an upload, or the route answers "not ready" itself
        try:
            runtime.batcher.admit(arrival + settings.timeout)
        except RejectedError as exc:
            return str(exc)
        return None

    app.add_middleware(RequestGuard, max_body_bytes=settings.max_upload_bytes, metrics=metrics,
                       log_requests=settings.log_requests, admission=admit_early)
    for exc_type in ERROR_STATUS:
        app.add_exception_handler(exc_type, _handle_error)

    error_responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": desc}
        for status, desc in {
            400: "Empty, corrupt, truncated or non-image upload",
            413: "Upload over MAX_UPLOAD_BYTES, or image over MAX_IMAGE_PIXELS",
            415: "A recognised image format that is not supported",
            500: "The model failed on the batch holding this request",
            503: "Overloaded, not ready, or shutting down; retry after Retry-After seconds",
            504: "No answer within the deadline (TIMEOUT seconds from arrival)",
        }.items()
    }

    @app.post("/cls", response_model=ClassificationResponse, responses=error_responses)
    async def classify(request: Request, runtime: RuntimeDep,
                       file: Annotated[UploadFile, File(description="The image to classify")]
                       ) -> ClassificationResponse:
        """Classify one image; answer its top-k ImageNet classes."""
        if not runtime.ready:
            raise NotReadyError("model is not ready yet (loading or warming up)")
        deadline = arrival_time(request) + settings.timeout
        async with asyncio.timeout_at(deadline):
            data = await file.read()
            item: Any = data  # PREPROCESS_IN_BATCH: decoded with its batch
            if runtime.model.preprocess:
                item = await asyncio.get_running_loop().run_in_executor(runtime.preprocess_pool,
                                                                        runtime.model.preprocess, data)
            info: dict[str, float] = {}  # filled by the engine, read by the access log
            request.state.batch = info
            work = asyncio.ensure_future(runtime.batcher.submit(item, deadline, info))
            try:
                result = await _unless_disconnected(request, work)
            except (RejectedError, TimeoutError, ClientDisconnectedError):
                raise
            except ItemError as exc:  # this upload failed its preprocessing inside the batch: a 4xx
                raise exc.error from None
            except Exception as exc:
                raise InferenceError("inference failed for the batch holding this request") from exc
        return ClassificationResponse(prediction=result)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        """Answer while the process lives (liveness)."""
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse, responses={503: {"description": "Not ready"}})
    async def readyz(runtime: RuntimeDep) -> str:
        """Answer 200 once the model is loaded and warm, 503 before and while shutting down."""
        if not runtime.ready:
            raise NotReadyError("not ready")
        return "ready"

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> PlainTextResponse:
        """Prometheus metrics of this process (of all workers under gunicorn)."""
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    return app


if __name__ == "__main__":
    import uvicorn

    _settings = Settings()
    uvicorn.run("main:app", host=_settings.host, port=_settings.port, log_level=_settings.log_level)
else:
    app = create_app()
