"""Reading a config: YAML files (with ``extends:``) and ``key=value`` overrides into one nested dict,
which ``nds.config.schema`` validates.

The YAML is read as YAML 1.2 (its core schema), not PyYAML's YAML 1.1: ``1e-4`` and ``1E-4`` are
numbers, ``yes``/``no``/``on``/``off`` are words, ``010`` is ten. A number keeps the text it was
written as, so a key whose type is a string gets that text (``experiment: 2024.10`` is "2024.10",
not "2024.1"). Merge keys (``<<: *anchor``) merge a mapping; a key given twice in one mapping is an
error. Overrides are parsed by the same rules.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from nds.config.errors import ConfigError

EXTENDS = "extends"  # the key of a preset that names the file it builds on
ANCHORS = "x-"  # top-level keys of a file starting with this hold YAML anchors only (x-common: &common ...)


class _Source:
    """A number read from YAML, with the text it was written as."""

    source: str

    def __new__(cls, value, source: str):
        obj = super().__new__(cls, value)
        obj.source = source
        return obj


class SourceInt(_Source, int):
    pass


class SourceFloat(_Source, float):
    pass


SOURCE_SCALARS = (SourceInt, SourceFloat)

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"  # YAML 1.1 only: in 1.2 a date is a string

# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
_CORE = [
    (_NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), list("~nN") + [""]),
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    (_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")),
    (_FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789")),
]


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader on YAML 1.2's core schema; numbers keep their text; a key given twice in one
    mapping is an error (plain YAML keeps the last, silently); merge keys merge."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT, _BOOL, _NULL, _TIMESTAMP)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        base = 8 if text.startswith("0o") else 16 if text.startswith("0x") else 10
        return SourceInt(int(text[2:] if base != 10 else text, base), text)

    def construct_yaml_float(self, node):
        text = self.construct_scalar(node)
        lowered = text.lower()
        value = float(lowered.replace(".inf", "inf").replace(".nan", "nan"))
        return SourceFloat(value, text)

    def construct_yaml_bool(self, node):
        return self.construct_scalar(node).lower() == "true"

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


for _tag, _regexp, _first in _CORE:
    Loader.add_implicit_resolver(_tag, _regexp, _first)
Loader.add_constructor(_INT, Loader.construct_yaml_int)
Loader.add_constructor(_FLOAT, Loader.construct_yaml_float)
Loader.add_constructor(_BOOL, Loader.construct_yaml_bool)


def plain(value):
    """``value`` with every number read from YAML as a plain int or float (for JSON and comparisons)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, SourceInt):
        return int(value)
    if isinstance(value, SourceFloat):
        return float(value)
    return value


def parse_yaml(text: str, where: str):
    """The content of a YAML document; a syntax error is one line naming ``where``, line and column."""
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise ConfigError(f"{at}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {str(err).splitlines()[0]}") from None


def read_yaml(path: Path):
    """A YAML file's content ({} when empty); a syntax error is one line naming the file, line and column."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    loaded = parse_yaml(text, str(path))
    return {} if loaded is None else loaded


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's nested dict, merged onto what its ``extends: other.yaml`` (relative to it) gives,
    so a preset states only how it differs from the setup it builds on."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} extends itself (via {' -> '.join(map(str, seen))})")
    loaded = read_yaml(path)
    if not isinstance(loaded, dict):
        raise ConfigError(f"config section '<root>' of {path} must be a mapping of sections, got {loaded!r}")
    loaded = {k: v for k, v in loaded.items() if not str(k).startswith(ANCHORS)}
    if EXTENDS not in loaded:
        return loaded
    base = loaded.pop(EXTENDS)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: '{EXTENDS}:' must name the YAML file this one builds on (a path relative "
                          f"to {path.parent}), got {base!r}")
    return merge(read_config_file(path.parent / base.strip(), (*seen, path.resolve())), loaded)


def merge(base: dict, updates: dict, prefix: str = "") -> dict:
    """``updates`` deep-merged onto ``base`` (a new dict): mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_overrides(overrides: list[str]) -> dict:
    """``['model.width=64', 'sweep.sigmas=[0,1]']`` -> nested dict (values parsed as YAML 1.2)."""
    nested: dict = {}
    given: dict[str, str] = {}  # dotted key -> the override that set it
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not _KEY.match(key):
            raise ConfigError(f"override '{item}': '{key}' is not a config key (dotted names, e.g. training.steps)")
        value = parse_yaml(raw, f"override '{item}': value")
        parts = key.split(".")
        node = nested
        for depth, part in enumerate(parts[:-1]):
            section = ".".join(parts[: depth + 1])
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}' sets a key inside '{section}', which '{given[section]}' "
                                  f"set to a value: '{section}' is a section; set its keys one by one")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            inner = next(k for k in given if k.startswith(key + "."))
            raise ConfigError(f"override '{item}' replaces the section '{key}' that '{given[inner]}' sets a key "
                              f"of: '{key}' is a section; set its keys one by one")
        node[parts[-1]] = value
        given[key] = item
    return nested
