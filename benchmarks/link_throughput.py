"""Benchmark: JOB messages/s and DONE round-trip time for full-size SDXL embeddings over ipc:// and tcp loopback.

Run: python benchmarks/link_throughput.py [--messages 2000]
Embeddings are random fp16 tensors with SDXL base's shapes ([1,77,2048] x2, [1,1280] x2, about 0.63 MB a job);
the protocol path is the real one (encode -> zmq -> decode with full validation, including the tensor sha256).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch
import zmq

from sdxl_split.shared import protocol as p
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings, embedding_key
from sdxl_split.shared.prompts import PromptEntry


def full_size_job() -> p.Job:
    entry = PromptEntry(line=1, prompt="a photo of an astronaut riding a horse on mars")
    settings = EncodingSettings(fingerprint="bench", clip_skip=None, dtype="fp16", force_zeros=True)
    tensors = {
        "prompt_embeds": torch.randn(1, 77, 2048, dtype=torch.float16),
        "negative_prompt_embeds": torch.zeros(1, 77, 2048, dtype=torch.float16),
        "pooled_prompt_embeds": torch.randn(1, 1280, dtype=torch.float16),
        "negative_pooled_prompt_embeds": torch.zeros(1, 1280, dtype=torch.float16),
    }
    record = Embeddings(key=embedding_key(entry.texts(), settings), texts=entry.texts(), settings=settings,
                        tensors=tensors)
    return p.Job.build("a" * 64, 1, entry, record)


def echo_worker(endpoint: str, count: int, ready: threading.Event) -> None:
    """A DEALER that decodes every JOB fully (as a denoiser would) and answers DONE."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    p.configure_dealer(sock)
    sock.connect(endpoint)
    sock.send_multipart(p.encode(p.Ready(credits=1, worker="bench", pid=0, device="cpu")))
    ready.set()
    for _ in range(count):
        job = p.decode(sock.recv_multipart())
        assert isinstance(job, p.Job)
        sock.send_multipart(p.encode(p.Done(job_id=job.job_id, attempt=job.attempt, images=(), seconds=0.0)))
    sock.close(linger=1000)


def run(endpoint: str, messages: int) -> dict:
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    p.configure_router(router)
    router.bind(endpoint)
    ready = threading.Event()
    worker = threading.Thread(target=echo_worker, args=(endpoint, messages, ready), daemon=True)
    worker.start()
    identity, _ = router.recv_multipart()[0], None
    frames = p.encode(full_size_job())
    payload_mb = sum(len(f) for f in frames) / 1e6
    rtts = []
    started = time.perf_counter()
    for _ in range(messages):
        sent = time.perf_counter()
        router.send_multipart([identity, *frames])
        done = p.decode(router.recv_multipart()[1:])
        assert isinstance(done, p.Done)
        rtts.append((time.perf_counter() - sent) * 1000)
    elapsed = time.perf_counter() - started
    worker.join()
    router.close(linger=0)
    return {"endpoint": endpoint.split(":")[0], "messages": messages, "job_mb": payload_mb,
            "msgs_per_s": messages / elapsed, "mb_per_s": messages * payload_mb / elapsed,
            "rtt_ms_median": statistics.median(rtts), "rtt_ms_p99": sorted(rtts)[int(0.99 * len(rtts)) - 1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}; one credit "
          "(send, decode+validate, DONE back, repeat): the latency-bound worst case")
    for endpoint in (f"ipc://{tempfile.mkdtemp()}/bench.ipc", "tcp://127.0.0.1:5599"):
        r = run(endpoint, args.messages)
        print(f"{r['endpoint']:>4}: {r['messages']} JOBs of {r['job_mb']:.3f} MB: {r['msgs_per_s']:.0f} msg/s "
              f"({r['mb_per_s']:.0f} MB/s), round trip median {r['rtt_ms_median']:.2f} ms, "
              f"p99 {r['rtt_ms_p99']:.2f} ms")


if __name__ == "__main__":
    main()
