"""The FastAPI application: the A1111 and OpenAI routes, the API key, one error shape per API (never a traceback),
and /health."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from sdxl_split.http_service import a1111_api, openai_api
from sdxl_split.http_service.asks import FieldProblem
from sdxl_split.http_service.broker import GenerationFailed, QueueFull, Stopping
from sdxl_split.http_service.engine import EngineDown
from sdxl_split.http_service.server_state import RenderFailed, ServerState

OPEN_PATHS = ("/health",)


def _openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _error(request: Request, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    """One error in the shape the API's clients read: OpenAI's envelope, or A1111's (FastAPI's own for a field)."""
    if _openai(request):
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    elif field is not None:
        body = {"detail": [{"loc": ["body", field], "msg": message, "type": "value_error"}]}
    else:
        body = {"error": kind, "detail": message, "body": "", "errors": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _not_json(request: Request, err: RequestValidationError) -> str | None:
    """What to say when the body was not sent as JSON (curl -d without a content type sends a form): the field
    errors FastAPI finds then say nothing of the cause."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type or content_type == "application/json" or content_type.endswith("+json"):
        return None
    if not any(tuple(e.get("loc", ())) == ("body",) for e in err.errors()):
        return None
    return (f"the body must be JSON sent as Content-Type: application/json, not {content_type} "
            "(curl: add -H 'content-type: application/json')")


def _key_given(request: Request, key: str) -> bool:
    """`Authorization: Bearer KEY`, or HTTP Basic with KEY as the password (what A1111 clients can send)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip(), key)
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password, key)
    return False


def create_app(server: ServerState, health: Any) -> FastAPI:
    """`health()`: what /health says of the engine (denoisers attached, a failure)."""
    app = FastAPI(title="sdxl-split", version=server.settings.version, docs_url="/docs", redoc_url=None)
    app.state.server = server
    app.include_router(a1111_api.router)
    app.include_router(openai_api.router)

    @app.middleware("http")
    async def api_key(request: Request, call_next):
        key = server.settings.api_key
        if key and request.url.path not in OPEN_PATHS and not _key_given(request, key):
            return _error(request, 401, "a valid API key is required: send Authorization: Bearer KEY",
                          kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/health")
    async def health_check() -> dict[str, Any]:
        return {**health(), "requests": len(server.broker.active), "max_queue": server.settings.max_queue,
                "model": server.settings.model.title}

    _handlers(app)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        if problem := _not_json(request, err):
            return _error(request, 422, problem)
        first = err.errors()[0] if err.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        if not _openai(request):
            detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                      for e in err.errors()]
            return JSONResponse({"detail": detail}, status_code=422)
        return _error(request, 422, f"{field or 'body'}: {first.get('msg', 'invalid')}", field)

    @app.exception_handler(FieldProblem)
    async def field_problem(request: Request, err: FieldProblem) -> JSONResponse:
        return _error(request, 422, str(err), err.field)

    @app.exception_handler(GenerationFailed)
    async def cannot_encode(request: Request, err: GenerationFailed) -> JSONResponse:
        if err.internal:
            return _error(request, 500, str(err), kind="server_error")
        return _error(request, 422, str(err), "prompt")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull) -> JSONResponse:
        return _error(request, 503, f"the server is busy; try again in {err.retry_after_s} s", kind="server_busy",
                      headers={"Retry-After": str(err.retry_after_s)})

    @app.exception_handler(Stopping)
    async def stopping(request: Request, err: Stopping) -> JSONResponse:
        return _error(request, 503, "the server is stopping; send the request to another", kind="server_stopping")

    @app.exception_handler(EngineDown)
    async def engine_down(request: Request, err: EngineDown) -> JSONResponse:
        return _error(request, 503, f"the engine stopped and serves nothing more: {err}", kind="engine_down")

    @app.exception_handler(RenderFailed)
    async def render_failed(request: Request, err: RenderFailed) -> JSONResponse:
        return _error(request, 500, f"rendering failed: {err}", kind="render_failed")

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:
        return _error(request, 500, f"internal error: {type(err).__name__}: {str(err)[:300]}", kind="internal_error")
