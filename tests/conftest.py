"""Shared fixtures: a real daemon process on port 0 with the real embedded model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Multiply every timeout in the tests (slow machines: LLMWS_TEST_TIMEOUT_SCALE=3).
TIMEOUT_SCALE = float(os.environ.get("LLMWS_TEST_TIMEOUT_SCALE", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


class DaemonProcess:
    """A `python llmws.py` child process with its own var and models folders."""

    def __init__(
        self, root: Path, extra_args: list[str], env: dict[str, str] | None, config: dict[str, Any] | None
    ) -> None:
        self.root = root
        self.var_dir = root / "var"
        self.models_dir = root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = root / "config.json"
            self.config_path.write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws_port = 0
        self.http_port: int | None = 0
        self.log_path = root / "daemon.log"
        #: When set, the daemon runs with this RLIMIT_NOFILE (soft and hard).
        self.nofile: int | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 90) -> None:
        ready = self.root / "ready.json"
        ready.unlink(missing_ok=True)
        args = [
            sys.executable,
            str(REPO / "llmws.py"),
            "--port",
            "0",
            "--http-port",
            "0",
            "--var-dir",
            str(self.var_dir),
            "--models-dir",
            str(self.models_dir),
            "--ready-file",
            str(ready),
            "--log-level",
            "INFO",
        ]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        args += self.extra_args
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("LLMWS_MASTER_KEY", None) if "LLMWS_MASTER_KEY" not in self.env else None
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=self._limit_files if self.nofile is not None else None,
        )
        log.close()
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if ready.exists():
                info = json.loads(ready.read_text())
                self.ws_port, self.http_port = info["ws_port"], info["http_port"]
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"daemon did not become ready:\n{self.log()}")

    def _limit_files(self) -> None:
        """In the child, before exec: lower the open-file limit."""
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=scaled(10))

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait for the graceful shutdown."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=scaled(timeout))
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode if self.proc else None

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons in a temporary folder; all are killed at the end of the test."""
    made: list[DaemonProcess] = []

    def make(
        extra_args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
        *,
        start: bool = True,
    ) -> DaemonProcess:
        root = tmp_path / f"d{len(made)}"
        root.mkdir()
        d = DaemonProcess(root, list(extra_args), env, config)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.kill()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One default daemon for a module's tests that neither restart it nor change its
    config: each test works in sessions of its own (starting a daemon allocates every
    slot's KV, seconds on a small machine)."""
    d = DaemonProcess(tmp_path_factory.mktemp("shared"), [], None, None)
    d.start()
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A started daemon serving the embedded SmolLM2 model from a fresh var folder."""
    return daemon_factory()
