"""The time a frame spends in the gateway, read off the wire: a capture on loopback (tshark).

The end-to-end figures of a bench include the simulators' own scheduling: on a 2-core
machine the stations, the backend and the gateway share the cores, and the stations'
work on the gateway's own traffic delays the backend's receive in a way no gateway code
causes.  The wire shows the gateway alone: the kernel time-stamps the charger's frame as
it reaches the gateway's socket and the gateway's copy as it leaves for the backend (and
the other way), so the difference is the time in the gateway, loop lag and all.

``Capture`` runs ``tshark`` on ``lo`` for the central system's and the backend's ports
(started before the first connection: the websocket dissector needs the handshakes);
``hops`` matches the text frames by OCPP unique id (kept by the gateway, mapped only when a
backend id collides with the gateway's own ``fx-`` ids, which the bench's backend never
sends) and returns the per-frame times in the gateway each way.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

TSHARK = "tshark"
START_TIMEOUT_S = 10.0
DECODE_TIMEOUT_S = 300.0


def available() -> bool:
    return shutil.which(TSHARK) is not None


class Capture:
    def __init__(self, path: Path, ports: tuple[int, int]):
        self.path = path
        self.ports = ports
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        port_filter = " or ".join(f"tcp port {port}" for port in self.ports)
        log = open(self.path.with_suffix(".log"), "wb")
        self.proc = subprocess.Popen([TSHARK, "-i", "lo", "-f", port_filter, "-w", str(self.path), "-q"],
                                     stdout=subprocess.DEVNULL, stderr=log)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while b"Capturing on" not in self.path.with_suffix(".log").read_bytes():
            if self.proc.poll() is not None or loop.time() > deadline:
                raise RuntimeError(f"tshark did not start capturing: {self.path.with_suffix('.log').read_text()}")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _frames(path: Path, ports: tuple[int, int]) -> list[tuple[float, int, int, int, str]]:
    """(time, tcp stream, source port, destination port, text) of every websocket text frame."""
    decode = [arg for port in ports for arg in ("-d", f"tcp.port=={port},http")]
    out = subprocess.run([TSHARK, "-r", str(path), *decode, "-Y", "websocket.payload.text", "-T", "json",
                          "-e", "frame.time_epoch", "-e", "tcp.stream", "-e", "tcp.srcport", "-e", "tcp.dstport",
                          "-e", "websocket.payload.text"],
                         capture_output=True, timeout=DECODE_TIMEOUT_S, check=True).stdout
    frames = []
    for packet in json.loads(out or b"[]"):
        layers = packet["_source"]["layers"]
        at, stream = float(layers["frame.time_epoch"][0]), int(layers["tcp.stream"][0])
        source, destination = int(layers["tcp.srcport"][0]), int(layers["tcp.dstport"][0])
        for text in layers.get("websocket.payload.text", []):
            frames.append((at, stream, source, destination, text))
    return frames


def hops(path: Path, gateway_port: int, backend_port: int, window: tuple[float, float]) -> dict:
    """The time in the gateway of each CALL forwarded in ``window`` (epoch s), each way:
    {"charger_to_backend": [(s, arrived)], "backend_to_charger": [(s, arrived, behind)], "unmatched": n},
    ``arrived`` the epoch time the CALL reached the gateway.

    ``behind``: a CALL of the gateway's own was unanswered on that charger's link while the backend's
    waited in the gateway (sent before the backend's went on, answered after it came), so OCPP's one
    CALL at a time held the backend's until the charger answered."""
    inbound, outbound, own = {}, {}, {}
    for at, stream, source, destination, text in _frames(path, (gateway_port, backend_port)):
        try:
            frame = json.loads(text)
        except ValueError:
            continue
        if not isinstance(frame, list) or len(frame) < 3 or not isinstance(frame[1], str):
            continue
        kind, unique_id = frame[0], frame[1]
        if unique_id.startswith("fx-"):  # the gateway's own CALLs to a charger and their answers
            if destination != gateway_port and kind == 2:
                own.setdefault(stream, {})[unique_id] = [at, None]
            elif destination == gateway_port and kind in (3, 4) and unique_id in own.get(stream, {}):
                own[stream][unique_id][1] = at
            continue
        if kind != 2:
            continue
        if destination == gateway_port:  # charger -> gateway
            inbound[("up", unique_id)] = (at, stream)
        elif destination == backend_port:  # gateway -> backend
            outbound[("up", unique_id)] = (at, stream)
        elif source == backend_port:  # backend -> gateway
            inbound[("down", unique_id)] = (at, stream)
        elif source == gateway_port:  # gateway -> charger
            outbound[("down", unique_id)] = (at, stream)
    start, end = window
    result = {"charger_to_backend": [], "backend_to_charger": [], "unmatched": 0}
    for key, (arrived, _stream) in inbound.items():
        if not start <= arrived < end:
            continue
        if key not in outbound:
            result["unmatched"] += 1
            continue
        left, charger_stream = outbound[key]
        if key[0] == "up":
            result["charger_to_backend"].append((left - arrived, arrived))
        else:
            behind = any(sent < left and (answered is None or answered > arrived)
                         for sent, answered in own.get(charger_stream, {}).values())
            result["backend_to_charger"].append((left - arrived, arrived, behind))
    return result
