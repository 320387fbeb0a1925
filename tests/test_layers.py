"""The layers of nds point one way (``.importlinter``), and the config layer validates names through
registries that agree with the implementations behind them."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nds.config import specs
from nds.config.specs import NestedUNetSpec

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / ".importlinter"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_layers_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_catches_an_import_that_points_up(tmp_path):
    """A copy of the package with one function-local import from the config layer into the sweep layer
    (how the config used to reach its validators) breaks the contract, naming both layers."""
    for name in ("nds", "analysis"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path)
    schema = tmp_path / "nds" / "config" / "schema.py"
    schema.write_text(schema.read_text() + "\n\ndef _reaches_up():\n    from nds.sweep.runner import init_ray\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "nds.config is not allowed to import nds.sweep" in result.stdout


def test_loading_and_validating_a_config_imports_no_implementation():
    code = ("import sys; from nds.config import load_config; load_config(None, ['mdm.baseline=cascaded']); "
            "print(sorted(m for m in sys.modules if m == 'torch' or (m.startswith('nds.') and not m.startswith('nds.config'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_config_registries_name_what_the_implementations_provide():
    from nds.diffusion.process import SAMPLE_FUNCTIONS, SCHEDULE_FUNCTIONS
    from nds.latents.text import encoder_dir
    from nds.models.nested_unet import downsample_pyramid
    from nds.models.uvit import uvit_from_size

    from nds.data import DATASETS
    from nds.latents.encoders import ENCODERS

    assert set(specs.SAMPLERS) == set(SAMPLE_FUNCTIONS)
    assert set(specs.SCHEDULES) == set(SCHEDULE_FUNCTIONS)
    assert set(specs.DATASETS) == set(DATASETS)
    assert set(specs.ENCODERS) == set(ENCODERS)
    assert set(specs.LEVEL1_SOURCES) <= set(ENCODERS)  # z_1 is the pixels encoder's or the VAE's
    for size in specs.UVIT_SIZES:
        assert uvit_from_size(size, input_shape=(8, 8, 1), patch_size=4).patch_size == 4
    for injection in specs.COND_INJECTIONS:
        uvit_from_size("tiny", input_shape=(8, 8, 1), patch_size=4, cond_shape=(2, 2, 3), cond_injection=injection)
    import torch

    for mode in specs.DOWNSAMPLE_MODES:
        assert [x.shape[-1] for x in downsample_pyramid(torch.zeros(1, 1, 8, 8), (4, 8), mode)] == [4, 8]
    assert encoder_dir("minilm").is_dir()
    for name in specs.TEXT_ENCODERS[1:]:  # known names that need a local directory, not unknown ones
        with pytest.raises(ValueError, match="needs path="):
            encoder_dir(name)


def test_the_nested_unet_spec_is_checked_without_building_a_model():
    with pytest.raises(ValueError, match="heads=3"):
        NestedUNetSpec(resolutions=(8, 16), core_widths=(16, 32), stage_widths=(8,), heads=3).validate()
