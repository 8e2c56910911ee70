"""Servers on loopback for the remote-shard tests: an HTTP server with injected faults and an S3 API (moto).

Shared by the training loader's tests (test_remote_shards.py), the evaluation reader's (test_eval_remote.py)
and the DALI path's (test_dali_remote.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FaultServer:
    """Serves a folder; ``plan[name]`` is a list of actions for successive GETs of that file, then "ok".

    Actions: "ok", "503", "drop" (full Content-Length, half the body, then the connection closes), "stall"
    (headers, then silence for ``stall_s``), "fail" (503 forever). ``rate``: bytes/s of every body (None:
    unthrottled). HEAD always answers (size). ``gets[name]`` counts GETs; ``sending`` maps the files whose body
    is being written now to (bytes sent, size).
    """

    def __init__(self, root: Path, rate: float | None = None, stall_s: float = 3.0):
        self.root, self.rate, self.stall_s = root, rate, stall_s
        self.plan: dict[str, list[str]] = {}
        self.gets: dict[str, int] = {}
        self.sending: dict[str, tuple[int, int]] = {}  # name -> (bytes sent, size) while a body is sent
        self.lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                with server.lock:
                    server.gets[name] = server.gets.get(name, 0) + 1
                    steps = server.plan.get(name, [])
                    action = steps[0] if steps else "ok"
                    if steps and action != "fail":
                        steps.pop(0)
                path = server.root / name
                if action in ("503", "fail"):
                    self.send_error(503, "Service Unavailable")
                    return
                if not path.is_file():
                    self.send_error(404, "Not Found")
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if action == "stall":
                    self.wfile.flush()
                    time.sleep(server.stall_s)
                    self.close_connection = True
                    return
                if action == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                with server.lock:
                    server.sending[name] = (0, len(data))
                try:
                    if server.rate is None:
                        self.wfile.write(data)
                    else:
                        step = 2048
                        for i in range(0, len(data), step):
                            self.wfile.write(data[i:i + step])
                            self.wfile.flush()
                            with server.lock:
                                server.sending[name] = (i + step, len(data))
                            time.sleep(step / server.rate)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.sending.pop(name, None)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def urls(self, paths) -> list[str]:
        return [f"{self.base}/{Path(p).name}" for p in paths]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 API server on a free loopback port; yields its endpoint URL (needs moto[server])."""
    from moto.server import ThreadedMotoServer  # optional test dependency (the dev extra)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's per-request log lines
    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.stop()


def set_s3_env(monkeypatch) -> None:
    """Fake credentials, and no profile or endpoint from the user's environment."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)


def upload_to_s3(endpoint: str, bucket: str, paths, prefix: str = "train") -> list[str]:
    """Upload local files to ``s3://bucket/prefix/<name>``; their URLs in order."""
    import s3fs  # optional test dependency (the cloud extra)

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    for p in paths:
        fs.put_file(p, f"{bucket}/{prefix}/{Path(p).name}")
    return [f"s3://{bucket}/{prefix}/{Path(p).name}" for p in paths]
