"""The configuration described to the user: every key with its value and its docstring
(``--print-config``), and the shipped configs (``--help``).

A field's docstring is the string literal under it in ``config.py``; Python keeps it only
in the source, so it is read from there with ``ast``.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache

import yaml

from .config import CONFIG_DIR, RunConfig, shipped_configs


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring under it} of a dataclass, from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def doc_of(cls: type, name: str, tp) -> str:
    """A field's docstring; a section without one is described by its class's docstring."""
    doc = field_docs(cls).get(name, "")
    if not doc and dataclasses.is_dataclass(tp):
        doc = inspect.cleandoc(tp.__doc__ or "")
    return doc


def missing_docs(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys that have no docstring (a test keeps this empty)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if not doc_of(cls, f.name, tp):
            out.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            out += missing_docs(tp, f"{prefix}{f.name}.")
    return out


def _scalar(value) -> str:
    """A value as YAML on one line (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    return text.removesuffix("...").strip()


def _comment(doc: str, indent: str, width: int = 100) -> list[str]:
    lines = []
    for para in doc.split("\n\n"):
        lines += textwrap.wrap(" ".join(para.split()), width, initial_indent=f"{indent}# ",
                               subsequent_indent=f"{indent}# ")
    return lines


def describe(obj, cls: type | None = None, indent: str = "") -> list[str]:
    """YAML lines for a config section: each key under its docstring as comments."""
    cls = cls or type(obj)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(obj, f.name)
        lines += _comment(doc_of(cls, f.name, tp), indent)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{indent}{f.name}:")
            lines += describe(value, tp, indent + "  ")
        else:
            lines.append(f"{indent}{f.name}: {_scalar(value)}")
    return lines


def print_config(cfg: RunConfig, command: str) -> str:
    """The whole resolved config as YAML, every key under its docstring; it loads back
    with ``--config FILE``."""
    head = [f"# {command}", "# Every key with its value (defaults <- --config <- key=value overrides) and its meaning.",
            "# Save it and pass it back with --config FILE, or override any key as key=value.", ""]
    return "\n".join(head + describe(cfg)) + "\n"


def config_summary(name: str) -> str:
    """A shipped config's first sentence (its leading comment), for --help."""
    text = []
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        text.append(line.lstrip("# ").strip())
    first = " ".join(text).split(". ")[0].rstrip(".")
    return first if len(first) <= 100 else first.split(": ")[0]


def shipped_configs_help() -> str:
    """The --help epilog: the shipped configs and how to see every key."""
    names = shipped_configs()
    width = max(map(len, names))
    rows = [f"  {n:<{width}}  {config_summary(n)}" for n in names]
    return "\n".join([f"shipped configs (--config NAME; files in {CONFIG_DIR}):", *rows, "",
                      "--print-config prints every key with its value and meaning; key=value overrides any of them "
                      "(e.g. train.max_steps=10 student.arch.width=64)."])
