"""Shared pieces of the Redis Streams fault tests: a redis-server of the test's own, and workers.

`RedisServer` runs ``redis-server`` as a child process of the test, on a free loopback port,
with the append-only file fsynced at every write (``appendfsync always``): what a command was
answered for is on disk, so it is back after ``kill -9`` and a restart. The test kills exactly
that server's PID and never touches the shared Redis on 6379.

`Workers` runs ``python -m aioevents worker tests.streams_worker_app:bus`` processes (see
tests/streams_worker_app.py for the environment they read and the ledger they write), and
signals only the PIDs it started.

Waits are bounded but generous (a loaded 2-core machine is slow); they fail with the log of
the process that did not answer.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import anyio.to_thread
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "SHARED_REDIS_PORT",
    "RedisServer",
    "RedisServerError",
    "Workers",
    "free_port",
    "redis_server",
]

SHARED_REDIS_PORT = 6379  # the shared server: never chosen, never connected to here
HOST = "127.0.0.1"
START_DEADLINE = 60.0  # seconds for a server to answer PING (AOF loaded) after it was started
STOP_DEADLINE = 30.0  # seconds for a server to exit on SIGTERM before it is killed
PORT_ATTEMPTS = 20  # ports tried when the chosen one was taken before the server bound it
AOF_DIRECTORY = "appendonlydir"  # Redis 7's multi-part AOF: a manifest, base and incr files

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKER_COMMAND = [sys.executable, "-m", "aioevents", "worker", "tests.streams_worker_app:bus"]
WORKER_STOP_DEADLINE = 90.0  # seconds for a worker to exit on SIGTERM (its drain_timeout is 30)
WORKER_START_DEADLINE = 90.0  # seconds for a worker to import its bus and join its groups
# what `python -m aioevents worker` logs once its consumer runs: its consumer name
WORKER_RUNNING = re.compile(r"worker (\S+) running; groups: ")


class RedisServerError(RuntimeError):
    """The test's redis-server did not start, or did not stop."""


class _PortTaken(Exception):
    """Another socket had the port when the server tried to bind it."""


# -- ports ---------------------------------------------------------------------------------------


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nobody listens on now, below the ephemeral range.

    Below it, because a client connection (ours, or any other process's) may be given an
    ephemeral port as its local address while the server is down between a kill and its
    restart, and then the server could not bind its own port again.
    """
    low = 10_000
    high = max(low + 1_000, _ephemeral_low()) - 1
    for _ in range(1_000):
        port = random.randint(low, high)
        if port != SHARED_REDIS_PORT and _bindable(port):
            return port
    raise RedisServerError(f"no free port found between {low} and {high}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


# -- the server ------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server child process with its data in ``directory`` (kept across restarts).

    The port is chosen at the first `start` and kept: `restart` brings the same server back on
    the same port and data, so clients holding `url` reconnect to it.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._own_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="aioevents-redis-")) if directory is None else directory
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / "redis.log"
        self.started_pids: list[int] = []  # every server process started, in order
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # what tests read

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        """The PID of the running server."""
        if self._process is None or self._process.poll() is not None:
            raise RedisServerError(f"no server is running on port {self._port}")
        return self._process.pid

    @property
    def aof_directory(self) -> Path:
        return self.directory / AOF_DIRECTORY

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        """A synchronous client of this server (the caller closes it)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=30, socket_connect_timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # starting and stopping

    def start(self) -> None:
        """Start the server and wait until it answers, its append-only file loaded."""
        if self.running():
            raise RedisServerError(f"the server is already running (pid {self.pid})")
        if self._port is not None:
            self._start_on_kept_port(self._port)
            return
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            try:
                self._launch(port)
            except _PortTaken:
                continue  # taken between the probe and the server's bind: choose another
            self._port = port
            return
        raise RedisServerError(f"{PORT_ATTEMPTS} ports were taken:\n{self.log_tail()}")

    def _start_on_kept_port(self, port: int) -> None:
        """Clients know this port: wait for whoever took it to let it go, within the deadline."""
        deadline = time.monotonic() + START_DEADLINE
        while True:
            try:
                self._launch(port)
                return
            except _PortTaken:
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"port {port} stayed taken for {START_DEADLINE:.0f} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.5)

    def _launch(self, port: int) -> None:
        if port == SHARED_REDIS_PORT:
            raise RedisServerError("the shared Redis port is never used by a test server")
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            log.write(f"--- aioevents test: starting on port {port}\n".encode())
            log.flush()
            log_start = log.tell()
            process = subprocess.Popen(
                self._command(port),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._process = process
        self.started_pids.append(process.pid)
        self._wait_until_ready(process, port, log_start)

    def _command(self, port: int) -> list[str]:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RedisServerError("redis-server is not on PATH")
        return [
            executable,
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",  # answered means on disk: nothing lost to a kill -9
            "--appenddirname", AOF_DIRECTORY,
            "--save", "",  # no RDB snapshots: the AOF alone is the data
            "--daemonize", "no",  # our child: its PID is the server's
            "--loglevel", "notice",
        ]  # fmt: skip

    def _wait_until_ready(
        self, process: subprocess.Popen[bytes], port: int, log_start: int
    ) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while process.poll() is None:
            if self._answers(process, port):
                return
            if time.monotonic() > deadline:
                self._kill_process(process)
                raise RedisServerError(
                    f"redis-server (pid {process.pid}) did not answer on port {port} within "
                    f"{START_DEADLINE:.0f} s:\n{self._log_since(log_start)}"
                )
            time.sleep(0.05)
        log = self._log_since(log_start)
        if "Address already in use" in log:
            raise _PortTaken(port)
        raise RedisServerError(
            f"redis-server on port {port} exited with {process.returncode}:\n{log}"
        )

    def _answers(self, process: subprocess.Popen[bytes], port: int) -> bool:
        """Whether our process (not another server that holds the port) answers, loaded."""
        client = redis.Redis(
            host=HOST,
            port=port,
            socket_timeout=5,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),  # redis-py retries 3 times by default: 4x the wait
        )
        try:
            server = client.info("server")
            if server.get("process_id") != process.pid:
                return False  # someone else's server: ours will fail to bind and exit
            if client.info("persistence").get("loading"):
                return False
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def kill(self) -> int:
        """``kill -9`` the running server (exactly its PID) and wait for it; return the PID."""
        pid = self.pid
        assert self._process is not None
        self._kill_process(self._process)
        return pid

    @staticmethod
    def _kill_process(process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)  # Popen signals only while its child is unreaped
        process.wait()

    def restart(self) -> None:
        """Kill the server if it runs, and start it again on the same port and data."""
        if self.running():
            self.kill()
        self.start()

    def stop(self) -> None:
        """Shut the server down (SIGTERM, then SIGKILL past the deadline); idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self._kill_process(process)

    def close(self) -> None:
        """Stop the server; remove its directory if this object made it."""
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # for async tests: starting waits in a thread, so the event loop (consumers) goes on

    async def astart(self) -> None:
        await anyio.to_thread.run_sync(self.start)

    async def arestart(self) -> None:
        await anyio.to_thread.run_sync(self.restart)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _require_redis_server() -> None:
    """Skip when redis-server is missing; fail under CI, which must run the fault tests."""
    if shutil.which("redis-server") is not None:
        return
    message = "redis-server is not on PATH"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run the fault tests", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server of this test's own (AOF, fsync always), stopped afterwards.

    Import it into the test module that uses it: ``from .streams_support import redis_server``,
    and name it in the module's ``__all__`` (so that linters see the import used).
    Its data and log stay in the test's tmp_path.
    """
    _require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        yield server


# -- worker processes ------------------------------------------------------------------------------


class Workers:
    """The worker processes of one test; only those it started are signalled, by their PID.

    ``environment`` is what tests/streams_worker_app.py reads (see its `environment`); each
    worker's output goes to ``logs/worker-<n>.log``. As a context manager it kills the
    workers still running at its end, whatever happened::

        with Workers(environment(server.url, prefix, ledger), tmp_path / "logs") as workers:
            first, second, third = workers.start_many(3)
            ...
            workers.kill(first)  # kill -9
            ...
            assert set((await workers.stop()).values()) == {0}  # SIGTERM: drained, exit 0
    """

    def __init__(
        self,
        environment: Mapping[str, str],
        logs: Path,
        command: Sequence[str] = tuple(WORKER_COMMAND),
    ) -> None:
        self.environment = {**os.environ, **environment}
        self.command = list(command)  # another worker app: tests/otel_worker_app.py
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen[bytes]] = []
        self.killed: list[int] = []  # PIDs this test killed with SIGKILL
        self.terminated: list[int] = []  # PIDs this test sent SIGTERM

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill_survivors()

    def start(self, *arguments: str) -> subprocess.Popen[bytes]:
        """Start one worker; ``arguments`` go to the CLI (``--concurrency``, ``--handler``)."""
        index = len(self.started)
        with (self.logs / f"worker-{index}.log").open("wb") as log:  # the child has its own
            process = subprocess.Popen(
                [*self.command, *arguments],
                cwd=PROJECT_ROOT,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.append(process)
        return process

    def start_many(self, count: int, *arguments: str) -> list[subprocess.Popen[bytes]]:
        return [self.start(*arguments) for _ in range(count)]

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [process for process in self.started if process.poll() is None]

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """``kill -9``: no drain, its pending entries are left for others to claim."""
        self._own(process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.killed.append(process.pid)

    def terminate(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM: the worker drains and leaves; `wait_exit` for its exit code."""
        self._own(process)
        process.send_signal(signal.SIGTERM)
        self.terminated.append(process.pid)

    async def wait_exit(
        self, process: subprocess.Popen[bytes], within: float = WORKER_STOP_DEADLINE
    ) -> int:
        """Wait for the worker to exit (without blocking the event loop); its exit code."""
        self._own(process)
        deadline = time.monotonic() + within
        while process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"worker (pid {process.pid}) still running after {within:.0f} s:\n"
                    f"{self.log_tail(process)}"
                )
            await asyncio.sleep(0.05)
        return process.returncode

    async def wait_running(
        self, process: subprocess.Popen[bytes], within: float = WORKER_START_DEADLINE
    ) -> str:
        """Wait until the worker's consumer runs (its log says so); its consumer name, as in
        the groups' consumer lists."""
        self._own(process)
        deadline = time.monotonic() + within
        while True:
            found = WORKER_RUNNING.search(self.log_text(process))
            if found:
                return found.group(1)
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"worker (pid {process.pid}) did not start running within {within:.0f} s "
                    f"(exit code {process.poll()}):\n{self.log_tail(process)}"
                )
            await asyncio.sleep(0.05)

    async def stop(self, within: float = WORKER_STOP_DEADLINE) -> dict[int, int]:
        """SIGTERM every running worker, wait for all; their exit codes by PID."""
        running = self.running()
        for process in running:
            self.terminate(process)
        return {process.pid: await self.wait_exit(process, within) for process in running}

    def check_alive(self) -> None:
        """Fail at once, with its log, if a worker this test did not signal has exited."""
        signalled = {*self.killed, *self.terminated}
        for process in self.started:
            if process.poll() is not None and process.pid not in signalled:
                pytest.fail(
                    f"worker (pid {process.pid}) exited with {process.returncode}:\n"
                    f"{self.log_tail(process)}"
                )

    def kill_survivors(self) -> None:
        """Teardown: no worker outlives its test, whatever happened."""
        for process in self.running():
            self.kill(process)

    def log_text(self, process: subprocess.Popen[bytes]) -> str:
        index = self.started.index(process)
        return (self.logs / f"worker-{index}.log").read_text(errors="replace")

    def log_tail(self, process: subprocess.Popen[bytes], lines: int = 40) -> str:
        return "\n".join(self.log_text(process).splitlines()[-lines:])

    def logs_tail(self, lines: int = 20) -> str:
        return "\n".join(
            f"-- worker {index} (pid {process.pid}):\n{self.log_tail(process, lines)}"
            for index, process in enumerate(self.started)
        )

    def _own(self, process: subprocess.Popen[bytes]) -> None:
        if process not in self.started:
            raise ValueError(f"pid {process.pid} is not a worker this test started")
