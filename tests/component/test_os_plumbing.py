"""What the unit layer cannot check without a socket, a pipe under a poll, or a child process: the link's socket
options, the stop request's wake-up, and per-thread effects that only a fresh process shows (nice values, OpenMP
teams)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

from sdxl_split.shared.protocol import DEFAULT_MAX_PAYLOAD, MAX_HEADER_BYTES, configure_dealer, configure_router
from sdxl_split.shared.wakeup import StopFlag, Wakeup, watch_stop


def test_socket_helpers_set_the_options() -> None:
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        configure_router(router)
        configure_dealer(dealer, max_payload_bytes=1024)
        for sock in (router, dealer):
            assert 0 < sock.getsockopt(zmq.SNDHWM) and 0 < sock.getsockopt(zmq.RCVHWM)
            assert 0 <= sock.getsockopt(zmq.LINGER) <= 5000
        assert router.getsockopt(zmq.MAXMSGSIZE) > DEFAULT_MAX_PAYLOAD
        assert 1024 < dealer.getsockopt(zmq.MAXMSGSIZE) <= 1024 + MAX_HEADER_BYTES
        assert dealer.getsockopt(zmq.IMMEDIATE) == 1
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def test_a_stop_request_wakes_a_waiting_poll_at_once() -> None:
    wakeup, stop = Wakeup(), StopFlag()
    watch_stop(stop, wakeup)
    poller = zmq.Poller()
    poller.register(wakeup, zmq.POLLIN)
    threading.Timer(0.05, stop.set).start()
    started = time.monotonic()
    assert wakeup.fileno() in dict(poller.poll(10_000)) and time.monotonic() - started < 5.0
    wakeup.clear()
    assert not dict(poller.poll(0)), "cleared: the next poll must wait again, not spin"
    wakeup.close()


def test_yield_cores_lowers_every_thread_not_only_the_caller() -> None:
    """Linux keeps a nice value per thread; a finished Ray encoder's teardown runs on threads other than the one
    that asked. Checked in a child process, since a priority once lowered cannot be raised back."""
    script = textwrap.dedent("""
        import os, threading
        from sdxl_split.shared.threads import yield_cores
        started, release = threading.Event(), threading.Event()
        def other():
            started.set()
            release.wait()
        worker = threading.Thread(target=other)
        worker.start()
        started.wait()
        yield_cores()
        nice = [int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])
                for tid in os.listdir("/proc/self/task")]
        release.set()
        worker.join()
        print(nice)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    nice = json.loads(done.stdout)
    assert len(nice) >= 2 and set(nice) == {19}, nice


# A full-size SDXL record (77 x 2048 per prompt, 157k values each side), decoded on a fresh thread of a process whose
# torch runs 2 threads, as a denoiser's socket thread does. Prints the process's thread count before and after.
DECODE_ON_A_SOCKET_THREAD = """
import os, threading, torch
from protocol_samples import ENTRY, make_record
from sdxl_split.shared.embeddings import decode_embeddings
torch.set_num_threads(2)
data = make_record(ENTRY, width=2048, pooled=1280).to_bytes()
counts = []
def socket_thread():
    counts.append(len(os.listdir("/proc/self/task")))
    decode_embeddings(data)
    counts.append(len(os.listdir("/proc/self/task")))
thread = threading.Thread(target=socket_thread)
thread.start()
thread.join()
print(*counts)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_decoding_a_full_size_record_starts_no_openmp_team() -> None:
    """A second OpenMP team in a denoiser (or an encoder) makes libgomp stop spin-waiting, and the model's own
    team slows down: decoding must not start one on the socket thread."""
    samples = str(Path(__file__).parent.parent / "unit")  # protocol_samples
    path = os.pathsep.join(filter(None, [samples, os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", DECODE_ON_A_SOCKET_THREAD], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split())
    assert after == before, f"decoding started {after - before} thread(s)"
