"""Development sessions: ``nox -s tests lint typing`` before each submission."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typing"]
nox.options.error_on_external_run = True

# Peers the benchmarks compare against: installed by the bench session only.
BENCH_PEERS = [
    "aiosignal", "blinker", "pyee", "bubus", "uvloop", "trio", "pgqueuer",
    "faststream[redis]>=0.7.8",  # the 0.7 API: StreamSub(..., max_records), broker.context
]  # fmt: skip
OLDEST_MINOR = 11  # requires-python = ">=3.11"
NEWEST_MINOR = 20  # far enough ahead that a new release is found without editing this file


def _reports_version(executable: str, minor: int) -> bool:
    """Whether ``executable`` runs and is CPython 3.<minor>: a pyenv shim for a version that
    is installed but not enabled is on PATH and found by `shutil.which`, yet fails when run."""
    check = f"import sys; sys.exit(sys.version_info[:2] != (3, {minor}))"
    try:
        completed = subprocess.run(
            [executable, "-c", check], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0


def _pyenv_builds(minor: int) -> list[str]:
    """Interpreters pyenv has installed for 3.<minor>, newest patch first, whether or not pyenv
    enables them (``pyenv global`` may list only one version)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    patches = {
        int(match[1]): version / "bin" / f"python3.{minor}"
        for version in root.glob(f"3.{minor}.*")
        # "3.13.0t" (free-threaded) and "3.12-dev" are left out
        if (match := re.fullmatch(rf"3\.{minor}\.(\d+)", version.name))
    }
    return [str(patches[patch]) for patch in sorted(patches, reverse=True)]


def _interpreters() -> dict[str, str]:
    """Every CPython from 3.11 up that this machine can run, by version ("3.12" -> its path).

    Found here rather than left to nox, so that a version the machine lacks is never asked
    for: nox skips a missing interpreter locally but fails on it when CI is set, and would
    try to download one. For each version, first ``python3.X`` on PATH, then pyenv's builds;
    the first that actually runs and reports that version is used.
    """
    found = {}
    for minor in range(OLDEST_MINOR, NEWEST_MINOR + 1):
        candidates = [shutil.which(f"python3.{minor}"), *_pyenv_builds(minor)]
        for candidate in filter(None, candidates):
            if _reports_version(candidate, minor):
                found[f"3.{minor}"] = candidate
                break
    if not found:  # whatever runs nox can run the sessions (it is 3.11+, or nothing would)
        found[f"{sys.version_info[0]}.{sys.version_info[1]}"] = sys.executable
    return found


INTERPRETERS = _interpreters()
# Sessions named by version ("tests(3.12)"), run with the interpreter found for it.
EVERY_PYTHON = [nox.param(path, id=version) for version, path in INTERPRETERS.items()]
VERSION_OF = {path: version for version, path in INTERPRETERS.items()}
# The benchmarks run on the oldest (issue 14's goals are stated for 3.11); the others time
# emit in worker processes (benchmarks/bench_versions.py).
BENCH_PYTHON = next(iter(INTERPRETERS.values()))


@nox.session(download_python="never")
@nox.parametrize("python", EVERY_PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite with branch coverage on every Python found; each run checks the floor
    (``fail_under`` in pyproject.toml) on its own report."""
    session.install("-e", ".[dev]")
    session.run(
        "pytest",
        "--cov",
        "--cov-report=term-missing",
        *session.posargs,
        # A data file per Python: runs for two versions at once do not write into each other.
        env={
            "PYTHONDEVMODE": "1",
            "COVERAGE_FILE": f".coverage.py{VERSION_OF[str(session.python)]}",
        },
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, and the import-linter contracts in pyproject.toml."""
    session.install("ruff", "import-linter", "-e", ".")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and the examples."""
    session.install("-e", ".[dev]")
    session.run("mypy", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Run the llm_platform demo: SQLite and in-memory cache unless DATABASE_URL / REDIS_URL."""
    session.install("-e", ".[examples]")
    session.run("python", "examples/quickstart.py")
    session.run("python", "-m", "examples.llm_platform")
    # A worker process killed mid-delivery, a survivor finishing its work: nothing lost.
    session.run("python", "-m", "examples.llm_platform", "--crash")
    # The heavy handlers in 2 workers fed from streams: worker processes on Redis when
    # REDIS_URL is set, else 2 consumers in the demo's process (still no server needed).
    session.run("python", "-m", "examples.llm_platform", "--workers", "2")


@nox.session
def web(session: nox.Session) -> None:
    """Serve the llm_platform example app to click through: ``nox -s web -- --port 8001``."""
    session.install("-e", ".[examples]")
    session.run("uvicorn", "examples.llm_platform.web:app", *session.posargs)


@nox.session(python=BENCH_PYTHON, download_python="never")
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers, the floors and raw anyio/asyncio/trio, in one run.

    Emit is also timed on every other Python found, by worker processes that run interleaved
    with this one (benchmarks/bench_versions.py); each gets aioevents and anyio in a
    virtualenv of its own next to this session's.
    """
    # httpx drives the panel scenario's requests (ASGITransport); not a peer.
    session.install("-e", ".[examples]", *BENCH_PEERS, "pyinstrument", "httpx")
    session.run("python", "-m", "benchmarks", *_other_pythons(session), *session.posargs)


def _other_pythons(session: nox.Session) -> list[str]:
    """``--python 3.X=PATH`` for every other Python found, each in a virtualenv of its own
    (next to this session's) with aioevents installed editable: every worker times the same
    source tree as this session."""
    arguments = []
    for version, interpreter in INTERPRETERS.items():
        if interpreter == BENCH_PYTHON:
            continue
        location = Path(session.virtualenv.location).parent / f"bench-worker-{version}"
        python = location / "bin" / "python"
        if not python.exists():
            session.run(interpreter, "-m", "venv", str(location), external=True)
        session.run(str(python), "-m", "pip", "install", "--quiet", "-e", ".", external=True)
        arguments += ["--python", f"{version}={python}"]
    return arguments
