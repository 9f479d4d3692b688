"""Servers the harness starts itself: a child process, its log file, readiness, a clean stop."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("mixserve.bench")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a server under test: the repo importable, one OpenMP thread unless set.

    PYTHONSAFEPATH keeps `python -m` (the launcher starts its router and shards so) from putting the working
    directory first on sys.path: run from a checkout, that checkout's code would shadow the PYTHONPATH a
    variant sets (`--mixserve 'old=PYTHONPATH=/tmp/old-worktree'`), and both sides would run the same code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "proto"), env.get("PYTHONPATH")) if p)
    return env


class ServerProcess:
    """A child process whose output goes to `log_path`; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            cmd, env=env or child_env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.info("event=started name=%s pid=%d log=%s", name, self.process.pid, log_path)

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.tail()}")

    def wait_http_ready(self, url: str, timeout_s: float) -> float:
        """Wait until GET `url` answers 200; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout_s:.0f}s:\n{self.tail()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the process group (a server's own children too), SIGKILL after `timeout_s`."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        log.info("event=stopped name=%s code=%s", self.name, self.process.returncode)
        return self.process.returncode


PYTHON = sys.executable
