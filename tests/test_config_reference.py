"""The config documents itself: --help-config on every script, docs/configuration.md and the JSON Schema
are generated from the schema and kept current, and every preset validates against that schema."""
import importlib
import json
import subprocess
import sys

import jsonschema
import pytest

from nds.config import REPO_ROOT, load_config, read_yaml
from nds.config.loading import plain
from nds.config.reference import JSON_SCHEMA, generated, keys

SCRIPTS = ["sweep_sigma", "sweep_depth", "sweep_shapes", "sweep_encoders", "sweep_rcg", "sweep_mdm", "train_mdm",
           "knn_figure"]


def test_the_generated_reference_and_schema_are_current():
    for path, text in generated().items():
        assert path.is_file() and path.read_text() == text, \
            f"{path.relative_to(REPO_ROOT)} is stale: run python -m nds.config.reference --write"


def test_the_reference_lists_every_key_with_its_description():
    page = (REPO_ROOT / "docs" / "configuration.md").read_text()
    infos = keys()
    assert len(infos) > 100 and all(k.description for k in infos)
    for k in infos:
        assert f"| `{k.key}` |" in page


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(JSON_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_preset_validates_against_the_json_schema(validator):
    presets = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
    assert len(presets) >= 10
    for path in presets:  # a preset is partial and may extend another: the file as written is checked
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(plain(read_yaml(path)))]
        assert not errors, f"{path}: {errors}"


@pytest.mark.parametrize("text, where", [
    ("model:\n  widht: 3\n", "model"),  # a typo
    ("training:\n  steps: many\n", "training.steps"),
    ("diffusion:\n  sampler: euler\n", "diffusion.sampler"),
    ("training:\n  lr: 0\n", "training.lr"),
    ("data:\n  train_limit: 0\n", "data.train_limit"),
    ("extends: 3\n", "extends"),
])
def test_the_json_schema_refuses_what_the_loader_refuses(validator, tmp_path, text, where):
    (tmp_path / "bad.yaml").write_text(text)
    assert any(".".join(map(str, e.path)).startswith(where) or where in e.message
               for e in validator.iter_errors(plain(read_yaml(tmp_path / "bad.yaml"))))
    with pytest.raises(Exception, match=where.split(".")[-1]):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_config_on_every_script(script, capsys):
    main = importlib.import_module(f"experiments.{script}").main
    assert main(["--help-config", "training"]) == 0
    out = capsys.readouterr().out
    assert "training.steps (int, ≥ 1) = 300" in out and "optimiser steps per level" in out
    assert "model.width" not in out  # one section only


def test_help_config_prints_every_key_and_refuses_an_unknown_section(capsys):
    proc = subprocess.run([sys.executable, "experiments/sweep_sigma.py", "--help-config"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and not line.startswith("   ")}
    assert listed == {k.key for k in keys()}
    assert "data.train_limit (int or null, ≥ 2) = 3000" in proc.stdout
    from analysis.make_tables import main

    assert main(["--help-config", "modle"]) == 2
    assert "--help-config modle: no such config section (sections: data, encoder," in capsys.readouterr().err
