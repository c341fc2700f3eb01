"""uvicorn for scratchlm: ``Server``, which stops at once, and ``BackgroundServer``, a server in a thread of the
current process (tests, notebooks): ``with BackgroundServer(app) as url``."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

# Once the requests in flight are ended, uvicorn closes their connections within its 0.1 s polls; this is the
# backstop for a client that does not read its answer (uvicorn then cancels the remaining tasks).
GRACEFUL_SHUTDOWN_S = 0.5


class Server(uvicorn.Server):
    """uvicorn's server, which on shutdown (SIGTERM, Ctrl-C, ``should_exit``) first ends every request in
    flight: each stream gets an error event and ``[DONE]`` (uvicorn alone waits for the answers to finish)."""

    async def shutdown(self, sockets=None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "server", None)
        if state is not None:
            state.stop_requests()
        await super().shutdown(sockets)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``app`` on ``host``:``port`` (a free port by default) until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, wait_ready: bool = True):
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.wait_ready = wait_ready
        self.server = Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False,
                                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        self.thread = threading.Thread(target=self.server.run, name="scratchlm-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        if self.wait_ready:
            state = self.server.config.app.state.server
            while state.engine is None:
                if state.load_error or time.monotonic() > deadline:
                    raise RuntimeError(f"the model did not load: {state.load_error}")
                time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
