"""Server processes under test: start, wait until ready, read their peak memory, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.env import CACHE_DIR, peak_rss_bytes

LOG_DIR = CACHE_DIR / "logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pagoda_serve_command(port: int, extra_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pagoda", "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args]


class ServerProcess:
    """A server subprocess whose output goes to a log file under bench/.cache/logs."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.ready_path = ready_path
        self.env = {**os.environ, **(env or {})}
        self.log_path = LOG_DIR / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_seconds: float | None = None  # process start to the first 200 from the ready path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> ServerProcess:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()  # the child holds its own handle
        self.ready_seconds = self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> float:
        assert self.process is not None
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.process.returncode} before it was ready:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    if client.get(self.base_url + self.ready_path).status_code == 200:
                        return time.perf_counter() - self.started_at
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def peak_rss_bytes(self) -> int:
        """Peak resident memory of the server and any children it started (summed)."""
        assert self.process is not None
        total = 0
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            with contextlib.suppress(OSError, RuntimeError):  # exited meanwhile
                total += peak_rss_bytes(pid)
        return total

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for children_file in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = [int(c) for c in children_file.read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found
