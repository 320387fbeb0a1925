"""The config tree: loading, overrides, the YAML format, hashing."""
import os
import subprocess
import sys

import pytest

from nds.config import REPO_ROOT, Config, ConfigError, config_hash, flatten, from_dict, load_config, replace, to_dict, to_yaml


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


# -- the config format (issue 28, item 6) ---------------------------------------------------------


def _file(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_1_2_numbers_in_files_and_overrides(tmp_path):
    """1e-4 and 1E-4 are numbers (PyYAML's YAML 1.1 read them as strings), .5 too; yes/no are words."""
    path = _file(tmp_path, "training:\n  lr: 1e-4\n  ema_decay: .5\ndiffusion:\n  beta_start: 1E-5\n  beta_end: 2.5e-2\n")
    cfg = load_config(path, ["training.weight_decay=1e-2", "diffusion.cfg_scale=1E+1", "training.grad_clip=.25"])
    assert (cfg.training.lr, cfg.training.ema_decay, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == \
        (1e-4, 0.5, 1e-5, 0.025)
    assert (cfg.training.weight_decay, cfg.diffusion.cfg_scale, cfg.training.grad_clip) == (0.01, 10.0, 0.25)
    with pytest.raises(ConfigError, match=r"config key 'encoder.bf16' must be true or false, got 'yes'"):
        load_config(None, ["encoder.bf16=yes"])
    assert load_config(None, ["encoder.bf16=True"]).encoder.bf16 is True


def test_string_keys_keep_the_text_they_were_written_as(tmp_path):
    """tracking.experiment: 2024.10 stayed a float and became "2024.1"; a date became a datetime."""
    path = _file(tmp_path, "tracking:\n  experiment: 2024.10\nhierarchy:\n  spec: 28x28x1, 4x4x32, 2x2x16\n")
    assert load_config(path).tracking.experiment == "2024.10"
    for text in ("2024.10", "1e3", "0x1F", "007", "2024-10-01"):
        assert load_config(None, [f"tracking.experiment={text}"]).tracking.experiment == text
    assert load_config(None, ["model.text_encoder_path=0123"]).model.text_encoder_path == "0123"
    assert load_config(None, ["training.steps=010"]).training.steps == 10  # YAML 1.2: decimal, not octal


def test_merge_keys_and_anchor_holders(tmp_path):
    path = _file(tmp_path, "x-fast: &fast\n  steps: 7\n  lr: 1e-3\ntraining:\n  <<: *fast\n  lr: 2e-3\n"
                           "eval:\n  <<: {num_samples: 40, batch_size: 20}\n")
    cfg = load_config(path)
    assert (cfg.training.steps, cfg.training.lr) == (7, 2e-3)  # the explicit key wins over the merged one
    assert (cfg.eval.num_samples, cfg.eval.batch_size) == (40, 20)
    with pytest.raises(ConfigError, match=r"unknown config key 'fast'.*starts with x-"):
        load_config(_file(tmp_path, "fast: &fast\n  steps: 7\ntraining: *fast\n", "d.yaml"))
    with pytest.raises(ConfigError, match=r"d2.yaml:4:3: .*'steps' given twice \(first on line 3\)"):
        load_config(_file(tmp_path, "training:\n  <<: {lr: 1e-3}\n  steps: 3\n  steps: 4\n", "d2.yaml"))


def test_paths_expand_home_and_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("NDS_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = _file(tmp_path, "paths:\n  runs_dir: $NDS_TEST_ROOT/runs\n  cache_dir: ~/cache\n")
    cfg = load_config(path, ["paths.levels_dir=${NDS_TEST_ROOT}/levels", "data.root=~/data"])
    assert cfg.runs_dir == tmp_path / "runs" and cfg.cache_dir == tmp_path / "home" / "cache"
    assert cfg.levels_dir == tmp_path / "levels" and cfg.data.root == str(tmp_path / "home" / "data")
    assert load_config(None, ["tracking.experiment=$NOT_A_PATH"]).tracking.experiment == "$NOT_A_PATH"
    monkeypatch.delenv("NDS_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError, match=r"paths.runs_dir='\$NDS_UNSET_VAR/x': environment variable \$NDS_UNSET_VAR "
                                          "is not set"):
        load_config(None, ["paths.runs_dir=$NDS_UNSET_VAR/x"])


@pytest.mark.parametrize("overrides, message", [
    (["training=3", "training.steps=5"], r"'training.steps=5' sets a key inside 'training', which 'training=3' set"),
    (["training.steps=5", "training=3"], r"'training=3' replaces the section 'training' that 'training.steps=5'"),
    (["training=3"], r"config section 'training' must be a mapping of its keys, got 3"),
    (["training..steps=3"], r"'training..steps' is not a config key"),
    (["=3"], r"'' is not a config key"),
])
def test_overrides_that_collide_with_a_section(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("extends", ["", "~", "[a.yaml, b.yaml]", "3", "{file: a.yaml}"])
def test_extends_must_name_one_file(tmp_path, extends):
    path = _file(tmp_path, f"extends: {extends}\ntraining:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=rf"c.yaml: 'extends:' must name the YAML file this one builds on .* got "):
        load_config(path)


def test_extends_merges_section_by_section(tmp_path):
    _file(tmp_path, "training:\n  steps: 3\n  lr: 1e-3\nsweep:\n  sigmas: [0, 1]\n", "base.yaml")
    cfg = load_config(_file(tmp_path, "extends: base.yaml\ntraining:\n  lr: 2e-3\nsweep:\n  sigmas: [0.5]\n"))
    assert (cfg.training.steps, cfg.training.lr, cfg.sweep.sigmas) == (3, 2e-3, [0.5])  # lists replace


def test_empty_optional_strings_are_null_and_sentinels_are_gone():
    cfg = load_config(None, ["encoder.weights=", "tracking.uri=''", "sweep.encoder_specs=['', '28x28x1, 2x2x8']",
                             "sweep.encoders=[efficientnet_lite0, random_cnn]"])
    assert cfg.encoder.weights is None and cfg.tracking.uri is None
    assert cfg.sweep.encoder_specs == [None, "28x28x1, 2x2x8"]
    with pytest.raises(ConfigError, match=r"data.train_limit=0 must be >= 2 \(or null: all\)"):
        load_config(None, ["data.train_limit=0"])
    with pytest.raises(ConfigError, match=r"model.width=0 must be >= 1 \(or null: from model.size\)"):
        load_config(None, ["model.width=0"])
    assert load_config(None, ["data.train_limit=null", "model.width=~"]).data.train_limit is None


def test_a_config_round_trips_through_yaml_and_flattens_null_as_empty(tmp_path):
    cfg = load_config(None, ["tracking.experiment=2024.10", "training.lr=1e-4", "data.train_limit=null"])
    path = _file(tmp_path, to_yaml(cfg), "dumped.yaml")
    assert load_config(path) == cfg
    flat = flatten(cfg)
    assert flat["data.train_limit"] == "" and flat["tracking.experiment"] == "2024.10"


def test_hash_is_the_same_in_another_process():
    """config_hash keys the caches and trial reuse: a second process (a Ray worker, the next run) must
    get the same hash for the same config."""
    overrides = ["training.lr=1e-4", "sweep.sigmas=[0.25, 1]", "tracking.experiment=2024.10", "data.train_limit=null"]
    code = ("import sys; from nds.config import config_hash, load_config, to_dict; "
            f"cfg = load_config(None, {overrides!r}); print(config_hash(cfg), config_hash(to_dict(cfg)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    cfg = load_config(None, overrides)
    assert out == [config_hash(cfg), config_hash(to_dict(cfg))]
    assert config_hash(from_dict(to_dict(cfg))) == out[0]
