"""Real servers on 127.0.0.1 for the remote-corpus tests, each a process of its own (so a test
can stop one mid-run and start it again): an HTTP file server that answers range requests, and
moto's S3-compatible server.

    python -m tests.servers http ROOT PORT     serve the folder ROOT
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
# What the S3 tests give botocore. The secret is planted: it must show up in no file of a run.
S3_ACCESS_KEY = "AKIAMEGATRAINTEST"
S3_SECRET = "planted-secret-4f1c9e2a7b"


class RangeHandler(SimpleHTTPRequestHandler):
    """Python's file server plus single byte ranges (``Range: bytes=a-b``), as object stores
    and CDNs answer them."""

    def send_head(self):
        match = RANGE.match(self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first = int(match[1]) if match[1] else max(0, size - int(match[2] or 0))
        last = min(int(match[2]), size - 1) if match[1] and match[2] else size - 1
        if first >= size:
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            return None
        f = path.open("rb")
        f.seek(first)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self._remaining = last - first + 1
        return f

    def copyfile(self, source, outputfile) -> None:
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(remaining))
        return None

    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Server:
    """A server process that can be stopped and started again on the same port."""

    def __init__(self, command: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.command, self.port, self.env = command, port, env
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def http_server(root: Path, port: int | None = None) -> Server:
    """An HTTP server of the folder ``root`` (not started)."""
    port = port or free_port()
    return Server([sys.executable, "-m", "tests.servers", "http", str(root), str(port)], port)


def s3_env(port: int) -> dict[str, str]:
    """What a client of the local S3 server needs: the standard variables, nothing else."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


def s3_server(port: int | None = None) -> Server:
    """moto's S3-compatible server (in memory; not started)."""
    port = port or free_port()
    return Server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                  port, env=dict(os.environ, MOTO_CALL_RESET_API="false"))


@contextlib.contextmanager
def s3_environment(port: int) -> Iterator[None]:
    """This process's environment pointed at the local S3 server (and back afterwards)."""
    saved = {k: os.environ.get(k) for k in s3_env(port)}
    os.environ.update(s3_env(port))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def upload_folder(folder: Path, url: str) -> None:
    """Copy every file of ``folder`` to ``url`` (``s3://bucket/prefix``) with s3fs, creating the
    bucket."""
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{url.removeprefix('s3://').rstrip('/')}/{path.name}")


def main(argv: list[str]) -> None:
    kind, root, port = argv
    if kind != "http":
        raise SystemExit(f"unknown server {kind!r}")
    handler = partial(RangeHandler, directory=root)
    ThreadingHTTPServer(("127.0.0.1", int(port)), handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
