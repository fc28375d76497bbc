"""Running the app under uvicorn: on a socket bound here (port 0 picks a free one), with a "ready"
callback once it accepts requests, and a stop that cancels running generations at once.

    server = LocalServer(app, host="127.0.0.1", port=0)
    server.run(on_ready=lambda url: print(url))       # blocks; Ctrl+C / SIGTERM stop it
    # or, in a thread (tests, the app's "local API" toggle):
    server.start_in_thread(); server.base_url; ...; server.stop()
"""

from __future__ import annotations

import copy
import socket
import threading

import uvicorn

GRACE_S = 3             # after a stop, open connections get this long before they are dropped


class _Uvicorn(uvicorn.Server):
    def __init__(self, config, on_ready, on_exit):
        super().__init__(config)
        self._on_ready, self._on_exit = on_ready, on_exit

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if self.started and self._on_ready is not None:
            self._on_ready()

    def handle_exit(self, sig, frame):
        self._on_exit()                     # stop generating now, so streams end and connections close
        super().handle_exit(sig, frame)
        self._captured_signals.clear()      # a stop by signal is the normal end: exit 0, not re-raised


def _stderr_logging() -> dict:
    """uvicorn's logging setup with the access lines on stderr too (stdout carries only the URL)."""
    cfg = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    cfg["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return cfg


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; OSError (address in use, not an address of this machine) as is."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host and not host.startswith("[")
                                                           else host)
    return f"http://{shown}:{port}"


class LocalServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                 logs: bool = True, sock: socket.socket | None = None):
        """logs: uvicorn's own log lines on stderr (request lines and statuses: never a key or a body);
        sock: a socket from bind() (then host / port are ignored)."""
        self.app, self.host = app, host
        self.sock = sock if sock is not None else bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.base_url = url_of(host, self.port)
        cfg = uvicorn.Config(app, log_level=log_level, access_log=logs, timeout_graceful_shutdown=GRACE_S,
                             lifespan="off", log_config=_stderr_logging() if logs else None)
        self._server = _Uvicorn(cfg, self._ready, self._cancel_work)
        self.ready = threading.Event()
        self._on_ready = None
        self._thread: threading.Thread | None = None

    def _ready(self) -> None:
        self.ready.set()
        if self._on_ready is not None:
            self._on_ready(self.base_url)

    def _cancel_work(self) -> None:
        st = getattr(self.app.state, "kimi", None)
        if st is not None:
            st.admission.cancel_all()

    def run(self, on_ready=None) -> None:
        """Serve until SIGINT / SIGTERM (main thread) or stop()."""
        self._on_ready = on_ready
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start_in_thread(self, timeout: float = 30.0) -> LocalServer:
        self._thread = threading.Thread(target=self.run, name="kimi-server", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError("the server did not start")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._cancel_work()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
