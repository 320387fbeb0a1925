"""The config layer, the ground floor: the typed config tree (``schema``), how it is read
(``loading``: YAML 1.2 files, ``extends:``, ``key=value`` overrides), the names and architecture
specs it is checked against (``specs``), its reference (``reference``: --help-config, the docs page,
the JSON Schema) and its one error. It imports no implementation (the import contract in
``.importlinter`` keeps it so)."""
from nds.config.errors import ConfigError
from nds.config.loading import parse_overrides, read_yaml
from nds.config.schema import (
    REPO_ROOT,
    Config,
    config_hash,
    flatten,
    from_dict,
    load_config,
    replace,
    to_dict,
    to_yaml,
    validate,
)
from nds.config.specs import BAD_IMAGE_POLICIES

__all__ = ["BAD_IMAGE_POLICIES", "REPO_ROOT", "Config", "ConfigError", "config_hash", "flatten", "from_dict",
           "load_config", "parse_overrides", "read_yaml", "replace", "to_dict", "to_yaml", "validate"]
