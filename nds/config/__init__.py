"""The config layer, the ground floor: the typed config tree (``schema``), the names and
architecture specs it is checked against (``specs``) and its one error. It imports no
implementation (the import contract in ``.importlinter`` keeps it so)."""
from nds.config.errors import ConfigError
from nds.config.schema import (
    BAD_IMAGE_POLICIES,
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

__all__ = ["BAD_IMAGE_POLICIES", "REPO_ROOT", "Config", "ConfigError", "config_hash", "flatten", "from_dict",
           "load_config", "replace", "to_dict", "to_yaml", "validate"]
