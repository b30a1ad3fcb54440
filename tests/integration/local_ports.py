"""Free local ports below the ephemeral range (32768+), where outgoing connections never land."""

from __future__ import annotations

import random
import socket

LOWEST = 20_000
HIGHEST = 32_000


def free_port(address: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, drawn at random so parallel tests rarely meet."""
    for port in random.sample(range(LOWEST, HIGHEST), 200):
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port between {LOWEST} and {HIGHEST} on {address}")
