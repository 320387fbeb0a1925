"""The bad-input corpus: every case is refused by the experiment command line before Ray, DeepSpeed or
MLflow start (exit 2), with one line on stderr that names the key, the file (and line) or the path."""
import io
import re
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from nds.sweep.cli import sweep_main
from nds.sweep.protocols import sigma_plan

BASE = ["data.name=digits"]  # data that ships with scikit-learn: only the case under test is wrong


def _yaml(content: str | bytes):
    """A config file bad.yaml holding ``content`` (text, or raw bytes)."""
    def write(tmp: Path) -> list[str]:
        path = tmp / "bad.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["--config", str(path)]
    return write


def _two_configs(tmp: Path) -> list[str]:
    (tmp / "a.yaml").write_text("training:\n  steps: 3\n")
    (tmp / "b.yaml").write_text("training:\n  lr: 1e-3\n")
    return ["--config", str(tmp / "a.yaml"), "--config", str(tmp / "b.yaml")]


def _runs_dir_under_a_file(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("")
    return [f"paths.runs_dir={tmp / 'a_file' / 'runs'}"]


def _extends_itself(tmp: Path) -> list[str]:
    (tmp / "a.yaml").write_text("extends: b.yaml\n")
    (tmp / "b.yaml").write_text("extends: a.yaml\n")
    return ["--config", str(tmp / "a.yaml")]


def _image_folder(kind: str):
    """An image folder (train/ and val/) in which one training file is zero-byte, truncated or not an image."""
    def write(tmp: Path) -> list[str]:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for cls in ("a", "b"):
                (tmp / "imgs" / split / cls).mkdir(parents=True)
                for i in range(2):
                    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
                        tmp / "imgs" / split / cls / f"{i}.jpg")
        jpeg = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
        content = {"zero-byte": b"", "truncated": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
                   "corrupt": b"<html>not an image</html>"}[kind]
        (tmp / "imgs" / "train" / "b" / "bad.jpg").write_bytes(content)
        return ["data.name=image_folder", f"data.root={tmp / 'imgs'}", "hierarchy.spec='32x32x3, 4x4x8'",
                "hierarchy.L=2", "hierarchy.sigmas=[0.5]", "sweep.depths=[1,2]", "mdm.channels=3",
                f"paths.cache_dir={tmp / 'cache'}"]
    return write


# (case, overrides or a function of tmp_path giving argv, what the one-line error must name)
CASES = [
    # keys and values
    ("unknown key", ["model.widht=3"], "model.widht"),
    ("unknown section", ["nonsense.key=1"], "nonsense"),
    ("word for an int", ["training.steps=many"], "training.steps"),
    ("fraction for an int", ["training.steps=1.5"], "training.steps"),
    ("zero steps", ["training.steps=0"], "training.steps"),
    ("negative sigma", ["hierarchy.sigmas=[0.5,-1]"], r"hierarchy.sigmas\[1\]"),
    ("NaN sigma", ["hierarchy.sigmas=[.nan,0.5]"], r"hierarchy.sigmas\[0\].*finite"),
    ("infinite learning rate", ["training.lr=.inf"], "training.lr.*finite"),
    ("zero learning rate", ["training.lr=0"], "training.lr"),
    ("negative warmup", ["training.warmup_steps=-5"], "training.warmup_steps"),
    ("shapes that cannot nest (grow)", ["hierarchy.spec='28x28x1, 30x30x8'"], "hierarchy.spec"),
    ("shapes that cannot nest (same size)", ["hierarchy.spec='28x28x1, 4x4x32, 4x4x64'"], "hierarchy.spec"),
    ("shape without channels", ["hierarchy.spec='28x28'"], "hierarchy.spec"),
    ("shape U-ViT cannot patch", ["hierarchy.spec='9x16x1, 2x2x8'", "hierarchy.sigmas=[0.5]", "sweep.depths=[1,2]"],
     "hierarchy.spec level 1"),
    ("depth beyond the spec", ["hierarchy.L=5"], "hierarchy.L"),
    ("swept depth beyond the spec", ["sweep.depths=[1,4]"], r"sweep.depths\[1\]"),
    ("ZeRO stage", ["training.zero_stage=4"], "training.zero_stage"),
    ("precision", ["training.precision=fp16"], "training.precision"),
    ("EMA decay of 1", ["training.ema_decay=1.0"], "training.ema_decay"),
    ("one Adam beta", ["training.betas=[0.9]"], "training.betas"),
    ("diffusion schedule", ["diffusion.schedule=sigmoid"], "diffusion.schedule"),
    ("sampler name", ["diffusion.sampler=euler"], "diffusion.sampler"),
    ("NestedUNet sampler name", ["mdm.sampler=euler"], "mdm.sampler"),
    ("prediction target", ["diffusion.prediction=x0"], "diffusion.prediction"),
    ("eta on a sampler without it", ["diffusion.sampler=dpm_solver", "diffusion.eta=0.5"], "diffusion.eta"),
    ("more sampling steps than timesteps", ["diffusion.sample_steps=2000"], "diffusion.sample_steps"),
    ("negative guidance scale", ["diffusion.cfg_scale=-1"], "diffusion.cfg_scale"),
    ("negative swept guidance scale", ["sweep.cfg_scales=[1,-0.5]"], r"sweep.cfg_scales\[1\]"),
    ("negative latent clip", ["diffusion.latent_clip=-3"], "diffusion.latent_clip"),
    ("negative diagnostic samples", ["eval.diagnostic_samples=-1"], "eval.diagnostic_samples"),
    ("condition drop of 1", ["diffusion.cond_drop_prob=1"], "diffusion.cond_drop_prob"),
    ("condition injection", ["model.cond_injection=concat"], "model.cond_injection"),
    ("model size", ["model.size=huge"], "model.size"),
    ("text encoder", ["model.text_encoder=gpt9"], "model.text_encoder"),
    ("encoder name", ["encoder.name=resnet9000"], "encoder.name"),
    ("bool as a word", ["encoder.bf16=maybe"], "encoder.bf16"),
    ("dataset name", ["data.name=cifar"], "data.name"),
    ("bad-image policy", ["data.bad_images=ignore"], "data.bad_images"),
    ("reference split", ["eval.reference_split=val"], "eval.reference_split"),
    ("MDM resolutions that do not double", ["mdm.resolutions=[14,21]", "mdm.phase_steps=[1,1]"], r"mdm.resolutions\[1\]"),
    ("MDM phases per resolution", ["mdm.phase_steps=[100]"], "mdm.phase_steps"),
    ("latent baseline without its VAE", ["mdm.baseline=latent"], "mdm.baseline"),
    # seeds
    ("negative seed", ["seed=-1"], "seed=-1"),
    ("negative swept seed", ["sweep.seeds=[0,-3]"], r"sweep.seeds\[1\]"),
    ("no seeds", ["sweep.seeds=[]"], "sweep.seeds"),
    ("repeated seed", ["sweep.seeds=[0,0]"], "sweep.seeds"),
    ("seed beyond 32 bits", ["seed=4294967296"], "seed"),
    # resources
    ("zero-CPU trial driver", ["resources.driver_cpus=0"], "resources.driver_cpus"),
    ("negative worker CPUs", ["resources.cpus_per_worker=-1"], "resources.cpus_per_worker"),
    ("1.5 GPUs a worker", ["resources.gpus_per_worker=1.5"], "resources.gpus_per_worker"),
    ("no workers", ["resources.workers_per_level=0"], "resources.workers_per_level"),
    ("no concurrent trials", ["resources.max_concurrent_trials=0"], "resources.max_concurrent_trials"),
    ("level lock that is always stale", ["resources.level_lock_stale_s=0"], "resources.level_lock_stale_s"),
    # the command line
    ("override without '='", ["model.width"], "key=value"),
    ("override value that is not YAML", ["model.width=[1"], r"model.width=\[1"),
    # files
    ("config file that does not exist", lambda tmp: ["--config", str(tmp / "nope.yaml")], "nope.yaml"),
    ("YAML syntax error", _yaml("model:\n  width: [16, 32\ntraining:\n  steps: 3\n"), r"bad.yaml:\d+:\d+"),
    ("YAML key given twice", _yaml("training:\n  steps: 3\n  lr: 0.01\n  steps: 5\n"), r"bad.yaml:4:.*'steps' given twice"),
    ("YAML that is a list", _yaml("- model\n- training\n"), "<root>"),
    ("YAML section that is a scalar", _yaml("model: 3\n"), "'model'"),
    ("binary config file", _yaml(b"\xff\xfe\x00\x01binary"), "bad.yaml: not a text file"),
    ("config that extends itself", _extends_itself, "extends itself"),
    ("config given twice", _two_configs, r"--config given 2 times \(.*a.yaml, .*b.yaml\): give one file"),
    ("empty extends", _yaml("extends:\ntraining:\n  steps: 3\n"), r"bad.yaml: 'extends:' must name .* got None"),
    ("override inside a value", ["training=3", "training.steps=5"], r"'training' is a section"),
    ("unset variable in a path", ["paths.cache_dir=$NDS_SURELY_UNSET/c"], r"paths.cache_dir=.*NDS_SURELY_UNSET is not set"),
    ("YAML 1.1 boolean word", _yaml("encoder:\n  bf16: yes\n"), r"'encoder.bf16' must be true or false, got 'yes'"),
    ("dataset folder that does not exist", lambda tmp: ["data.name=fashion_mnist", f"data.root={tmp / 'nowhere'}"],
     "nowhere"),
    ("encoder weights that do not exist", lambda tmp: [f"encoder.weights={tmp / 'w.pth'}"], "w.pth"),
    ("CLIP folder that does not exist", lambda tmp: [f"eval.clip_dir={tmp / 'clip'}"], "eval.clip_dir"),
    ("runs folder that cannot be made", _runs_dir_under_a_file, "paths.runs_dir.*is a file"),
    ("zero-byte image", _image_folder("zero-byte"), r"data.bad_images=fail.*bad.jpg \(zero-byte\)"),
    ("truncated image", _image_folder("truncated"), r"data.bad_images=fail.*bad.jpg \(truncated\)"),
    ("file that is not an image", _image_folder("corrupt"), r"data.bad_images=fail.*bad.jpg \(corrupt"),
]


@pytest.mark.parametrize("case, given, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_compute_naming_it(case, given, names, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["--dry-run", *BASE, f"paths.runs_dir={runs}", *(given(tmp_path) if callable(given) else given)]
    code = sweep_main("sweep_sigma", __doc__, sigma_plan, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("error: ")
    assert re.search(names, err), err
    assert not ray.is_initialized()  # refused before Ray (and so before DeepSpeed and MLflow)
    assert not runs.exists()  # nothing written where the run would go


def test_skipped_bad_images_are_counted_and_the_rest_runs(tmp_path, capsys):
    argv = _image_folder("truncated")(tmp_path)
    code = sweep_main("sweep_sigma", __doc__, sigma_plan,
                      ["--dry-run", *argv, "data.bad_images=skip", f"paths.runs_dir={tmp_path / 'runs'}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "data.bad_images=skip: 1 train image file(s) left out" in out.out and "bad.jpg" in out.out
