"""API tests: the real app and lifespan through httpx, with tests.fake_task as the model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest

from main import create_app
from settings import Settings
from tests import fake_task
from tests.conftest import serve, wait_until_ready

pytestmark = pytest.mark.anyio
MakeClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def upload(data: bytes = b"cat") -> dict[str, Any]:
    return {"files": {"file": ("x.jpg", data, "image/jpeg")}}


async def wait_entered(model: fake_task.FakeModel) -> None:
    await asyncio.to_thread(model.entered.wait, 5)
    assert model.entered.is_set(), "no batch started"


def metric(text: str, name: str) -> float:
    """The value of one exposition line, e.g. 'requests_dropped_total{reason="expired"}'."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_classify_returns_predictions(client: httpx.AsyncClient) -> None:
    response = await client.post("/cls", **upload(b"tabby"))
    assert response.status_code == 200
    assert response.json() == {"prediction": [{"label": "tabby", "index": 5, "score": 1.0}]}


async def test_missing_file_field_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/cls", files={"image": ("x.jpg", b"cat", "image/jpeg")})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "file"]


@pytest.mark.parametrize(("data", "status", "message"), [
    (b"", 400, "empty upload"),
    (b"bad bytes", 400, "not an image"),
    (b"%PDF-1.7", 415, "unsupported image format PDF"),
    (b"huge", 413, "image is over the pixel limit"),
])
async def test_bad_upload_fails_alone_and_next_request_succeeds(client: httpx.AsyncClient, data: bytes, status: int,
                                                               message: str) -> None:
    response = await client.post("/cls", **upload(data))
    assert response.status_code == status
    assert response.json() == {"detail": message}
    assert (await client.post("/cls", **upload(b"ok"))).status_code == 200
    assert fake_task.latest().batches == [[b"ok"]]  # the bad upload never reached the model


async def test_declared_oversize_body_is_413_without_reading_it(client: httpx.AsyncClient) -> None:
    response = await client.post("/cls", **upload(b"x" * 20_000))
    assert response.status_code == 413
    assert "over the limit of 10000" in response.json()["detail"]
    assert (await client.post("/cls", **upload(b"ok"))).status_code == 200


async def test_streamed_oversize_body_is_413(client: httpx.AsyncClient) -> None:
    boundary = b"b0undary"
    chunks_sent = 0

    async def body() -> AsyncIterator[bytes]:  # chunked: no Content-Length to trust
        nonlocal chunks_sent
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        for _ in range(100):
            chunks_sent += 1
            yield b"x" * 1000
        yield b"\r\n--" + boundary + b"--\r\n"

    response = await client.post("/cls", content=body(),
                                 headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"]
    assert chunks_sent < 100  # reading stopped at the limit
    assert (await client.post("/cls", **upload(b"ok"))).status_code == 200


async def test_deadline_is_504_json_and_work_is_dropped(make_client: MakeClient) -> None:
    async with make_client(timeout=0.3) as client:
        model = fake_task.latest()
        model.gate.clear()
        first = asyncio.create_task(client.post("/cls", **upload(b"first")))
        await wait_entered(model)
        started = time.perf_counter()
        response = await client.post("/cls", **upload(b"late"))
        elapsed = time.perf_counter() - started
        assert response.status_code == 504
        assert response.json() == {"detail": "deadline exceeded: no answer within the timeout"}
        assert elapsed < 0.3 + 0.1
        assert (await first).status_code == 504
        model.gate.set()
        assert (await client.post("/cls", **upload(b"next"))).status_code == 200
        assert [b"late"] not in model.batches and all(b"late" not in batch for batch in model.batches)
        text = (await client.get("/metrics")).text
        assert metric(text, 'requests_dropped_total{reason="expired"}') == 1


async def test_full_queue_is_503_at_once_with_retry_after(make_client: MakeClient) -> None:
    async with make_client(max_queue_size=1, max_batch_size=1) as client:
        model = fake_task.latest()
        model.gate.clear()
        running = asyncio.create_task(client.post("/cls", **upload(b"running")))
        await wait_entered(model)
        queued = asyncio.create_task(client.post("/cls", **upload(b"queued")))
        for _ in range(200):  # until the second request has been preprocessed and queued
            await asyncio.sleep(0.005)
            if b"queued" in model.preprocessed:
                break
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        response = await client.post("/cls", **upload(b"rejected"))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "queue full" in response.json()["detail"]
        assert time.perf_counter() - started < 0.1
        assert b"rejected" not in model.preprocessed

        pulled = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal pulled
            for _ in range(10):
                pulled += 1
                yield b"x" * 500

        refused = await client.post("/cls", content=body(),
                                    headers={"content-type": "multipart/form-data; boundary=b0undary"})
        assert refused.status_code == 503
        assert pulled == 0  # refused at the edge: the upload was never read
        model.gate.set()
        assert (await running).status_code == 200
        assert (await queued).status_code == 200


async def test_batch_failure_is_500_without_traceback_then_recovers(client: httpx.AsyncClient) -> None:
    model = fake_task.latest()
    model.fail_with = RuntimeError("secret internal detail")
    response = await client.post("/cls", **upload(b"boom"))
    assert response.status_code == 500
    assert response.json() == {"detail": "inference failed for the batch holding this request"}
    model.fail_with = None
    assert (await client.post("/cls", **upload(b"fine"))).status_code == 200


async def test_result_count_mismatch_is_500(client: httpx.AsyncClient) -> None:
    fake_task.latest().drop_one_result = True
    assert (await client.post("/cls", **upload(b"lost"))).status_code == 500


async def test_concurrent_posts_share_one_batch(client: httpx.AsyncClient) -> None:
    model = fake_task.latest()
    model.gate.clear()
    first = asyncio.create_task(client.post("/cls", **upload(b"first")))
    await wait_entered(model)
    rest = [asyncio.create_task(client.post("/cls", **upload(f"r{i}".encode()))) for i in range(4)]
    await asyncio.sleep(0.1)  # they queue while the model is busy
    model.gate.set()
    responses = await asyncio.gather(first, *rest)
    assert [r.json()["prediction"][0]["label"] for r in responses] == ["first", "r0", "r1", "r2", "r3"]
    assert model.batches[0] == [b"first"]
    assert sorted(model.batches[1]) == [b"r0", b"r1", b"r2", b"r3"]


async def test_healthz_answers_while_a_batch_blocks(client: httpx.AsyncClient) -> None:
    model = fake_task.latest()
    model.gate.clear()
    blocked = asyncio.create_task(client.post("/cls", **upload(b"slow")))
    await wait_entered(model)
    release = asyncio.get_running_loop().call_later(1.0, model.gate.set)  # the batch blocks for 1 s
    try:
        for _ in range(3):
            started = time.perf_counter()
            assert (await client.get("/healthz")).status_code == 200
            assert time.perf_counter() - started < 0.05
        assert not blocked.done()
    finally:
        release.cancel()
        model.gate.set()
    assert (await blocked).status_code == 200


async def test_not_ready_until_warm(make_client: MakeClient) -> None:
    fake_task.WARM_GATE.clear()
    async with make_client(wait_ready=False) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        response = await client.post("/cls", **upload())
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        fake_task.WARM_GATE.set()
        await wait_until_ready(client)
        assert (await client.post("/cls", **upload())).status_code == 200


async def test_disconnected_client_is_dropped_before_compute(settings: Settings) -> None:
    from asgi_lifespan import LifespanManager

    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await wait_until_ready(client)
            model = fake_task.latest()
            model.gate.clear()
            first = asyncio.create_task(client.post("/cls", **upload(b"first")))
            await wait_entered(model)

            # A raw ASGI request whose client hangs up while it waits in the queue.
            request = client.build_request("POST", "/cls", **upload(b"gone"))
            body = request.read()
            hang_up = asyncio.Event()
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop(0)
                await hang_up.wait()
                return {"type": "http.disconnect"}

            async def send(message: MutableMapping[str, Any]) -> None:
                sent.append(dict(message))

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/cls", "raw_path": b"/cls", "query_string": b"",
                     "root_path": "", "server": ("test", 80), "client": ("127.0.0.1", 1),
                     "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
                     "state": dict(manager._state)}
            async def call_app() -> None:
                await manager.app(scope, receive, send)

            gone = asyncio.create_task(call_app())
            await asyncio.sleep(0.1)  # it is queued behind the held batch
            hang_up.set()
            await asyncio.wait_for(gone, 5)
            model.gate.set()
            assert (await first).status_code == 200
            assert (await client.post("/cls", **upload(b"after"))).status_code == 200
            assert all(b"gone" not in batch for batch in model.batches)
            text = (await client.get("/metrics")).text
            assert metric(text, 'requests_dropped_total{reason="cancelled"}') == 1
            assert sent[0]["status"] == 499


async def test_openapi_documents_cls(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    post = spec["paths"]["/cls"]["post"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ClassificationResponse")
    assert {"400", "413", "415", "422", "500", "503", "504"} <= set(post["responses"])
    assert (await client.get("/docs")).status_code == 200


async def test_metrics_show_batching(client: httpx.AsyncClient) -> None:
    await asyncio.gather(*(client.post("/cls", **upload(b"m")) for _ in range(3)))
    text = (await client.get("/metrics")).text
    assert metric(text, "batch_size_sum") == 3
    assert metric(text, 'http_requests_total{route="/cls",status="200"}') == 3
    assert metric(text, "batch_inference_seconds_count") >= 1
    assert metric(text, "model_warmup_seconds") >= 0


async def test_json_request_log_has_id_status_latency_and_batch(make_client: MakeClient,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    async with make_client(log_requests=True, log_json=True) as client:
        response = await client.post("/cls", headers={"x-request-id": "abc123"}, **upload(b"logged"))
        assert response.status_code == 200
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    [entry] = [e for e in lines if e.get("request_id") == "abc123"]
    assert entry["status"] == 200 and entry["path"] == "/cls" and entry["batch_size"] == 1
    assert entry["latency_ms"] > 0 and entry["level"] == "INFO"


async def test_inference_process_computes_in_a_child_and_survives_its_death(make_client: MakeClient) -> None:
    async with make_client(inference_process=True) as client:
        first = await client.post("/cls", files={"file": ("a", b"child")})
        died = await client.post("/cls", files={"file": ("a", b"exit-process")})
        after = await client.post("/cls", files={"file": ("a", b"again")})
    assert first.status_code == 200 and first.json()["prediction"][0]["label"] == "child"
    assert fake_task.latest().batches == []  # the parent's copy of the model computed nothing
    assert died.status_code == 500 and "Traceback" not in died.text
    assert after.status_code == 200 and after.json()["prediction"][0]["label"] == "again"  # a new child took over


@pytest.mark.parametrize("inference_process", [False, True])
async def test_preprocess_in_batch_fails_a_bad_upload_alone(make_client: MakeClient, inference_process: bool) -> None:
    async with make_client(preprocess_in_batch=True, inference_process=inference_process,
                           max_batch_delay_ms=300) as client:
        uploads = [b"good1", b"%PDF-1.7", b"bad bytes", b"good2"]
        responses = await asyncio.gather(*(client.post("/cls", **upload(data)) for data in uploads))
    assert [r.status_code for r in responses] == [200, 415, 400, 200]
    assert responses[0].json()["prediction"][0]["label"] == "good1"
    assert responses[1].json() == {"detail": "unsupported image format PDF"}
    assert responses[3].json()["prediction"][0]["label"] == "good2"
    if not inference_process:  # the parent's model holds the record; a child's is out of reach
        assert fake_task.latest().preprocessed == [b"good1", b"good2"]
        assert fake_task.latest().batches == [[b"good1", b"good2"]]  # decoded with its batch, then computed


async def test_model_workers_compute_batches_at_once(make_client: MakeClient) -> None:
    async with make_client(model_workers=2, max_batch_size=1) as client:
        model = fake_task.latest()
        model.gate.clear()
        posts = [asyncio.create_task(client.post("/cls", **upload(f"p{i}".encode()))) for i in range(3)]
        for _ in range(500):
            if model.inside == 2:
                break
            await asyncio.sleep(0.01)
        assert model.inside == 2  # two batches of one computing side by side; the third waits for a slot
        model.gate.set()
        responses = await asyncio.gather(*posts)
    assert [r.json()["prediction"][0]["label"] for r in responses] == ["p0", "p1", "p2"]
    assert model.most_inside == 2


@pytest.mark.parametrize("inference_process", [False, True])
async def test_a_model_that_cannot_load_fails_the_start_saying_why(settings: Settings,
                                                                  inference_process: bool) -> None:
    broken = Settings(**(settings.model_dump() | {"model": "broken", "inference_process": inference_process,
                                                  "preprocess_in_batch": True}))
    with pytest.raises(ValueError, match="MODEL=broken is not a model"):  # from the child process, too
        async with serve(broken):
            pass
