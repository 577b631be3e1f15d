"""Process lifecycle: graceful stop on SIGINT/SIGTERM, dying with the parent, and spawning ready-checked children."""

from __future__ import annotations

import ctypes
import importlib
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdxl_split.shared.errors import UserError, first_line, os_error_line

_PR_SET_PDEATHSIG = 1


def stopping_line(signum: int) -> str:
    """What a process that starts to drain says, once: Ctrl-C may be pressed again; a SIGTERM's sender is no user
    at a keyboard."""
    again = "; Ctrl-C again to stop now" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
    return f"stopping: images in flight finish, nothing new starts{again}; re-run the same command to finish"


def install_stop_handlers(stop: threading.Event, announce: bool = True) -> None:
    """First SIGINT/SIGTERM asks for a drain (finish in-flight work, journal, exit); a second one aborts.
    `announce`: say so (the process the user started); `run`'s children leave that to `run`."""

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if announce:
            print(stopping_line(signum), file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (a service run from a worker thread, e.g. a Ray actor)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no child outlives `run` or `bench` (and
    keeps a GPU or 15 GiB of RAM)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    # The parent may have died before prctl took effect; then we were re-parented already. (A parent that
    # is pid 1 itself, as in a container, is fine: only a change counts.)
    if os.getppid() != parent:
        os._exit(1)


def stderr_notice(message: str) -> None:
    """How a child process says something: stderr, which `run` shares with its children."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ChildHooks:
    """What a child tells its parent: ready once (its model is loaded), then its result."""

    ready: Callable[[], None]
    result: Callable[[dict], None]


def child_process(conn: Any, entry: str, verbosity: int = 0) -> None:
    """A child of `run`. It says hello at once, with what CUDA devices torch sees here: `run`'s own process never
    imports torch, and plans the work (device, dtype, file names) from this answer while its children import.
    Then it imports `entry` ("module:function") and calls function(hooks, spec_json) on the spec the parent
    sends; if the parent sends none (nothing to render, bad options), it leaves without doing anything."""

    def body(hooks: ChildHooks) -> None:
        from sdxl_split.shared.devices import local_cuda_devices

        send_json(conn, {"hello": {"cuda_devices": local_cuda_devices()}})
        module, _, function = entry.partition(":")
        main = getattr(importlib.import_module(module), function)
        try:
            message = json.loads(conn.recv_bytes())
        except EOFError:
            return  # the parent is gone; die_with_parent's SIGTERM is on its way
        if isinstance(message, dict) and isinstance(message.get("spec"), str):
            main(hooks, message["spec"])

    run_child(conn, body, verbosity)


def run_child(conn: Any, body: Callable[[ChildHooks], None], verbosity: int = 0) -> None:
    """The preamble every child of `run` shares: die with the parent, quiet libraries, and turn any failure
    into one line on stderr plus an exit code, as the CLI does (the parent names the child that failed)."""
    # Its own process group: a Ctrl-C in the terminal reaches only `run`, which forwards one SIGTERM to each
    # child, so a drain is the same whether the signal went to the group or to `run` alone.
    os.setpgrp()
    die_with_parent()
    import tqdm

    from sdxl_split.shared.quiet import quiet_libraries

    # tqdm guards its writes with a multiprocessing lock by default: a semaphore that a child killed mid-run
    # leaves behind, for the resource tracker to warn about. A thread lock is all one process needs.
    tqdm.tqdm.set_lock(threading.RLock())

    quiet_libraries(verbosity)
    hooks = ChildHooks(ready=lambda: send_json(conn, {"ready": True}),
                       result=lambda payload: send_json(conn, {"result": payload}))
    try:
        body(hooks)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as err:
        print(os_error_line(err), file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as err:  # a bug, not bad input: one line unless asked for more
        if verbosity >= 2:
            import traceback

            traceback.print_exc()
        first = first_line(err, 300)
        print(f"internal error: {type(err).__name__}: {first}", file=sys.stderr, flush=True)
        sys.exit(1)
    exit_now()


def exit_now(code: int = 0) -> None:
    """Leave without the interpreter's teardown: with torch loaded, unloading every module and collecting
    their objects took 0.6 to 1.3 s per process after the last image. Every file this project writes is
    fsynced as it is written and every socket is closed by now, so the teardown has nothing left to save."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class Child:
    name: str
    process: mp.process.BaseProcess
    conn: Any  # the parent's end of a duplex multiprocessing Pipe, carrying JSON bytes only
    # CUDA devices torch sees in the child, from its hello; None until it has said hello.
    cuda_devices: int | None = None
    ready: bool = False
    result: dict | None = None

    def poll_messages(self) -> None:
        """Read whatever the child sent: {"hello": {...}} first, {"ready": true} once its model is loaded, then
        {"result": {...}} at the end."""
        try:
            while self.conn.poll():
                message = json.loads(self.conn.recv_bytes())
                hello = message.get("hello")
                if isinstance(hello, dict) and isinstance(hello.get("cuda_devices"), int):
                    self.cuda_devices = hello["cuda_devices"]
                if message.get("ready"):
                    self.ready = True
                if "result" in message:
                    self.result = message["result"]
        except (EOFError, OSError, json.JSONDecodeError):
            pass

    @property
    def said_hello(self) -> bool:
        return self.cuda_devices is not None

    def send_spec(self, spec_json: str) -> None:
        send_json(self.conn, {"spec": spec_json})


def spawn_child(name: str, entry: str, verbosity: int = 0) -> Child:
    """Start child_process(entry) in a fresh interpreter (spawn: no inherited CUDA or locks)."""
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=True)
    process = ctx.Process(target=child_process, args=(child_end, entry, verbosity), name=name, daemon=False)
    process.start()
    child_end.close()
    return Child(name=name, process=process, conn=parent_end)


def send_json(conn: Any, payload: dict) -> None:
    if conn is not None:
        conn.send_bytes(json.dumps(payload, default=str).encode())


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


def wait_until(children: list[Child], reached: Callable[[Child], bool], what: str, timeout_s: float) -> None:
    """Wait until every child has `reached` a point (said hello, is ready) while watching it is alive, so a crash
    is a message, not a hang. Wakes on each message or exit (no polling interval)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for child in children:
            child.poll_messages()
            if not reached(child) and not child.process.is_alive():
                child.poll_messages()
                if not reached(child):
                    raise UserError(f"{child.name} {describe_exit(child.process.exitcode)} before it was {what}")
        waiting = [child for child in children if not reached(child)]
        if not waiting:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"{', '.join(c.name for c in waiting)} not {what} after {timeout_s:.0f} s")
        mp_connection.wait([c.conn for c in waiting] + [c.process.sentinel for c in waiting], timeout=left)


def wait_for_exit(children: list[Child], timeout_s: float | None = None) -> list[Child]:
    """Wait for all of them together under one deadline (None: for as long as it takes); returns those still
    running."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while running := [c for c in children if c.process.is_alive()]:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        mp_connection.wait([c.process.sentinel for c in running], timeout=left)
    for child in children:
        child.poll_messages()
    return [c for c in children if c.process.is_alive()]
