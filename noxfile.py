"""Development sessions: ``nox -s tests lint typing`` before each submission."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typing"]
nox.options.error_on_external_run = True

# Peers the benchmarks compare against: installed by the bench session only.
BENCH_PEERS = ["aiosignal", "blinker", "pyee", "bubus", "uvloop"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with branch coverage (floor in pyproject.toml)."""
    session.install("-e", ".[dev]")
    session.run(
        "pytest",
        "--cov",
        "--cov-report=term-missing",
        *session.posargs,
        env={"PYTHONDEVMODE": "1"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


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


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers and raw anyio/asyncio, in one run."""
    session.install("-e", ".[examples]", *BENCH_PEERS, "pyinstrument")
    session.run("python", "-m", "benchmarks", *session.posargs)
