"""The HTTP front over an engine whose denoisers fail every job (after their retries): each API answers 500 in
its own error shape, with the denoisers' reason, and the server keeps serving. In-process (FastAPI's test
client), with an engine that fails each job as it arrives."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from sdxl_split.encoder_service.model_thread import ModelThreadFailed
from sdxl_split.encoder_service.serve_loop import Generation, GenerationListener, ServeLoop
from sdxl_split.http_service.app import create_app
from sdxl_split.http_service.asks import Defaults
from sdxl_split.http_service.broker import Broker
from sdxl_split.http_service.engine import EngineDown
from sdxl_split.http_service.server_state import ModelInfo, ServerSettings, ServerState
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.prompts import PromptEntry

REASON = "RuntimeError: CUDA error: an illegal memory access was encountered"


class FailingEngine:
    """Every job of every request fails, as a dead-lettered job does; what it was asked is kept."""

    def __init__(self) -> None:
        self.generations: list[Generation] = []

    def submit(self, generation: Generation, listener: GenerationListener) -> None:
        self.generations.append(generation)
        for index in range(len(generation.entries)):
            listener.job_failed(index, REASON)

    def cancel(self, request_id: str, reason: str, indexes: tuple[int, ...] | None = None) -> None:
        pass

    def denoisers(self) -> int:
        return 1

    def max_clip_skip(self) -> int | None:
        return None

    def health(self) -> dict:
        return {"status": "ok", "denoisers": 1}


@pytest.fixture()
def client() -> TestClient:
    engine = FailingEngine()
    defaults = Defaults(width=64, height=64, steps=2, guidance=5.0, scheduler="euler", syntax="a1111",
                        preview_every=0)
    settings = ServerSettings(defaults=defaults, model=ModelInfo("tiny", "0123456789"), max_queue=4, version="test")
    app = create_app(ServerState(settings, Broker(engine, max_queue=4)), engine.health)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_a_request_whose_every_job_failed_is_a_500_with_the_reason_in_each_api(client: TestClient) -> None:
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "n_iter": 2})
    assert a1111.status_code == 500 and REASON in a1111.json()["detail"], a1111.text
    openai = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64"})
    assert openai.status_code == 500, openai.text
    error = openai.json()["error"]
    assert REASON in error["message"] and error["type"] == "render_failed"
    assert "Traceback" not in a1111.text + openai.text
    # nothing is held for the failed requests, and the server goes on answering
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["requests"] == 0


def test_the_real_openai_client_raises_its_server_error_with_the_reason(client: TestClient) -> None:
    import openai

    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=client)
    with pytest.raises(openai.InternalServerError) as failed:
        sdk.images.generate(prompt="a fox", size="64x64")
    assert failed.value.status_code == 500 and REASON in str(failed.value)


class DownEngine(FailingEngine):
    """The engine stopped (its serve loop raised): it refuses every request."""

    def submit(self, generation: Generation, listener: GenerationListener) -> None:
        raise EngineDown("RuntimeError: boom")


class FaultyEngine(FailingEngine):
    """Each request fails for a fault of the server's own, as ServeLoop.fail_all or a model-thread bug reports."""

    def submit(self, generation: Generation, listener: GenerationListener) -> None:
        listener.failed("internal error: IndexError: tuple index out of range", internal=True)


def client_of(engine: FailingEngine) -> TestClient:
    defaults = Defaults(width=64, height=64, steps=2, guidance=5.0, scheduler="euler", syntax="a1111",
                        preview_every=0)
    settings = ServerSettings(defaults=defaults, model=ModelInfo("tiny", "0123456789"), max_queue=2, version="test")
    app = create_app(ServerState(settings, Broker(engine, max_queue=2)), engine.health)
    return TestClient(app, raise_server_exceptions=False)


def test_a_request_refused_by_a_stopped_engine_holds_no_place_in_the_queue() -> None:
    with client_of(DownEngine()) as client:
        for _ in range(3):  # more than --max-queue: each is told the engine is down, none that the queue is full
            answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox"})
            assert answer.status_code == 503 and "engine stopped" in answer.text, answer.text
        assert client.get("/health").json()["requests"] == 0


def test_a_fault_of_the_servers_own_is_a_500_not_a_422() -> None:
    with client_of(FaultyEngine()) as client:
        a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox"})
        assert a1111.status_code == 500 and "IndexError" in a1111.text, a1111.text
        openai = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64"})
        assert openai.status_code == 500 and openai.json()["error"]["type"] == "server_error"


def test_once_stopping_the_server_takes_no_new_request() -> None:
    """A keep-alive client's next request, arriving after Ctrl-C cancelled the others, is refused: it would hold
    uvicorn's shutdown for its whole length."""
    engine = FailingEngine()
    broker = Broker(engine, max_queue=4)
    defaults = Defaults(width=64, height=64, steps=2, guidance=5.0, scheduler="euler", syntax="a1111",
                        preview_every=0)
    settings = ServerSettings(defaults=defaults, model=ModelInfo("tiny", "0123456789"), max_queue=4, version="test")
    with TestClient(create_app(ServerState(settings, broker), engine.health), raise_server_exceptions=False) as client:
        broker.cancel_all("the server is stopping")
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox"})
        assert answer.status_code == 503 and "stopping" in answer.text and not engine.generations


def test_a_serve_loop_that_cannot_go_on_tells_every_request_it_holds() -> None:
    """What the engine does when its loop raises: nobody is left waiting for an answer that will never come."""
    heard: list[tuple[str, bool]] = []

    class Listener:
        def failed(self, reason: str, internal: bool = False) -> None:
            heard.append((reason, internal))

    dispatcher = SimpleNamespace(watcher=None, wakeup=threading.Event(), config=SimpleNamespace(heartbeat_s=0.1),
                                 table=SimpleNamespace(give_up_stranded=lambda: None), pump=lambda timeout: None)
    failures = [ModelThreadFailed(RuntimeError("the text model is gone"))]
    model = SimpleNamespace(submit=lambda request: None, take=lambda: [failures.pop()] if failures else [])
    loop = ServeLoop(dispatcher, model, EncodingSettings("test", None, "fp32", False))
    for n in range(2):
        loop.submit(Generation(f"r{n}", (PromptEntry(line=1, prompt="a fox"),)), Listener())
    with pytest.raises(RuntimeError):
        loop.run(threading.Event())
    loop.submit(Generation("r2", (PromptEntry(line=1, prompt="a fox"),)), Listener())  # queued, never read
    loop.fail_all("the engine stopped: RuntimeError: the text model is gone")
    loop.submit(Generation("r3", (PromptEntry(line=1, prompt="a fox"),)), Listener())  # after: told at once
    assert heard == [("the engine stopped: RuntimeError: the text model is gone", True)] * 4
