"""`sdxl-split serve`: an HTTP server speaking A1111's /sdapi/v1 and OpenAI's images API, on the split engine."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from sdxl_split.cli.common import check_bind, check_device, notice, resolve
from sdxl_split.cli.options import DEFAULT_ENDPOINT, Encoding, credits_option, request_encoding_options, threads_option
from sdxl_split.cli.render_cmd import denoiser_spec
from sdxl_split.cli.render_options import lora_serving_options, render_config_from, render_options
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.settings import GlobalOptions


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 for every one (then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True,
              help="HTTP port (7860, A1111's, so clients find it); 0 picks a free one.")
@click.option("--denoisers", type=click.IntRange(0, 16), default=1, show_default=True,
              help="Denoiser processes to start on this machine; 0 serves only remote ones (`render --connect`).")
@click.option("--api-key", default=None, envvar="SDXL_SPLIT_API_KEY",
              help="Require `Authorization: Bearer KEY` (or HTTP Basic with KEY as password) [env SDXL_SPLIT_API_KEY].")
@click.option("--max-queue", type=click.IntRange(1, 10000), default=32, show_default=True,
              help="Requests waiting or rendering at once; more get HTTP 503 with Retry-After.")
@click.option("--preview-every", type=click.IntRange(0, 1000), default=5, show_default=True,
              help="A1111 requests: a preview for /progress every N steps (0: none).")
@click.option("--bind", default=DEFAULT_ENDPOINT, show_default=True, envvar="SDXL_SPLIT_BIND",
              help="ZeroMQ endpoint the denoisers connect to; remote ones join with `render --connect ... --serve`.")
@click.option("--curve", "curve_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Encrypt and authenticate the denoisers with CurveZMQ: the encoder/ folder from `keys init`.")
@credits_option()
@threads_option()
@request_encoding_options
@lora_serving_options
@render_options
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, denoisers: int, api_key: str | None, max_queue: int,
          preview_every: int, bind: str, curve_dir: Path | None, credits: int, threads: int | None, **kw) -> None:
    """Serve SDXL over HTTP to the clients people use: AUTOMATIC1111's API (Open WebUI, SillyTavern,
    LibreChat, webuiapi) at /sdapi/v1, and OpenAI's images API (the openai SDK, Open WebUI) at
    /v1/images/generations, with streamed previews.

    One encoder (its cache shared by every request) feeds the local denoisers and any that join
    from other hosts. A request's size, steps, CFG, sampler, seed and image count travel with its
    jobs; the render options here (--dtype, --vae, --compile, --offload...) are the denoisers' own,
    and the defaults for requests that do not say. Prompts are read as A1111 writes them
    (--prompt-syntax a1111 unless given; <lora:NAME:W> from --lora-dir).

    \b
      sdxl-split serve --vae tiny --dtype fp16
      curl -s localhost:7860/sdapi/v1/txt2img -H 'content-type: application/json' -d '{"prompt": "a lighthouse"}'
    """
    opts: GlobalOptions = ctx.obj
    encoding = Encoding.pop_from(kw)
    _warn_if_open(host, api_key)
    check_bind(bind, curve_dir)
    server, engine = _build(opts, encoding, kw, {"denoisers": denoisers, "bind": bind, "curve_dir": curve_dir,
                                                     "credits": credits, "threads": threads, "api_key": api_key,
                                                     "max_queue": max_queue, "preview_every": preview_every})
    _run(server, engine, host, port)


def _warn_if_open(host: str, api_key: str | None) -> None:
    from sdxl_split.shared.security import is_loopback

    if not api_key and not is_loopback(f"tcp://{host}:1"):
        notice(f"warning: listening on {host} without --api-key: anyone who can reach it can use your GPUs")


def _build(opts: GlobalOptions, encoding: Encoding, kw: dict, options: dict):
    """The engine (encoder, local denoisers) and the HTTP server's state, from the options."""
    from sdxl_split.denoiser_service.spec import ServeSpec
    from sdxl_split.encoder_service.config import EncodeConfig, LinkConfig
    from sdxl_split.http_service.asks import Defaults
    from sdxl_split.http_service.broker import Broker
    from sdxl_split.http_service.engine import Engine, EngineSpec
    from sdxl_split.http_service.server_state import ModelInfo, ServerSettings, ServerState
    from sdxl_split.shared.digests import file_sha256
    from sdxl_split.shared.threads import run_threads

    config = render_config_from(kw)
    source = resolve(opts)
    encoder_threads, denoiser_threads = run_threads(encoding.encoder_device == "cpu", max(1, options["denoisers"]),
                                                    config.device == "cpu")
    denoiser = denoiser_spec(opts, config, encoding, source, threads=denoiser_threads, metadata=kw["metadata"],
                             lora_cache=kw["lora_cache"], fuse_lora=kw["fuse_lora"])
    spec = EngineSpec(
        source=source, settings=encoding.settings(source, opts.cache_dir), cache_dir=opts.cache_dir,
        encoder=EncodeConfig(device=check_device(encoding.encoder_device, "--encoder-device"), dtype=encoding.dtype,
                             threads=options["threads"] or encoder_threads),
        link=LinkConfig(endpoint=options["bind"], curve_dir=options["curve_dir"]), extras=encoding.extras(),
        denoiser=ServeSpec(denoiser=denoiser, endpoint=options["bind"], credits=options["credits"]),
        denoisers=options["denoisers"], verbosity=opts.verbosity)
    engine = Engine(spec, notice)
    identity = denoiser.identity
    # A single file's full sha256 (its first 10 digits are identity.hash; memoised, so read once).
    sha = file_sha256(Path(source.location), opts.cache_dir) if source.kind == "single_file" else None
    model = ModelInfo(identity.name, identity.model_hash[:10], sha, source.spec)
    defaults = Defaults(config.width, config.height, config.steps, config.guidance, config.scheduler,
                        encoding.prompt_syntax, options["preview_every"])
    settings = ServerSettings(defaults, model, options["max_queue"], options["api_key"],
                              str(encoding.lora_dir) if encoding.lora_dir else None, _version())
    return ServerState(settings, Broker(engine, options["max_queue"])), engine


def _version() -> str:
    from importlib.metadata import version

    return f"sdxl-split {version('sdxl-split')}"


def _run(server, engine, host: str, port: int) -> None:
    try:
        import uvicorn

        from sdxl_split.http_service.app import create_app
        from sdxl_split.http_service.stopping_server import StoppingServer
    except ImportError:
        raise UserError("serve needs the serve extra: pip install 'sdxl-split[serve]'") from None
    # IPPROTO_TCP said outright: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP, and
    # with it on every response waited out a delayed ACK (measured: 44 ms per request, against 1 ms).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port") from None
    engine.start()
    bound = listening.getsockname()[1]
    notice(f"serving on http://{host}:{bound}: A1111 /sdapi/v1, OpenAI /v1/images/generations, /health")
    app = create_app(server, engine.health)
    try:
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        StoppingServer(config, server.broker, notice).run(sockets=[listening])
    finally:
        engine.close()
