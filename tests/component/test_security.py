"""CurveZMQ over real loopback sockets: allowed keys get through, unknown and missing keys get nothing."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner

from sdxl_split.cli.keys_cmd import keys
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.protocol import Bye, Heartbeat, Ready, configure_dealer, configure_router, decode, encode
from sdxl_split.shared.security import (
    KeyLayout,
    create_keys,
    is_loopback,
    make_curve_client,
    make_curve_server,
    start_authenticator,
)

QUIET_MS = 1000


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> KeyLayout:
    return create_keys(tmp_path_factory.mktemp("keys") / "k", ["alice"])


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> KeyLayout:
    """A complete, valid key set that the server under test has never heard of."""
    return create_keys(tmp_path_factory.mktemp("other") / "k", ["alice"])


class Link:
    """One context with a CURVE ROUTER on 127.0.0.1 behind the ZAP allow-list, plus any dealers made."""

    def __init__(self, layout: KeyLayout) -> None:
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.auth = start_authenticator(self.ctx, layout.allowed_clients_dir)
        self.router = self.socket(zmq.ROUTER)
        configure_router(self.router)
        make_curve_server(self.router, layout.server_secret)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self.sockets.append(sock)
        return sock

    def dealer(self, secret: Path | None = None, server_public: Path | None = None) -> zmq.Socket:
        sock = self.socket(zmq.DEALER)
        if secret is not None:
            make_curve_client(sock, secret, server_public)
        sock.connect(self.endpoint)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.auth.stop()
        self.ctx.term()


@pytest.fixture()
def link(layout: KeyLayout) -> Iterator[Link]:
    made = Link(layout)
    try:
        yield made
    finally:
        made.close()


def received(sock: zmq.Socket, timeout_ms: int) -> list[bytes] | None:
    if sock.poll(timeout_ms, zmq.POLLIN):
        return sock.recv_multipart(zmq.NOBLOCK)
    return None


def try_send(sock: zmq.Socket, frames: list[bytes]) -> None:
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass  # nothing to queue to: exactly what a refused peer should see


def test_allowed_client_exchanges_messages(link: Link, layout: KeyLayout) -> None:
    alice = layout.clients["alice"]
    dealer = link.socket(zmq.DEALER)
    configure_dealer(dealer)
    make_curve_client(dealer, alice.secret, alice.server_public)
    dealer.setsockopt(zmq.SNDTIMEO, 5000)
    dealer.connect(link.endpoint)
    ready = Ready(credits=2, worker="alice", pid=os.getpid(), device="cpu")
    dealer.send_multipart(encode(ready))

    frames = received(link.router, 5000)
    assert frames is not None, "allowed client's READY never arrived"
    identity, *rest = frames
    assert decode(rest) == ready
    link.router.send_multipart([identity, *encode(Heartbeat())])
    reply = received(dealer, 5000)
    assert reply is not None and decode(reply) == Heartbeat()


@pytest.mark.parametrize("who", ["no-curve", "unknown-key", "wrong-server-key"])
def test_unapproved_clients_get_nothing_through(link: Link, layout: KeyLayout, stranger: KeyLayout,
                                                who: str) -> None:
    if who == "no-curve":
        dealer = link.dealer()
    elif who == "unknown-key":
        # A well-formed pair for the right server, but not on the allow-list.
        dealer = link.dealer(stranger.clients["alice"].secret, layout.clients["alice"].server_public)
    else:
        # An allowed client pointed at a server key it does not match: it must not trust this server.
        dealer = link.dealer(layout.clients["alice"].secret, stranger.clients["alice"].server_public)
    try_send(dealer, encode(Ready(credits=1, worker=who, pid=1, device="cpu")))
    assert received(link.router, QUIET_MS) is None
    assert received(dealer, 200) is None

    # The refusals did not break the server for the allowed client.
    alice = layout.clients["alice"]
    good = link.dealer(alice.secret, alice.server_public)
    good.setsockopt(zmq.SNDTIMEO, 5000)
    good.send_multipart(encode(Bye("still here")))
    frames = received(link.router, 5000)
    assert frames is not None and decode(frames[1:]) == Bye("still here")


def test_create_keys_lays_out_files_per_host(layout: KeyLayout) -> None:
    assert layout.server_secret.parent == layout.encoder_dir
    assert layout.allowed_clients_dir.parent == layout.encoder_dir
    assert sorted(p.name for p in layout.allowed_clients_dir.iterdir()) == ["alice.key"]
    alice = layout.clients["alice"]
    assert alice.secret.name == "alice.key_secret" and alice.server_public.name == "server.key"
    assert alice.server_public.read_text() == layout.server_public.read_text()
    assert not (alice.directory / "server.key_secret").exists()
    for secret in (layout.server_secret, alice.secret):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_create_keys_refuses_to_overwrite_and_bad_names(tmp_path: Path, layout: KeyLayout) -> None:
    with pytest.raises(UserError, match="not an empty folder"):
        create_keys(layout.root, ["bob"])
    for names in ([], ["server"], ["a/b"], [".hidden"], ["x", "x"], ["x" * 65]):
        with pytest.raises(UserError):
            create_keys(tmp_path / "new", names)


def test_missing_or_wrong_key_files_are_user_errors(tmp_path: Path, layout: KeyLayout) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        missing = tmp_path / "nope.key_secret"
        with pytest.raises(UserError, match="sdxl-split keys init DIR") as info:
            make_curve_server(sock, missing)
        assert str(missing) in str(info.value) and "\n" not in str(info.value)
        alice = layout.clients["alice"]
        with pytest.raises(UserError, match="nope.key"):
            make_curve_client(sock, alice.secret, tmp_path / "nope.key")
        with pytest.raises(UserError, match="only a public key"):
            make_curve_client(sock, alice.public, alice.server_public)
        garbage = tmp_path / "garbage.key_secret"
        garbage.write_text("hello\n")
        with pytest.raises(UserError, match="garbage.key_secret"):
            make_curve_server(sock, garbage)
        with pytest.raises(UserError, match="no such folder"):
            start_authenticator(ctx, tmp_path / "no-clients")
        (tmp_path / "empty").mkdir()
        with pytest.raises(UserError, match="no client public keys"):
            start_authenticator(ctx, tmp_path / "empty")
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("endpoint,expected", [
    ("tcp://127.0.0.1:5555", True),
    ("tcp://127.3.4.5:5555", True),
    ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True),
    ("ipc:///tmp/sdxl.sock", True),
    ("inproc://jobs", True),
    ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False),
    ("tcp://192.168.1.20:5555", False),
    ("tcp://[::]:5555", False),
    ("tcp://eth0:5555", False),
    ("tcp://gpu-box.example:5555", False),
    ("tcp://127.0.0.1:5555;10.0.0.2:5555", False),
    ("pgm://127.0.0.1;239.192.1.1:5555", False),
    ("127.0.0.1:5555", False),
])
def test_is_loopback(endpoint: str, expected: bool) -> None:
    assert is_loopback(endpoint) is expected


def test_keys_init_command(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(keys, ["init", str(tmp_path / "k"), "--client", "gpu1", "--client", "gpu2"])
    assert result.exit_code == 0, result.output
    assert "encoder box" in result.output and "GPU box 'gpu2'" in result.output
    assert (tmp_path / "k" / "encoder" / "allowed_clients" / "gpu1.key").is_file()
    assert (tmp_path / "k" / "denoisers" / "gpu2" / "gpu2.key_secret").is_file()
    default = runner.invoke(keys, ["init", str(tmp_path / "d")])
    assert default.exit_code == 0 and (tmp_path / "d" / "denoisers" / "denoiser" / "server.key").is_file()
