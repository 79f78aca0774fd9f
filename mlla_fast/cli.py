"""The `mlla-fast` command line: thin wrappers around importable functions.

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mlla_fast.demo", "the main job: phantom data, prepare, train, evaluate, report"),
    "phantom": ("mlla_fast.data.phantom", "write the built-in synthetic CT-like dataset as NIfTI"),
    "prepare": ("mlla_fast.data.prepare", "reorient, normalise and cache a dataset for fast training"),
    "train": ("mlla_fast.train", "train MLLA-UNet on a prepared dataset"),
    "evaluate": ("mlla_fast.evaluate", "Dice and HD95 of a trained run on whole volumes"),
    "predict": ("mlla_fast.predict", "write label maps for NIfTI images with a trained run"),
    "info": ("mlla_fast.info", "versions, devices and the kernel backend in use"),
}


def available_commands() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlla-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in available_commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
