"""A PostgreSQL server behind a network link that a test can cut: a network partition.

The machine's PostgreSQL is reached through a TCP relay in a network namespace of its own,
joined to this one by a veth pair. :meth:`Partition.cut` takes the namespace's end of the
link down: every packet either way is then dropped and nothing is answered, as when a
switch, a firewall or the database's host goes away, while the sockets stay open on both
sides (unlike a refused connection or a server restart, which the other outage tests
cover). :meth:`Partition.mend` brings the link back, and the same TCP connections go on.

Needs root (``ip netns``, veth), as the test machine and CI have. The relay forwards to
the server's Unix socket, so nothing else on the machine changes.

Run as ``python -m tests.partition relay HOST PORT SOCKET`` inside the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

PG_SOCKET = "/var/run/postgresql/.s.PGSQL.5432"
_REPO = Path(__file__).resolve().parent.parent


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Partition:
    """``url(database)`` reaches PostgreSQL across the link; ``cut()`` and ``mend()``."""

    def __init__(self) -> None:
        tag = os.getpid() % 200 + 20
        self.namespace = f"dgpart{os.getpid()}"
        self.host_link, self.far_link = f"dgh{os.getpid()}", f"dgf{os.getpid()}"
        self.host_ip, self.far_ip = f"10.231.{tag}.1", f"10.231.{tag}.2"
        self._relay: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ns = ("netns", "exec", self.namespace, "ip")
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.far_link)
        _ip("link", "set", self.far_link, "netns", self.namespace)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")
        _ip(*ns, "addr", "add", f"{self.far_ip}/30", "dev", self.far_link)
        _ip(*ns, "link", "set", self.far_link, "up")
        _ip(*ns, "link", "set", "lo", "up")
        # Fixed link-layer addresses both ways: with the link cut, ARP would fail and the
        # kernel answer "no route to host" at once, which is not what a partition looks like.
        for prefix, ip, link, mac in (
            ((), self.far_ip, self.host_link, self._mac(("-n", self.namespace), self.far_link)),
            (("-n", self.namespace), self.host_ip, self.far_link, self._mac((), self.host_link)),
        ):
            _ip(*prefix, "neigh", "replace", ip, "lladdr", mac, "dev", link, "nud", "permanent")
        relay = ["relay", self.far_ip, "5432", PG_SOCKET]
        inside = ["ip", "netns", "exec", self.namespace]
        self._relay = subprocess.Popen(
            [*inside, sys.executable, "-m", "tests.partition", *relay], cwd=_REPO
        )
        deadline = time.monotonic() + 10
        while not self._relay_answers():
            if self._relay.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the relay to PostgreSQL did not start")
            time.sleep(0.05)

    @staticmethod
    def _mac(prefix: tuple[str, ...], link: str) -> str:
        shown = subprocess.run(
            ["ip", *prefix, "-o", "link", "show", link], capture_output=True, text=True, check=True
        ).stdout
        return shown.split("link/ether ", 1)[1].split()[0]

    def _relay_answers(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.far_ip, 5432), timeout=0.5):
                return True
        except OSError:
            return False

    def url(self, database: str) -> str:
        return f"postgresql://postgres@{self.far_ip}:5432/{database}"

    def cut(self) -> None:
        _ip("netns", "exec", self.namespace, "ip", "link", "set", self.far_link, "down")

    def mend(self) -> None:
        _ip("netns", "exec", self.namespace, "ip", "link", "set", self.far_link, "up")

    def stop(self) -> None:
        if self._relay is not None:
            self._relay.kill()
            self._relay.wait(10)
        for args in (("link", "del", self.host_link), ("netns", "del", self.namespace)):
            with contextlib.suppress(RuntimeError):
                _ip(*args)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _relay(host: str, port: int, socket_path: str) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(serve, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] != ["relay"] or len(sys.argv) != 5:
        raise SystemExit("usage: python -m tests.partition relay HOST PORT SOCKET")
    asyncio.run(_relay(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
