"""CurveZMQ for running the encoder and denoisers on different hosts: key files, the ZAP allow-list, socket setup.

CURVE alone encrypts but lets any client with any key pair in; the ZAP authenticator (`zmq.auth`)
adds the allow-list of client public keys. `create_keys(DIR, ["gpu1", "gpu2"])` writes::

    DIR/encoder/                      copy to the encoder box
        server.key_secret             the server's secret key (keep private)
        server.key                    the server's public key
        allowed_clients/              the allow-list: one public key per GPU box
            gpu1.key
            gpu2.key
    DIR/denoisers/gpu1/               copy to GPU box "gpu1"
        gpu1.key_secret               its secret key (keep private)
        gpu1.key                      its public key (the same file the encoder's allow-list holds)
        server.key                    the server's public key, so it knows whom it is talking to
    DIR/denoisers/gpu2/               likewise for "gpu2"

To admit or revoke a GPU box, add or remove its `.key` file in `allowed_clients/` and restart the encoder.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from sdxl_split.shared.errors import UserError

ENCODER_DIR = "encoder"
DENOISERS_DIR = "denoisers"
ALLOWED_CLIENTS_DIR = "allowed_clients"
SERVER_NAME = "server"
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_Z85_KEY_CHARS = 40
_HOW_TO_CREATE = "create keys with `sdxl-split keys init DIR`"


@dataclass(frozen=True)
class ClientKeys:
    """The files one GPU box needs."""

    name: str
    directory: Path
    secret: Path
    public: Path
    server_public: Path


@dataclass(frozen=True)
class KeyLayout:
    """Where `create_keys` put everything; see the module docstring."""

    root: Path
    encoder_dir: Path
    server_secret: Path
    server_public: Path
    allowed_clients_dir: Path
    clients: dict[str, ClientKeys]


def _private_dir(path: Path) -> Path:
    # 0700 from the start, so secret files are never readable by others, even before their chmod.
    path.mkdir(mode=0o700, parents=True, exist_ok=False)
    return path


def _check_names(clients: list[str]) -> None:
    if not clients:
        raise UserError("name at least one client (GPU box), e.g. --client denoiser")
    for name in clients:
        if not _CLIENT_NAME.fullmatch(name):
            raise UserError(f"client name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
        if name == SERVER_NAME:
            raise UserError(f"client name {SERVER_NAME!r} is reserved for the encoder's key; pick another")
    duplicates = sorted({n for n in clients if clients.count(n) > 1})
    if duplicates:
        raise UserError(f"client name {duplicates[0]!r} is given more than once")


def create_keys(directory: Path, clients: list[str]) -> KeyLayout:
    """Write a server key pair and one key pair per client, laid out per host (see the module docstring).

    Refuses a non-empty `directory` so existing secrets are never overwritten."""
    _check_names(clients)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"{directory} is not an empty folder; pick a new one so no existing keys are overwritten")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        encoder_dir = _private_dir(directory / ENCODER_DIR)
        allowed = _private_dir(encoder_dir / ALLOWED_CLIENTS_DIR)
        server_public, server_secret = map(Path, zmq.auth.create_certificates(encoder_dir, SERVER_NAME))
        server_secret.chmod(0o600)
        made: dict[str, ClientKeys] = {}
        for name in clients:
            box = _private_dir(directory / DENOISERS_DIR / name)
            public, secret = map(Path, zmq.auth.create_certificates(box, name))
            secret.chmod(0o600)
            shutil.copyfile(public, allowed / public.name)
            shutil.copyfile(server_public, box / server_public.name)
            made[name] = ClientKeys(name=name, directory=box, secret=secret, public=public,
                                    server_public=box / server_public.name)
    except OSError as err:
        raise UserError(f"cannot write keys under {directory}: {err.strerror or err}") from None
    return KeyLayout(root=directory, encoder_dir=encoder_dir, server_secret=server_secret,
                     server_public=server_public, allowed_clients_dir=allowed, clients=made)


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(path)
    what = "secret key file (*.key_secret)" if need_secret else "public key file (*.key)"
    if not path.is_file():
        raise UserError(f"{path}: no such {what}; {_HOW_TO_CREATE} and copy the files to this host")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read {what} ({err}); {_HOW_TO_CREATE}") from None
    if len(public) != _Z85_KEY_CHARS or (secret is not None and len(secret) != _Z85_KEY_CHARS):
        raise UserError(f"{path}: holds a malformed key; {_HOW_TO_CREATE}")
    if need_secret and secret is None:
        raise UserError(f"{path} holds only a public key; pass the matching .key_secret file")
    return public, secret


def make_curve_server(sock: zmq.Socket, server_secret_file: Path) -> None:
    """Make `sock` a CURVE server; call before bind. Pair with `start_authenticator`, or any key gets in."""
    public, secret = _load(server_secret_file, need_secret=True)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SERVER, 1)


def make_curve_client(sock: zmq.Socket, client_secret_file: Path, server_public_file: Path) -> None:
    """Make `sock` a CURVE client of the server whose public key is in `server_public_file`; call before connect."""
    public, secret = _load(client_secret_file, need_secret=True)
    server_public, _ = _load(server_public_file, need_secret=False)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)


def start_authenticator(context: zmq.Context, allowed_clients_dir: Path) -> ThreadAuthenticator:
    """Start the ZAP handler that admits only the client public keys (*.key) in `allowed_clients_dir`.

    Start it before the server binds; call `.stop()` on the result before terminating the context."""
    allowed_clients_dir = Path(allowed_clients_dir)
    # zmq.auth logs and carries on when the folder is unreadable, which would silently admit nobody.
    if not allowed_clients_dir.is_dir():
        raise UserError(f"{allowed_clients_dir}: no such folder of allowed client keys; {_HOW_TO_CREATE}")
    keys = sorted(allowed_clients_dir.glob("*.key"))
    if not keys:
        raise UserError(f"{allowed_clients_dir} holds no client public keys (*.key); {_HOW_TO_CREATE}")
    for key in keys:
        _load(key, need_secret=False)
    auth = ThreadAuthenticator(context)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=os.fspath(allowed_clients_dir))
    except BaseException:
        auth.stop()
        raise
    return auth


def is_loopback(endpoint: str) -> bool:
    """Whether `endpoint` stays on this host (tcp to 127.0.0.0/8, ::1 or localhost; ipc; inproc).

    Anything else, including `tcp://*:PORT` and interface names, may be reachable from the network."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    scheme = scheme.lower()
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    # tcp://source;destination: the destination decides where traffic goes.
    address = rest.rsplit(";", 1)[-1]
    if address.startswith("["):
        host, close, _ = address[1:].partition("]")
        if not close:
            return False
    else:
        host = address.rsplit(":", 1)[0] if ":" in address else address
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
