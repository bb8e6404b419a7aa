"""A real HTTP server on loopback serving a shard directory, with the faults a web server or
an object-store gateway shows: going down (connection refused) and coming back on the same
port, answering 5xx or 404 for chosen files, and hanging without answering."""
from __future__ import annotations

import functools
import http.server
import threading
import time
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server.owner
        name = self.path.rsplit("/", 1)[-1]
        srv.requests.append(name)
        if srv.hang.is_set():
            srv.hang_released.wait(120)  # never answers while hanging
        if name in srv.status:
            self.send_error(srv.status[name])
            return
        if srv.throttle_s:  # slow enough that a test can stop the server in mid-transfer
            path = Path(self.translate_path(self.path))
            if path.is_file():
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for i in range(0, len(data), 8192):
                        if srv.cut.is_set():
                            return  # the connection drops mid-transfer
                        self.wfile.write(data[i:i + 8192])
                        time.sleep(srv.throttle_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return
        super().do_GET()


class ShardServer:
    """``url(name)`` -> http://127.0.0.1:PORT/name for files under ``root``."""

    def __init__(self, root: str | Path, throttle_s: float = 0.0):
        self.root = str(root)
        self.throttle_s = throttle_s
        self.requests: list[str] = []
        self.status: dict[str, int] = {}
        self.hang, self.hang_released, self.cut = threading.Event(), threading.Event(), threading.Event()
        self.port = 0
        self.httpd = None

    def start(self) -> "ShardServer":
        handler = functools.partial(_Handler, directory=self.root)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
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
        return f"http://127.0.0.1:{self.port}/{name}"

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
