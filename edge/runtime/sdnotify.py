"""systemd notification (Type=notify and the watchdog) without a dependency.

The protocol is one datagram per message on the AF_UNIX socket named by
$NOTIFY_SOCKET; outside systemd the variable is unset and every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


class SystemdNotifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET")
        self._address = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_s = int(usec) / 1e6 if usec and usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(0.1)
                sock.sendto(message.encode(), self._address)
        except OSError:
            pass  # systemd gone (shutdown): nothing useful to do

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self, status: str = "") -> None:
        """A reload starts; ``ready()`` says it ended.  systemd (253+) wants the monotonic time with it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")
