"""The ``pulid-flux`` command line.

Each sub-command lives in the module that owns its work; a module contributes
``add_arguments(parser)`` and ``run(args) -> int``, and keeps heavy imports (torch)
inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("pulid_flux.generate", "generate one image from a prompt and a reference face"),
    "download": ("pulid_flux.engine.download", "download every weight file into one cache directory"),
    "check-parity": ("pulid_flux.engine.parity", "compare the engine with the official reference tensors"),
    "serve": ("pulid_flux.server", "run the fal-compatible HTTP service (and a local worker)"),
    "worker": ("pulid_flux.worker", "run one generation worker against a queue"),
    "make-cert": ("pulid_flux.tls", "make a local self-signed CA and server certificate for TLS"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pulid-flux", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
