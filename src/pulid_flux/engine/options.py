"""Command-line options that choose how the engine is loaded, shared by `generate`, `serve` and
`worker`. Torch-free, so the server process and `--help` stay light."""

from __future__ import annotations

import argparse

# The presets of pulid_flux.engine.presets.PRESETS, listed here to keep --help torch-free.
MODEL_CHOICES = ["tiny", "flux-dev", "flux-dev-random"]


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    # default=None: an option not given leaves the PULID_FLUX_* environment setting in force
    parser.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: cuda if present)")
    parser.add_argument("--weights-dir", help="folder of the flux-dev weights, as `pulid-flux download` fills it "
                        "(default: $PULID_FLUX_WEIGHTS_DIR, else ~/.cache/pulid-flux)")
    parser.add_argument("--offload", action="store_true", default=None,
                        help="model CPU offload of the FLUX parts (less VRAM, slower)")
    fp8 = parser.add_mutually_exclusive_group()
    fp8.add_argument("--fp8", dest="fp8", action="store_const", const="weights", default=None,
                     help="fp8 transformer weights, compute in bf16 (torchao; the official --fp8)")
    fp8.add_argument("--fp8-fast", dest="fp8", action="store_const", const="fast",
                     help="fp8 weights and activations on fp8 tensor cores (CUDA sm89+): faster, "
                     "further from the official images")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the transformer's repeated blocks")
