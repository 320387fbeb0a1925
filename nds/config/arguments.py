"""The config's command-line arguments, the same in every script: ``--config FILE`` (once), and
``--help-config [SECTION]``, which prints every key with its type, default and description."""
from __future__ import annotations

import argparse

from nds.config.errors import ConfigError
from nds.config.reference import help_text


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "the embedded laptop demo") -> None:
    parser.add_argument("--config", action="append", metavar="FILE",
                        help=f"YAML config file, once (default: {default}); a preset builds on another with 'extends:'")
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION",
                        help="print every config key (or SECTION's) with its type, default and description, and exit")


def config_file(args: argparse.Namespace) -> str | None:
    """The one ``--config`` file given, or None; twice is an error (the first would be silently dropped)."""
    files = args.config or []
    if len(files) > 1:
        raise ConfigError(f"--config given {len(files)} times ({', '.join(files)}): give one file; a preset that "
                          "builds on another names it with 'extends: other.yaml', and key=value overrides change keys")
    return files[0] if files else None


def config_help(args: argparse.Namespace) -> str | None:
    """The text ``--help-config [SECTION]`` asks for, or None when it was not given."""
    return None if args.help_config is None else help_text(args.help_config or None)
