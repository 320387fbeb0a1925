from nds.config import Config, config_hash, flatten, from_dict, load_config, replace, to_dict


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
