"""Where the server (`server.create_app`) runs: `serve` in the foreground (`bayeskd serve`),
`BackgroundServer` in a thread of this process (tests, benchmarks), `ServerProcess` in a child
process (any OpenAI-compatible server: `bayeskd serve`, llama.cpp's), and `free_port`."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from fastapi import FastAPI

from bayeskd.teachers.config import ServeConfig
from bayeskd.teachers.local import LocalTeacher
from bayeskd.teachers.server import create_app


def serve(teacher: LocalTeacher, cfg: ServeConfig, served_name: str | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    app = create_app(teacher, cfg, served_name)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port or free_port(cfg.host), log_level="info"))
    _die_with(app, server)
    server.run()


def _die_with(app: FastAPI, server: Any) -> None:
    """`serve.faults.die_after`: the injector stops this uvicorn server (it stops listening, then exits)."""
    faults = getattr(app.state, "faults", None)
    if faults is not None:
        faults.on_die = lambda: setattr(server, "should_exit", True)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """The server in a thread of this process, for tests and benchmarks (`with BackgroundServer(...) as s`)."""

    def __init__(self, teacher: LocalTeacher, cfg: ServeConfig, served_name: str | None = None):
        import uvicorn

        self.teacher = teacher
        self.port = cfg.port or free_port(cfg.host)
        self.host = cfg.host
        self.app = create_app(teacher, cfg, served_name)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=cfg.host, port=self.port, log_level="warning"))
        _die_with(self.app, self.server)
        self.thread = threading.Thread(target=self.server.run, name="bayeskd-serve", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the teacher server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServerProcess:
    """An OpenAI-compatible server in a child process (`bayeskd serve`, llama.cpp's, ...), for as long
    as the `with` block lasts: started by `cmd`, ready once `base_url`/models answers."""

    def __init__(self, cmd: list[str], base_url: str, cwd: str | None = None, log: str | None = None, timeout_s: float = 600):
        self.cmd, self.base_url, self.cwd, self.log, self.timeout_s = cmd, base_url, cwd, log, timeout_s

    def __enter__(self) -> ServerProcess:
        import subprocess
        import urllib.request

        self.out = open(self.log, "w") if self.log else None
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=self.out, stderr=subprocess.STDOUT if self.out else None)
        deadline, where = time.time() + self.timeout_s, f"; see {self.log}" if self.log else ""
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._close()
                raise RuntimeError(f"{self.cmd[:4]} exited with {self.proc.returncode}{where}")
            try:
                urllib.request.urlopen(f"{self.base_url}/models", timeout=2)
                return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"{self.cmd[:4]} did not answer at {self.base_url} within {self.timeout_s:g} s{where}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self._close()

    def _close(self) -> None:
        if self.out:
            self.out.close()
