"""Where a model, a teacher or a tokenizer comes from: a local path, or a Hugging Face Hub id.

``resolve_source(value, key)`` is the one place that turns ``teacher.path``, the path of a
``student.init`` spec (``vilt:dandelin/vilt-b32-mlm``) and ``data.tokenizer`` into something
on this machine:

- a local file or directory that exists wins, as it is;
- else a value of the Hub's id form (``owner/name``, a legacy ``name``, optionally
  ``@revision``) is the local snapshot of that repository (``huggingface_hub``'s cache, so a
  second call, a second rank or a machine without network, ``HF_HUB_OFFLINE=1``, reads the
  files already there); an id the Hub cannot give fails with one line naming the key;
- anything else (an absolute path that does not exist, say) is returned unchanged, for the
  reader of that key to report what it expected there.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

# what a tokenizer needs from a model repository (not its weights)
TOKENIZER_FILES = ("*.json", "*.txt", "*.model")


def _snapshot(repo_id: str, revision: str | None, allow_patterns) -> str:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)


# tests replace this (the Hub is not reachable from CI); signature of ``_snapshot``
download: Callable[[str, str | None, tuple | None], str] = _snapshot


def hub_id(value: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``value`` has the Hub's id form, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    repo, _, revision = value.partition("@")
    if not repo or repo.startswith((".", "/", "~")) or repo.endswith((".ckpt", ".pt", ".pth", ".bin")):
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo, revision or None


@functools.lru_cache(maxsize=None)
def _resolve_cached(value: str, key: str, allow_patterns: tuple | None, shown: str) -> str:
    if Path(value).expanduser().exists():
        return str(Path(value).expanduser())
    ident = hub_id(value)
    if ident is None:
        return value
    try:
        return download(ident[0], ident[1], list(allow_patterns) if allow_patterns else None)
    except Exception as e:  # the Hub's errors are many (not found, gated, offline, no network): one line each
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(
            f"{key}={shown!r} is no local file or directory, and the Hugging Face Hub cannot give a repository of that "
            f"id ({type(e).__name__}: {reason[:160]}); check the spelling, or download it and give its local path"
        ) from None


def resolve_source(value: str, key: str, allow_patterns: tuple[str, ...] | None = None,
                   shown: str | None = None) -> str:
    """``value`` of config key ``key`` as a local path (see the module doc).  ``allow_patterns``
    limits a Hub download to those files (a tokenizer needs no weights); ``shown`` is the key's
    whole value for the error (``vilt:ID`` of a ``student.init``)."""
    if not value:
        return value
    return _resolve_cached(value, key, allow_patterns, shown or value)


def split_init(spec: str) -> tuple[str, str]:
    """``student.init`` as (kind, local path): 'random' -> ('random', ''), 'vilt:ID' -> ('vilt', snapshot)."""
    kind, _, path = spec.partition(":")
    return kind, resolve_source(path, "student.init", shown=spec) if path else ""
