"""Opening a shard wherever it lives, and telling a passing failure from a lasting one.

URL forms (webdataset's conventions):

* a local path;
* ``http://`` / ``https://`` - streamed with the standard library (no dependency), with a
  read timeout;
* ``s3://``, ``gs://`` and any other fsspec protocol - through fsspec (``pip install
  dide_scale[s3]`` / ``[gcs]`` for s3fs / gcsfs); credentials and endpoints come from each
  store's usual environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``; ``GOOGLE_APPLICATION_CREDENTIALS``) or fsspec's
  ``FSSPEC_<PROTOCOL>_<OPTION>`` variables;
* ``pipe:COMMAND`` - the shard is COMMAND's standard output (``pipe:curl -s URL``,
  ``pipe:aws s3 cp s3://... -``); a non-zero exit status is an error.

:func:`transient` decides whether an error is worth a retry (connection errors, timeouts,
HTTP 5xx/429/408, a stream cut short) or not (missing object, access denied, a corrupt
local file).
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import tarfile
import urllib.error
import urllib.request

READ_TIMEOUT_S = 60.0


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


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


def open_shard(url: str, timeout_s: float = READ_TIMEOUT_S):
    """A readable binary stream of ``url`` (the caller closes it)."""
    if url.startswith("pipe:"):
        return PipeStream(url)
    if is_http(url):
        return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "dide_scale"}),
                                      timeout=timeout_s)
    if "://" in url:
        import fsspec
        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def transient(exc: BaseException, url: str) -> bool:
    """Whether ``exc`` (raised while opening or reading ``url``) may go away on a retry."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
                        http.client.HTTPException)):
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


def read_json(url: str, timeout_s: float = 10.0):
    """A small JSON document at ``url`` (e.g. a remote ``sizes.json``), or None if absent."""
    try:
        if is_local(url):
            with open(url) as f:
                return json.load(f)
        stream = open_shard(url, timeout_s)
        try:
            return json.loads(stream.read().decode("utf-8"))
        finally:
            stream.close()
    except (FileNotFoundError, urllib.error.HTTPError, ValueError, OSError):
        return None
