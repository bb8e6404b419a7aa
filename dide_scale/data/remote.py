"""Opening a shard wherever it lives, from any byte, and telling a passing failure from a
lasting one.

URL forms (webdataset's conventions):

* a local path;
* ``http://``, ``https://``, ``s3://``, ``gs://`` and any other fsspec protocol - one code
  path, fsspec's: a file read in blocks of ``BLOCK_BYTES`` by range requests, so a read can
  start at any byte (a sample's offset from ``sizes.json``) and stops costing bytes where
  the reader stops; every socket read has the read timeout.  A web server that ignores
  range requests is read from its start instead.  ``pip install dide_scale[s3]`` /
  ``[gcs]`` for s3fs / gcsfs; credentials and endpoints come from each store's usual
  environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``; ``GOOGLE_APPLICATION_CREDENTIALS``) or fsspec's
  ``FSSPEC_<PROTOCOL>_<OPTION>`` variables;
* ``pipe:COMMAND`` - the shard is COMMAND's standard output (``pipe:curl -s URL``,
  ``pipe:aws s3 cp s3://... -``); a non-zero exit status is an error.  A pipe cannot
  seek: a read from byte N reads and drops the N bytes before it.

:func:`transient` decides whether an error is worth a retry (connection errors, timeouts,
HTTP 5xx/429/408, a stream cut short) or not (missing object, access denied, a corrupt
local file).
"""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import ssl
import subprocess
import tarfile
import time

READ_TIMEOUT_S = 60.0
BLOCK_BYTES = 4 << 20
"""Bytes per range request of a remote read (fsspec's read-ahead): a read stops at most
this far past the last byte it needed."""


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class PipeStream:
    """The standard output of ``pipe:COMMAND``; a non-zero exit status raises at the end."""

    def __init__(self, url: str):
        self.cmd = url[len("pipe:"):]
        self.proc = subprocess.Popen(self.cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data or (n > 0 and len(data) < n):
            self._check()
        return data

    def _check(self) -> None:
        code = self.proc.wait()
        if code != 0:
            err = self.proc.stderr.read().decode("utf-8", "replace").strip()[-300:]
            raise OSError(f"pipe command {self.cmd!r} exited with {code}: {err}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def skip_bytes(stream, n: int) -> None:
    """Read and drop ``n`` bytes of a stream that cannot seek."""
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"the stream ended {n} bytes before the offset asked for")
        n -= len(chunk)


def filesystem(url: str, timeout_s: float = READ_TIMEOUT_S):
    """(fsspec filesystem, path) of a remote ``url``; HTTP sockets get ``timeout_s`` for
    connecting and for every read (a server that stops answering fails the read)."""
    import fsspec
    opts: dict = {}
    if is_http(url):
        import aiohttp
        opts["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                                                  sock_read=timeout_s),
                                 "headers": {"User-Agent": "dide_scale"}}
    return fsspec.core.url_to_fs(url, **opts)


class RemoteShard(io.RawIOBase):
    """A remote shard read from byte ``offset`` through fsspec's block reads.  A web server
    that answers a range request with the whole file (no range support) is read as one
    stream from its start instead, dropping the bytes before the current position."""

    def __init__(self, url: str, timeout_s: float = READ_TIMEOUT_S, offset: int = 0):
        super().__init__()
        self.url, self.pos = url, offset
        self.fs, self.path = filesystem(url, timeout_s)
        self.f = _unwrapped(lambda: self.fs.open(self.path, "rb", block_size=BLOCK_BYTES, cache_type="readahead"))
        if offset:
            self._seek_or_stream(offset)

    def _seek_or_stream(self, pos: int) -> None:
        try:
            self.f.seek(pos)
        except ValueError:  # fsspec's streaming file (the server said Accept-Ranges: none)
            self._stream_from(pos)

    def _stream_from(self, pos: int) -> None:
        self.f.close()
        self.f = _unwrapped(lambda: self.fs.open(self.path, "rb", block_size=0))
        skip_bytes(self.f, pos)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.f.read(n)
        except ValueError as e:
            if "range requests" not in str(e):
                raise
            self._stream_from(self.pos)  # fsspec found no range support at a block past the first
            data = self.f.read(n)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.f.close()
        super().close()


def _unwrapped(open_fn):
    """``open_fn()``, except that fsspec's HTTP filesystem reports every failure of its size
    query (a 503, a refused connection, a timeout) as FileNotFoundError: its cause is raised
    instead, so that a passing failure is retried and the message says what happened."""
    try:
        return open_fn()
    except FileNotFoundError as e:
        cause = e.__cause__
        if cause is not None and not isinstance(cause, FileNotFoundError) and http_status(cause) != 404:
            raise cause from None
        raise


def open_shard(url: str, timeout_s: float = READ_TIMEOUT_S, offset: int = 0):
    """A readable binary stream of ``url`` from byte ``offset`` (the caller closes it)."""
    if is_pipe(url):
        stream = PipeStream(url)
        skip_bytes(stream, offset)
        return stream
    if is_local(url):
        f = open(url, "rb")
        f.seek(offset)
        return f
    return RemoteShard(url, timeout_s, offset)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp's ClientResponseError), if any."""
    status = getattr(exc, "status", None) if type(exc).__name__ == "ClientResponseError" else None
    return status if isinstance(status, int) else None


def transient(exc: BaseException, url: str) -> bool:
    """Whether ``exc`` (raised while opening or reading ``url``) may go away on a retry."""
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, ssl.SSLCertVerificationError) or isinstance(getattr(exc, "certificate_error", None),
                                                                    ssl.SSLCertVerificationError):
        return False  # an https server whose certificate is not trusted (aiohttp wraps the error) stays so
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)):
        return True
    if is_local(url):
        return False  # a local file that cannot be parsed will not parse the next time either
    # remote: a stream cut short surfaces as a tar error; store clients have their own types
    return isinstance(exc, (OSError, tarfile.TarError, EOFError, ValueError)) or "Error" in type(exc).__name__


def probe(url: str, timeout_s: float = 10.0) -> str | None:
    """None when ``url`` answers with data (its first bytes), else what went wrong."""
    try:
        if is_local(url):
            return None if os.path.exists(url) else "no such file"
        stream = open_shard(url, timeout_s)
        try:
            if not stream.read(512):
                return "empty"
        finally:
            stream.close()
    except Exception as e:  # report, never raise: this is a preflight
        return f"{type(e).__name__}: {e}"
    return None


def read_json(url: str, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 1.0):
    """A small JSON document at ``url`` (e.g. a remote ``sizes.json``), or None when there is
    none (no such file, or a ``pipe:`` command that fails).  A passing failure is retried;
    one that persists raises, naming the URL: a rank that silently went without the
    document would read differently from the others."""
    for attempt in range(retries + 1):
        try:
            if is_local(url):
                with open(url) as f:
                    return json.load(f)
            stream = open_shard(url, timeout_s)
            try:
                return json.loads(stream.read().decode("utf-8"))
            finally:
                stream.close()
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - classified: absent, passing or lasting
            if is_pipe(url):
                return None  # a command's failure (or its error page) cannot be told from a missing file
            if isinstance(e, json.JSONDecodeError):
                raise ValueError(f"{url} is not valid JSON: {e}") from None
            if not transient(e, url) or attempt == retries:
                raise RuntimeError(f"could not read {url}: {type(e).__name__}: {e}") from None
            time.sleep(backoff_s * 2 ** attempt)
    return None


_SHARD_TOKEN = re.compile(r"[^\s'\"]+\.tar\b")


def pipe_sibling(url: str, name: str) -> str | None:
    """The ``pipe:`` command that reads file ``name`` beside the shard a ``pipe:`` URL reads:
    the last ``*.tar`` token of the command with its file name replaced
    (``pipe:curl -s http://h/d/00003.tar`` -> ``pipe:curl -s http://h/d/sizes.json``);
    None when the command names no ``.tar`` file."""
    matches = list(_SHARD_TOKEN.finditer(url))
    if not matches:
        return None
    m = matches[-1]
    token = m.group(0)
    head = token.rsplit("/", 1)[0] + "/" if "/" in token else ""
    return url[:m.start()] + head + name + url[m.end():]


def shard_name(url: str) -> str:
    """The file name of the shard a URL reads (for a ``pipe:`` command: its last ``*.tar``)."""
    if is_pipe(url):
        matches = _SHARD_TOKEN.findall(url)
        return matches[-1].rsplit("/", 1)[-1] if matches else url
    return url.rsplit("/", 1)[-1]
