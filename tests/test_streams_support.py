"""The fault tests' own redis-server: data survives kill -9, only its PID is killed."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from . import streams_support
from .streams_support import SHARED_REDIS_PORT, RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, imported for the tests here

pytestmark = pytest.mark.redis


def test_data_survives_kill_9_and_restart(redis_server: RedisServer) -> None:
    port = redis_server.port
    with redis_server.client() as client:
        client.xadd("support:stream", {"n": "1"})
        client.rpush("support:list", *range(100))
    first = redis_server.kill()

    redis_server.start()

    assert redis_server.port == port
    assert redis_server.pid != first
    assert (redis_server.aof_directory / "appendonly.aof.manifest").exists()
    with redis_server.client() as client:
        assert client.xlen("support:stream") == 1
        assert client.llen("support:list") == 100


def test_kill_kills_the_pid_it_started(redis_server: RedisServer) -> None:
    pid = redis_server.pid
    with redis_server.client() as client:
        assert client.info("server")["process_id"] == pid

    assert redis_server.kill() == pid

    assert not redis_server.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped: no such process
    assert redis_server.started_pids == [pid]


def test_a_second_server_gets_another_port(redis_server: RedisServer) -> None:
    with RedisServer() as second:
        assert second.port not in {redis_server.port, SHARED_REDIS_PORT}
        with second.client() as client:
            client.set("support:key", "second")
        with redis_server.client() as client:
            assert client.get("support:key") is None
    assert not second.running()
    assert not second.directory.exists()


def test_a_port_taken_before_the_server_binds_it_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        ports = iter([taken])
        choose = streams_support.free_port
        monkeypatch.setattr(streams_support, "free_port", lambda: next(ports, None) or choose())

        with RedisServer(tmp_path) as server:
            assert server.port != taken
            assert len(server.started_pids) == 2
            assert "Address already in use" in server.log_path.read_text()
