"""A real HTTP server on loopback serving a shard directory, as a web server or an object-store
gateway does (HEAD, range requests answered with 206), with the faults they show: going down
(connection refused) and coming back on the same port, answering 5xx or 404 for chosen
files, hanging without answering, and (``ranges=False``) ignoring range requests as simple
servers do.  ``bytes_sent`` counts the body bytes it sent; with ``tls=(cert, key)`` it speaks
https."""
from __future__ import annotations

import functools
import http.server
import re
import ssl
import threading
import time
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        srv = self.server.owner
        name = self.path.rsplit("/", 1)[-1]
        srv.requests.append(name)
        if srv.hang.is_set():
            srv.hang_released.wait(120)  # never answers while hanging
        if name in srv.status:
            self.send_error(srv.status[name])
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")) if srv.ranges else None
        if m:
            start, end = int(m.group(1)), min(len(data), int(m.group(2)) + 1 if m.group(2) else len(data))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        if srv.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        try:
            for i in range(start, end, 8192):
                if srv.cut.is_set():
                    return  # the connection drops mid-transfer
                chunk = data[i:min(end, i + 8192)]
                self.wfile.write(chunk)
                with srv.lock:
                    srv.bytes_sent += len(chunk)
                if srv.throttle_s:  # slow enough that a test can stop the server in mid-transfer
                    time.sleep(srv.throttle_s)
        except (BrokenPipeError, ConnectionResetError):
            pass


class ShardServer:
    """``url(name)`` -> http://127.0.0.1:PORT/name for files under ``root``."""

    def __init__(self, root: str | Path, throttle_s: float = 0.0, ranges: bool = True,
                 tls: tuple[str, str] | None = None):
        self.root = str(root)
        self.throttle_s, self.ranges, self.tls = throttle_s, ranges, tls
        self.requests: list[str] = []
        self.status: dict[str, int] = {}
        self.hang, self.hang_released, self.cut = threading.Event(), threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.bytes_sent = 0
        self.port = 0
        self.httpd = None

    def start(self) -> "ShardServer":
        handler = functools.partial(_Handler, directory=self.root)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.cut.clear()
        return self

    def stop(self) -> None:
        """Down: open transfers are cut and new connections refused, until ``start()``."""
        self.cut.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def url(self, name: str = "") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/{name}"

    def release(self) -> None:
        self.hang.clear()
        self.hang_released.set()


class ServerProcess:
    """The same server in a process of its own, so that stopping it really closes the port
    (a server thread's listening socket would live on in forked data-loader workers)."""

    CODE = ("import sys, time; sys.path.insert(0, sys.argv[1]); from http_shards import ShardServer; "
            "s = ShardServer(sys.argv[2], float(sys.argv[4])); s.port = int(sys.argv[3]); s.start(); "
            "print(s.port, flush=True); time.sleep(3600)")

    def __init__(self, root: str | Path, throttle_s: float = 0.0):
        self.root, self.throttle_s, self.port, self.proc = str(root), throttle_s, 0, None

    def start(self) -> "ServerProcess":
        import subprocess
        import sys
        for _ in range(50):  # the port may need a moment after the previous process died
            self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(Path(__file__).parent), self.root,
                                          str(self.port), str(self.throttle_s)], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
            line = self.proc.stdout.readline()
            if line.strip():
                self.port = int(line)
                return self
            self.proc.wait()
            time.sleep(0.1)
        raise RuntimeError("the shard server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"
