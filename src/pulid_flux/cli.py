"""The ``pulid-flux`` command line.

Each sub-command lives in the module that owns its work; a module contributes
``add_arguments(parser)`` and ``run(args) -> int``, and keeps heavy imports (torch)
inside ``run`` so that ``--help`` stays fast.

Errors: a command raises; ``main`` prints one ``pulid-flux: error: …`` line (the user's kind of
error: bad input, missing weights, a failed download, a busy port) and exits 1. The traceback is
printed only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("pulid_flux.generate", "generate one image from a prompt and a reference face"),
    "download": ("pulid_flux.engine.download", "download every weight file into one cache directory"),
    "check-parity": ("pulid_flux.engine.parity", "compare the engine with the official reference tensors"),
    "serve": ("pulid_flux.server", "run the fal-compatible HTTP service (and a local worker)"),
    "worker": ("pulid_flux.worker", "run one generation worker against a queue"),
    "make-cert": ("pulid_flux.tls", "make a local self-signed CA and server certificate for TLS"),
}


class CommandError(Exception):
    """The command cannot do what was asked (a port in use, an unwritable output path, …)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: reported as their message, without a traceback."""
    from pydantic import ValidationError  # a setting out of its bounds (option or PULID_FLUX_* variable)

    from .engine.download import DownloadError, MissingWeightsError
    from .errors import InputError
    from .fetch import ReferenceImageError

    return (CommandError, InputError, ReferenceImageError, MissingWeightsError, DownloadError, ValidationError)


def describe(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "invalid setting: " + "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())
    return str(exc)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already speaks of its default
    or there is no value to show (None, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is argparse.SUPPRESS or default is None or default is False:
            return text
        if default in ("", [], ()) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--debug", action="store_true", default=default,
                        help="print the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pulid-flux", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pulid-flux {__version__}")
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.add_arguments(command)
        _add_debug(command, argparse.SUPPRESS)  # SUPPRESS: `pulid-flux -v COMMAND` stays in force
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import quiet

    quiet.install()
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("pulid-flux: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, user_errors()):
            print(f"pulid-flux: error: {describe(exc)}", file=sys.stderr)
        else:
            print(f"pulid-flux: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m pulid_flux.cli`: run the package's module, not this __main__ copy, so that the
    # CommandError the commands raise is the class main() catches.
    from pulid_flux.cli import main as package_main

    sys.exit(package_main())
