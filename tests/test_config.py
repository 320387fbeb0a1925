import pytest

from nds.config import (Config, ConfigError, config_hash, flatten, from_dict, load_config, parse_overrides,
                        replace, to_dict)


def test_defaults_validate_and_round_trip():
    cfg = load_config()
    assert from_dict(to_dict(cfg)) == cfg
    assert [str(s) for s in cfg.levels] == ["28x28x1", "4x4x32"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  width: 32\nsweep:\n  sigmas: [0, 1.5]\n")
    cfg = load_config(path, ["model.width=48", "training.steps=7"])
    assert cfg.model.width == 48 and cfg.training.steps == 7
    assert cfg.sweep.sigmas == [0.0, 1.5]


@pytest.mark.parametrize("override, names", [
    ("model.widht=3", "model.widht"),
    ("nonsense.key=1", "nonsense"),
    ("training.steps=many", "training.steps"),
    ("training.steps=1.5", "training.steps"),
    ("hierarchy.sigmas=[0.5,-1]", "hierarchy.sigmas[1]"),
    ("hierarchy.spec='28x28x1, 30x30x8'", "hierarchy.spec"),
    ("hierarchy.spec='28x28x1, 4x4x32, 4x4x64'", "hierarchy.spec"),
    ("hierarchy.spec='28x28'", "hierarchy.spec"),
    ("hierarchy.L=5", "hierarchy.L"),
    ("sweep.depths=[1,4]", "sweep.depths[1]"),
    ("training.zero_stage=4", "training.zero_stage"),
    ("resources.driver_cpus=0", "resources.driver_cpus"),
    ("encoder.bf16=maybe", "encoder.bf16"),
    ("hierarchy.spec='9x16x1, 2x2x8'", "hierarchy.spec level 1"),
    ("training.ema_decay=1.0", "training.ema_decay"),
    ("diffusion.prediction=x0", "diffusion.prediction"),
    ("mdm.baseline=latent", "mdm.baseline"),
    ("model.cond_injection=concat", "model.cond_injection"),
    ("diffusion.cfg_scale=-1", "diffusion.cfg_scale"),
    ("sweep.cfg_scales=[1,-0.5]", "sweep.cfg_scales[1]"),
    ("diffusion.sampler=euler", "diffusion.sampler"),
    ("diffusion.schedule=sigmoid", "diffusion.schedule"),
    ("diffusion.latent_clip=-3", "diffusion.latent_clip"),
    ("eval.diagnostic_samples=-1", "eval.diagnostic_samples"),
])
def test_bad_config_is_named(override, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.width"])


def test_flatten_names_levels_and_sigmas():
    cfg = replace(Config(), **{"hierarchy.spec": "28x28x1, 4x4x32, 2x2x16", "hierarchy.L": 3,
                               "hierarchy.sigmas": [0.25, 1.0]})
    flat = flatten(cfg)
    assert flat["hierarchy.L"] == "3"
    assert flat["hierarchy.sigma.2"] == "0.25" and flat["hierarchy.sigma.3"] == "1.0"
    assert flat["hierarchy.shape.3"] == "2x2x16"
    assert flat["encoder.name"] == "efficientnet_lite0"
    assert all(isinstance(v, str) for v in flat.values())


def test_hash_is_stable_and_sensitive():
    a, b = Config(), Config()
    assert config_hash(a) == config_hash(b)
    assert config_hash(replace(a, **{"hierarchy.sigmas": [0.0, 0.5]})) != config_hash(a)
    assert config_hash(a.encoder) != config_hash(a.data)
