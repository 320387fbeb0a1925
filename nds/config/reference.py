"""The config's reference, generated from the schema (``nds.config.schema``): every key with its type,
default, constraints and description, for ``--help-config [SECTION]``, docs/configuration.md and the
JSON Schema editors validate presets with (configs/nds-config.schema.json).

    python -m nds.config.reference --write     # regenerate both files
    python -m nds.config.reference --check     # exit 1 if either is stale (CI)
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

from nds.config.errors import ConfigError
from nds.config.loading import ANCHORS, EXTENDS
from nds.config.schema import REPO_ROOT, SECTIONS, Config, Section

DOCS_PAGE = REPO_ROOT / "docs" / "configuration.md"
JSON_SCHEMA = REPO_ROOT / "configs" / "nds-config.schema.json"

INTRO = """\
# Configuration reference

Every run is one typed config tree (`nds/config/schema.py`): the defaults are the laptop demo, a
preset or `--config FILE` changes some keys, and `key=value` words on the command line change more:

    python experiments/sweep_sigma.py --config configs/sweep_sigma/small.yaml training.steps=500 sweep.seeds=[0,1,2]

**Precedence**: defaults < the file that `extends:` names (recursively) < the file < overrides, in
the order given. Mappings merge key by key; anything else (a number, a string, a list) replaces.
`--config` may be given once (a preset that builds on another says `extends: other.yaml`, a path
relative to itself); twice is an error. The whole config is validated before anything starts:
an unknown key, a value of the wrong type or out of range is one line naming the key, and
`--dry-run` also checks every file, the data (class count, channels), addresses and URIs.

**Format**: YAML 1.2, in files and in overrides alike. `1e-4`, `1E-4` and `.5` are numbers;
`yes`/`no`/`on`/`off` are words (booleans are `true`/`false`); `null` (or `~`, or nothing) is
null, which optional keys take to mean what their description says. A key whose type is a string
keeps the text it was written as (`tracking.experiment: 2024.10` is "2024.10"). Anchors and merge
keys (`<<: *base`) work (a top-level key that starts with `x-`, e.g. `x-common: &common`, only
holds anchors and is ignored); a key given twice in one mapping is an error. In path keys (marked
*path* below) `~` and `$VAR` / `${VAR}` are expanded; an unset variable is an error naming the
key and the variable. Relative `paths.*` resolve against the repository root.

**Help and editors**: `python experiments/<script>.py --help-config [SECTION]` prints the keys of
this page. `configs/nds-config.schema.json` is this reference as a JSON Schema: with the YAML
language server (VS Code's YAML extension, ...) a preset that starts with
`# yaml-language-server: $schema=<path to>/configs/nds-config.schema.json` is completed and checked
as it is typed. Both this page and the schema are generated: `python -m nds.config.reference --write`.
"""


@dataclass(frozen=True)
class KeyInfo:
    key: str  # dotted
    type: str
    default: str
    constraints: str
    description: str


def _bounds(metadata) -> list[str]:
    """Readable numeric and length constraints of a field's (or a list item's) metadata (annotated-types'
    Ge, Gt, Le, Lt, MinLen, MaxLen, read by their attribute names)."""
    out, lengths = [], {}
    for m in metadata:
        for name, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(m, name, None)
            if isinstance(value, (int, float)):
                out.append(f"{op} {value:g}" if isinstance(value, float) else f"{op} {value}")
        for name in ("min_length", "max_length"):
            if isinstance(getattr(m, name, None), int):
                lengths[name] = getattr(m, name)
        if hasattr(m, "metadata"):  # a FieldInfo inside Annotated
            out += _bounds(m.metadata)
    low, high = lengths.get("min_length"), lengths.get("max_length")
    if low is not None and low == high:
        out.append(f"{low} entries")
    else:
        out += ([f"≥ {low} entries"] if low is not None else []) + ([f"≤ {high} entries"] if high is not None else [])
    return out


def _describe_type(annotation, path: bool = False) -> tuple[str, list[str]]:
    """(type text, bounds of list items or of the value) of a field annotation."""
    if get_origin(annotation) is Annotated:
        base, *meta = get_args(annotation)
        text, bounds = _describe_type(base, path)
        return text, bounds + _bounds(meta)
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        inner = [a for a in get_args(annotation) if a is not type(None)]
        text, bounds = _describe_type(inner[0], path)
        return f"{text} or null", bounds
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, get_args(annotation))), []
    if get_origin(annotation) is list:
        text, bounds = _describe_type(get_args(annotation)[0])
        return f"list of {text}", [f"each {b}" if not b.startswith("each") else b for b in bounds]
    name = getattr(annotation, "__name__", str(annotation))
    return ("path" if path and name == "str" else name), []


def keys(section: str | None = None) -> list[KeyInfo]:
    """Every config key (of ``section``), in schema order."""
    out = []
    top = [(name, SECTIONS[name]) for name in SECTIONS] + [("", Config)]
    for prefix, model in top:
        if section is not None and prefix != section:
            continue
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
                continue
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            text, bounds = _describe_type(field.annotation, bool(extra.get("x-nds-path")))
            out.append(KeyInfo(f"{prefix}.{name}" if prefix else name, text,
                               json.dumps(field.default, ensure_ascii=False), ", ".join(bounds + _bounds(field.metadata)),
                               field.description or ""))
    return out


def help_text(section: str | None = None) -> str:
    """What ``--help-config [SECTION]`` prints."""
    if section is not None and section not in SECTIONS and section != "seed":
        raise ConfigError(f"--help-config {section}: no such config section (sections: {', '.join(SECTIONS)})")
    lines = []
    for name in SECTIONS if section is None else [section] if section in SECTIONS else []:
        lines.append(f"{name}: {' '.join(SECTIONS[name].__doc__.split())}")
        lines += _key_lines(keys(name))
    if section in (None, "seed"):
        lines += _key_lines(keys(""))
    return "\n".join(lines)


def _key_lines(infos: list[KeyInfo]) -> list[str]:
    lines = []
    for k in infos:
        limits = f", {k.constraints}" if k.constraints else ""
        lines.append(f"  {k.key} ({k.type}{limits}) = {k.default}")
        lines.append(f"      {k.description}")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """docs/configuration.md."""
    parts = [INTRO]
    for name, model in SECTIONS.items():
        parts.append(f"## `{name}`\n\n{' '.join(model.__doc__.split())}\n")
        parts.append("| key | type | default | description |\n|---|---|---|---|")
        for k in keys(name):
            kind = k.type + (f" ({k.constraints})" if k.constraints else "")
            parts.append(f"| `{k.key}` | {_cell(kind)} | `{_cell(k.default)}` | {_cell(k.description)} |")
        parts.append("")
    parts.append("## top level\n\n| key | type | default | description |\n|---|---|---|---|")
    for k in keys(""):
        kind = k.type + (f" ({k.constraints})" if k.constraints else "")
        parts.append(f"| `{k.key}` | {_cell(kind)} | `{_cell(k.default)}` | {_cell(k.description)} |")
    return "\n".join(parts) + "\n"


def json_schema() -> dict:
    """The JSON Schema of a config file: a partial config (every key has a default) that may extend another."""
    schema = Config.model_json_schema()
    schema["properties"] = {EXTENDS: {"type": "string", "minLength": 1,
                                      "description": "the YAML file this one builds on, relative to it"},
                            **schema["properties"]}
    schema["patternProperties"] = {f"^{ANCHORS}": {"description": "holds YAML anchors only; ignored"}}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "nds config", "description": "A config file of nds (a preset): docs/configuration.md",
            **{k: v for k, v in schema.items() if k not in ("title", "description")}}


def generated() -> dict[Path, str]:
    """Each generated file and the text it must hold."""
    return {DOCS_PAGE: markdown(), JSON_SCHEMA: json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write docs/configuration.md and the JSON Schema")
    action.add_argument("--check", action="store_true", help="exit 1 if either file differs from the schema")
    args = parser.parse_args(argv)
    stale = [path for path, text in generated().items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO_ROOT)} is stale: run python -m nds.config.reference --write", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
