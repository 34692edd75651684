"""Fixtures: settings for the fake task, an httpx client with the lifespan running, free ports."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from main import create_app
from settings import Settings
from tests import fake_task


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings() -> Settings:
    # The model on one thread of the test process, decoding on arrival: the fake model's record stays in
    # reach. The default (child processes decoding their batches) has tests of its own.
    return Settings(task_module="tests.fake_task", timeout=2.0, max_batch_size=4, max_batch_delay_ms=0,
                    max_queue_size=8, max_upload_bytes=10_000, inference_process=False, model_workers=1,
                    preprocess_in_batch=False)


@pytest.fixture(autouse=True)
def _open_warm_gate() -> Any:
    fake_task.WARM_GATE.set()
    yield
    fake_task.WARM_GATE.set()


@asynccontextmanager
async def serve(settings: Settings, *, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield a client bound to it (no sockets)."""
    app = create_app(settings)
    async with LifespanManager(app) as manager:  # ASGITransport alone skips the lifespan
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if wait_ready:
                await wait_until_ready(client)
            yield client


async def wait_until_ready(client: httpx.AsyncClient, attempts: int = 500) -> None:
    import anyio

    for _ in range(attempts):
        if (await client.get("/readyz")).status_code == 200:
            return
        await anyio.sleep(0.01)
    raise AssertionError("service never became ready")


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as client:
        yield client


@pytest.fixture
def make_client(settings: Settings) -> Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]:
    """A client for these settings with some fields changed: make_client(timeout=0.2)."""

    def _make(wait_ready: bool = True, **changes: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        return serve(Settings(**(settings.model_dump() | changes)), wait_ready=wait_ready)

    return _make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
