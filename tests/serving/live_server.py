"""Run an app on a free 127.0.0.1 port in a background thread, for tests (uvicorn, port 0)."""
from __future__ import annotations

import contextlib
import threading
import time


@contextlib.contextmanager
def live_server(app, timeout: float = 30, **config_kw):
    """Yield the base URL of ``app`` served by uvicorn on 127.0.0.1; stop it (and its engine) on exit.
    ``config_kw``: more ``uvicorn.Config`` arguments (e.g. ``http=`` a protocol class)."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on", **config_kw)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
