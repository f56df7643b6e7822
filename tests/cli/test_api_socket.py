"""`distillery api --workers N` serves on a socket of ours: uvicorn's own multi-process socket
has protocol 0, so asyncio never sets TCP_NODELAY on its connections and every response waits
~40 ms on Nagle + delayed ACK (uvicorn#3149)."""

from __future__ import annotations

import asyncio
import socket
import threading

from app.cli_server import listen_socket
from tests.service_support import api_up, running_stack, wait_until


def _nodelay_of_accepted(sock: socket.socket) -> int:
    """TCP_NODELAY on a connection accepted by an asyncio server over `sock`, as uvicorn runs it."""
    seen: list[int] = []

    async def main() -> None:
        async def handle(reader, writer):
            raw = writer.get_extra_info("socket")
            seen.append(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        await server.wait_closed()

    # In a thread of its own: another test's Playwright may hold an event loop in this one.
    runner = threading.Thread(target=lambda: asyncio.run(main()))
    runner.start()
    runner.join(timeout=30)
    return seen[0]


def test_connections_accepted_on_our_socket_have_nodelay():
    sock = listen_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    assert _nodelay_of_accepted(sock) != 0


def test_a_taken_port_is_a_clear_error():
    import click
    import pytest

    held = listen_socket("127.0.0.1", 0)
    held.listen()
    port = held.getsockname()[1]
    with pytest.raises(click.ClickException, match=f"cannot listen on 127.0.0.1:{port}"):
        listen_socket("127.0.0.1", port)
    held.close()


def test_api_with_two_processes_serves_jobs(tmp_path):
    """Both uvicorn processes answer on the shared socket (PostgreSQL + Redis)."""
    from tests.service_support import TINY_SPEC

    with running_stack(tmp_path, api_workers=2) as stack:
        with stack.client() as c:
            job = c.post("/v1/jobs", json=TINY_SPEC)
            assert job.status_code == 201, job.text
            got = c.get(f"/v1/jobs/{job.json()['id']}")
            assert got.status_code == 200 and got.json()["status"] == "queued"
        # Two server processes came up (uvicorn logs each one's start-up).
        log = tmp_path / "api.log"
        wait_until(
            lambda: log.read_text().count("Application startup complete") >= 2,
            30,
            what="both API processes",
        )
        assert api_up(stack.url)
