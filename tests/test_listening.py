"""Where `python -m app` listens: HTTP and gRPC both on HOST (loopback unless told otherwise), read from the
kernel's table of listening sockets, never by sending traffic anywhere but loopback; a port in use is one line
that names the setting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, address, free_port, harness, listening, start_server

pytestmark = pytest.mark.unit


def test_the_address_reader_reads_ipv4_ipv6_and_mapped_addresses():
    assert address("0100007F") == "127.0.0.1" and address("00000000") == "0.0.0.0"
    assert address("0000000000000000FFFF00000100007F") == "127.0.0.1"
    assert address("00000000000000000000000001000000") == "::1"
    assert address("00000000000000000000000000000000") == "::"


@pytest.mark.server
def test_with_host_loopback_http_and_grpc_listen_on_loopback_only(weights_file, tmp_path):
    grpc_port = free_port()
    server = start_server(tmp_path, GRPC_PORT=str(grpc_port))  # HOST=127.0.0.1, as make run sets it
    try:
        http_port = int(server.url.rsplit(":", 1)[1])
        assert listening(server.process.pid) == {http_port: {"127.0.0.1"}, grpc_port: {"127.0.0.1"}}
    finally:
        server.stop()


def serve(env: dict[str, str], tmp_path: Path) -> subprocess.Popen:
    """python -m app as a user starts it, with exactly these settings added (no HOST unless given)."""
    base = {key: value for key, value in os.environ.items() if key not in ("HOST", "PORT", "GRPC_PORT")}
    return subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**base, "LOG_LEVEL": "warning", "JOBS_DATABASE_URL":
                                            f"sqlite:///{tmp_path / 'jobs.sqlite3'}", **env})


@pytest.mark.server
def test_by_default_both_listen_on_loopback(weights_file, tmp_path):
    http_port, grpc_port = free_port(), free_port()
    process = serve({"PORT": str(http_port), "GRPC_PORT": str(grpc_port)}, tmp_path)  # HOST unset: its default
    try:
        harness.wait_until_ready(f"http://127.0.0.1:{http_port}", process)
        assert listening(process.pid) == {http_port: {"127.0.0.1"}, grpc_port: {"127.0.0.1"}}
    finally:
        process.terminate()
        process.communicate(timeout=60)


@pytest.mark.server
@pytest.mark.parametrize("taken", ["PORT", "GRPC_PORT"])
def test_a_port_in_use_is_one_line_naming_its_setting(weights_file, tmp_path, taken):
    with socket.create_server(("127.0.0.1", 0)) as other:  # another program holds the port
        ports = {"PORT": str(free_port()), "GRPC_PORT": str(free_port()), taken: str(other.getsockname()[1])}
        process = serve({"HOST": "127.0.0.1", **ports}, tmp_path)
        _, stderr = process.communicate(timeout=120)
    protocol = "HTTP" if taken == "PORT" else "gRPC"
    assert process.returncode == 1
    assert stderr.strip() == f"Cannot listen for {protocol} on 127.0.0.1:{ports[taken]} (HOST, {taken}): Address already in use"


@pytest.mark.app
def test_a_port_out_of_range_is_one_line():
    from classifier.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=r"^PORT=70000 must be at most 65535$"):
        Settings.from_env({"PORT": "70000"})


@pytest.mark.server
def test_connections_to_the_http_socket_go_without_nagles_delay():
    """asyncio turns Nagle's algorithm off only on sockets made as TCP (proto IPPROTO_TCP): with it on, a
    response waited for the client's delayed ACK, about 40 ms per request."""
    import asyncio

    import app

    async def accepted_nodelay() -> int:
        listener = app.listening_socket("127.0.0.1", free_port(), "HTTP", "PORT")
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
