"""Configuration files for the marina_pp scripts: a TOML file holds command-line options.

``python experiments/marina_pp/run_logreg.py --config experiments/marina_pp/configs/X.toml``
reads the file's top-level keys as the script's long options (``test_size = 10000`` is
``--test-size 10000``; lists are joined with commas, ``true`` sets a flag, ``false`` leaves it
unset); options given on the command line after the file win. An unknown key, or a value the
option does not accept, is an error naming the file. ``--check`` validates a file without
running it (each script builds its configurations and prints what it would run).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path


def _option_strings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def toml_argv(path: str | Path, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line tokens equivalent to the TOML file ``path`` for ``parser``."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    actions = _option_strings(parser)
    argv: list[str] = []
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            known = sorted(d for d in actions if d not in ("config", "help"))
            parser.error(f"{path}: unknown key {key!r}; known: {', '.join(known)}")
        action = actions[dest]
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"{path}: {key} must be true or false; got {value!r}")
            if value:
                argv.append(flag)
            continue
        if isinstance(value, (dict, bool)):
            parser.error(f"{path}: {key} must be a number, a string or a list; got {value!r}")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        argv += [flag, str(value)]
    return argv


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """``parser.parse_args`` with a ``--config FILE`` option whose TOML keys come first."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser.add_argument("--config", default=None,
                        help="TOML file of options (experiments/marina_pp/configs/)")
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        argv = toml_argv(first.config, parser) + argv
    return parser.parse_args(argv)


def parse_mult(text: str):
    """``--shift-back-mult`` of both scripts: a number (2: the MNIST script's reflection through
    x0), or ``lr`` (the a9a script's form, x -> x - lr (x - x0))."""
    if str(text).strip() == "lr":
        return "lr"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shift-back-mult must be a number (2: the MNIST script, a reflection through x0) "
            f"or 'lr' (the a9a script and the paper's text: a step of lr back towards x0); "
            f"got {text!r}") from None
