"""What a failed ZeroMQ handshake between an encoder and a denoiser means, in words, said once per cause.

ZeroMQ retries a connection whose handshake failed, quietly, forever; only the socket monitor sees why. The
monitor's codes name the cause: a key not on the allow-list (ZAP says 400), a client that encrypted to another
server's key (a cryptographic error), or one side using CURVE and the other not (a mechanism mismatch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

FAILED_HANDSHAKES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_MISMATCH = getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", 0x11000002)
_CRYPTOGRAPHIC = getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", 0x11000001)


def encoder_side(event: int, value: int, curve_dir: Path | None) -> str:
    """What the encoder says of a denoiser whose handshake failed."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"refused a denoiser: its CURVE key is not in {curve_dir}/allowed_clients/; copy its .key file "
                "there and restart this encoder")
    if value == _CRYPTOGRAPHIC:
        return (f"a denoiser failed the CURVE handshake: its server.key is not this encoder's; give it "
                f"{curve_dir}/server.key")
    if value == _MISMATCH:
        if curve_dir is not None:
            return "a denoiser connected without CURVE, and this encoder requires it: start it with --curve"
        return "a denoiser connected with --curve, and this encoder runs without it: add --curve here, or drop it there"
    return "a denoiser's handshake failed (the two sides disagree on CURVE keys)"


def denoiser_side(event: int, value: int, endpoint: str, curve_dir: Path | None) -> str:
    """What a denoiser says of an encoder whose handshake failed."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the encoder at {endpoint} refused this box's CURVE key: add the .key file of {curve_dir} to its "
                "allowed_clients/ and restart it")
    if value == _MISMATCH:
        if curve_dir is not None:
            return f"the encoder at {endpoint} runs without CURVE: drop --curve here, or start it with --curve"
        return f"the encoder at {endpoint} requires CURVE: pass --curve with this box's keys (`sdxl-split keys init`)"
    if curve_dir is not None:
        return (f"the CURVE handshake with {endpoint} failed: {curve_dir}/server.key is not that encoder's key, or it "
                "runs without --curve")
    return f"the handshake with {endpoint} failed: the encoder requires CURVE, or speaks another protocol"


class HandshakeMonitor:
    """A socket's monitor, read on the loop's thread: says each failed handshake's cause once, and counts the
    disconnects those failures cause, so that they are not mistaken for peers that crashed."""

    def __init__(self, socket: zmq.Socket, describe: Callable[[int, int], str], report: Callable[[str], None],
                 said: set[str] | None = None) -> None:
        self.socket = socket.get_monitor_socket(FAILED_HANDSHAKES | zmq.EVENT_DISCONNECTED)
        self._owner = socket
        self._describe = describe
        self._report = report
        # What was said already; shared by the monitors of a socket that reconnects.
        self._said = said if said is not None else set()
        self.failed = 0  # handshakes failed whose disconnect is still to come

    def events(self) -> list[dict]:
        """Handle the failed handshakes waiting on the monitor; return the other events, less the disconnects
        that the failures caused."""
        others = []
        while self.socket.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self.socket)
            if event["event"] & FAILED_HANDSHAKES:
                self.failed += 1
                if (text := self._describe(event["event"], int(event["value"]))) not in self._said:
                    self._said.add(text)
                    self._report(text)
            elif event["event"] == zmq.EVENT_DISCONNECTED and self.failed:
                self.failed -= 1
            else:
                others.append(event)
        return others

    def close(self) -> None:
        try:
            self._owner.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close(linger=0)
