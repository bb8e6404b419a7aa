"""What every console command shares: ``--version``, and the libraries' noise kept off the
console."""
from __future__ import annotations

import argparse
import logging
import platform
from importlib import metadata

_QUIETED = False


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of ``parts``."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p in msg for p in self.parts)


def quiet_libraries() -> None:
    """Silence two warnings that say nothing about the run (idempotent; loggers are
    process-wide, so data-loader workers started by fork inherit it):

    * transformers, on every load of an exported folder's tokenizer: AutoTokenizer falls
      back to the generic config class for our ``model_type`` and warns "You are using a
      model of type `dide_dual_encoder` to instantiate a model of type ``";
    * torch's C++-extension module, imported by DeepSpeed on a machine without a CUDA
      runtime: "No CUDA runtime is found, using CUDA_HOME=...".
    """
    global _QUIETED
    if _QUIETED:
        return
    logging.getLogger("transformers.configuration_utils").addFilter(
        _DropMessages("to instantiate a model of type ``"))
    logging.getLogger("torch.utils.cpp_extension").addFilter(_DropMessages("No CUDA runtime is found"))
    _QUIETED = True


def version_text() -> str:
    """This package's version and the versions of what it runs on (for bug reports)."""
    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"
    deps = ", ".join(f"{d} {v(d)}" for d in ("torch", "deepspeed", "transformers", "timm", "webdataset"))
    return f"dide_scale {v('dide_scale')} (python {platform.python_version()}, {deps})"


class _Version(argparse.Action):
    """argparse's own version action re-wraps the line; this prints it as it is."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (a flag, an empty
    list of overrides): "(default: False)" and "(default: None)" say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def add_version(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--version", action=_Version, help="print the versions of dide_scale and of what it runs on, "
                                                       "and exit")
