"""Every config key with a rule is refused by the dry run when broken (issue 28, item 1): the keys are
enumerated from the schema, and each has violating values here or a reason it has no rule. A new key
without either fails test_every_key_has_a_violating_value_or_a_reason.

The cases run the experiment command line in-process (the same load + preflight path as
``experiments/*.py --dry-run``); test_the_run_itself_refuses_before_ray runs real processes."""
import re
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import write_coco
from PIL import Image

from experiments import sweep_mdm
from nds.config import REPO_ROOT
from nds.config.reference import keys
from nds.sweep.cli import sweep_main
from nds.sweep.protocols import sigma_plan

RGB = "hierarchy.spec='28x28x3, 4x4x32, 2x2x16'"


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _folder(classes: int):
    """An RGB image folder (train/ and val/) with ``classes`` classes of two images each."""
    def write(tmp: Path) -> list[str]:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for c in range(classes):
                (tmp / "imgs" / split / f"class{c}").mkdir(parents=True)
                for i in range(2):
                    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                        tmp / "imgs" / split / f"class{c}" / f"{i}.png")
        return ["data.name=image_folder", f"data.root={tmp / 'imgs'}", RGB, f"paths.cache_dir={tmp / 'cache'}"]
    return write


def _coco_without_captions(tmp: Path) -> list[str]:
    write_coco(tmp / "coco")
    return ["data.name=coco2014", f"data.root={tmp / 'coco'}", f"data.captions={tmp / 'nowhere'}", RGB]


def _under_a_file(key: str):
    def write(tmp: Path) -> list[str]:
        (tmp / "a_file").write_text("")
        return [f"{key}={tmp / 'a_file' / 'x'}"]
    return write


def _missing(key: str, *more: str):
    return lambda tmp: [f"{key}={tmp / 'missing.file'}", *more]


@pytest.fixture(scope="module")
def not_mlflow():
    """A real HTTP server that is not MLflow (it serves a folder), on 127.0.0.1."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # its request lines would go to this test's stderr
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


MDM = "mdm"  # the case runs experiments/sweep_mdm.py (the mdm keys a chain sweep does not use)

# key: [(what breaks it: overrides, or a function of tmp_path giving them; what the one-line error says[, MDM])]
VIOLATIONS = {
    "data.name": [(["data.name=cifar"], r"data.name='cifar' must be one of \['fashion_mnist'")],
    "data.root": [(["data.name=fashion_mnist", "data.root=/nonexistent/fm"], r"/nonexistent/fm.*set data.root"),
                  (["data.name=image_folder", "data.root=/nonexistent/if", RGB], r"data.root not found: '/nonexistent/if'")],
    "data.train_limit": [(["data.train_limit=-3"], r"data.train_limit=-3 must be >= 2 \(or null: all\)"),
                         (["data.train_limit=1"], r"data.train_limit=1 must be >= 2")],
    "data.eval_limit": [(["data.eval_limit=1"], r"data.eval_limit=1 must be >= 2")],
    "data.image_size": [(["data.image_size=0"], r"data.image_size=0 must be >= 1"),
                        (["encoder.level1=vae", "encoder.level1_weights=random", "data.image_size=100",
                          "hierarchy.spec='12x12x4, 2x2x8'", "hierarchy.sigmas=[0.5]", "sweep.depths=[1, 2]"],
                         r"encoder.level1=vae at 100 px images \(data.image_size\): .* must be a multiple of 8")],
    "data.captions": [(_coco_without_captions, r"caption annotations not found: .*nowhere.*data.captions")],
    "data.bad_images": [(["data.bad_images=ignore"], r"data.bad_images='ignore' must be one of \['fail', 'skip'\]")],
    "encoder.name": [(["encoder.name=resnet50"], r"encoder.name='resnet50' must be one of")],
    "encoder.weights": [(_missing("encoder.weights"), r"encoder.weights file not found: .*missing.file")],
    "encoder.image_size": [(["encoder.image_size=0"], r"encoder.image_size=0 must be >= 1"),
                           (["encoder.name=clip_vit_b16", "encoder.weights=random", "encoder.image_size=40"],
                            r"encoder.image_size=40 must be a multiple of the 16-pixel ViT patch"),
                           (["encoder.image_size=64"], r"does not fit encoder.name=efficientnet_lite0 at "
                                                       r"encoder.image_size=64: level 2 \(4x4x32\) is larger than the "
                                                       r"encoder's 2x2 feature map")],
    "encoder.batch_size": [(["encoder.batch_size=0"], r"encoder.batch_size=0 must be >= 1")],
    "encoder.cache_dir": [(_under_a_file("encoder.cache_dir"), r"encoder.cache_dir: cannot write .*is a file")],
    "encoder.cpus_per_task": [(["encoder.cpus_per_task=0"], r"encoder.cpus_per_task=0 must be > 0")],
    "encoder.shard_size": [(["encoder.shard_size=0"], r"encoder.shard_size=0 must be >= 1")],
    "encoder.level1": [(["encoder.level1=pixel"], r"encoder.level1='pixel' must be one of \['pixels', 'vae'\]"),
                       (["encoder.level1=vae", "encoder.level1_weights=random"],
                        r"hierarchy.spec level 1 \(28x28x1\) does not match the encoder.level1=vae codes 28x28x4")],
    "encoder.level1_weights": [(_missing("encoder.level1_weights", "encoder.level1=vae"),
                                r"encoder.level1_weights: no AutoencoderKL weights file at .*missing.file")],
    "hierarchy.spec": [(["hierarchy.spec='28x28'"], r"hierarchy.spec '28x28': bad level"),
                       (["hierarchy.spec='28x28x1, 30x30x8'"], r"hierarchy.spec .* more dimensions"),
                       (["hierarchy.spec='28x28x1, 8x8x8'", "hierarchy.sigmas=[0.5]"],
                        r"'28x28x1, 8x8x8' does not fit encoder.name=efficientnet_lite0 at encoder.image_size=128: "
                        r"level 2 \(8x8x8\) is larger than the encoder's 4x4 feature map"),
                       (["hierarchy.spec='128x128x1, 1x1x1500'", "hierarchy.sigmas=[0.5]"],
                        r"level 2 \(1x1x1500\) has more channels than the encoder's 1280"),
                       (["hierarchy.spec='28x28x3, 4x4x32, 2x2x16'"], r"hierarchy.spec level 1 \(28x28x3\) has 3 channel"),
                       (["hierarchy.spec='9x16x1, 2x2x8'", "hierarchy.sigmas=[0.5]", "sweep.depths=[1]"],
                        r"hierarchy.spec level 1 \(9x16x1\) cannot be split into U-ViT patches")],
    "hierarchy.L": [(["hierarchy.L=4"], r"hierarchy.L=4 must be between 1 and the 3 levels"),
                    (["hierarchy.L=0"], r"hierarchy.L=0 must be >= 1")],
    "hierarchy.sigmas": [(["hierarchy.sigmas=[0.5,-1]"], r"hierarchy.sigmas\[1\]=-1 must be >= 0"),
                         (["hierarchy.sigmas=[0.5]"], r"hierarchy.sigmas needs one σ per conditioning level")],
    "model.size": [(["model.size=huge"], r"model.size='huge' must be one of \['tiny', 'small', 'mid', 'large'\]")],
    "model.width": [(["model.width=30", "model.heads=4"], r"model.width=30 is not a multiple of model.heads=4"),
                    (["model.width=0"], r"model.width=0 must be >= 1 \(or null: from model.size\)")],
    "model.depth": [(["model.depth=3"], r"model.depth=3 must be even"),
                    (["model.depth=0"], r"model.depth=0 must be >= 1")],
    "model.heads": [(["model.heads=3"], r"model.size=tiny's width 64 is not a multiple of model.heads=3")],
    "model.max_token_grid": [(["model.max_token_grid=0"], r"model.max_token_grid=0 must be >= 1")],
    "model.num_classes": [(["model.num_classes=5"], r"model.num_classes=5, but data.name=digits has 10 classes"),
                          (["model.num_classes=11"], r"model.num_classes=11, but data.name=digits has 10 classes"),
                          (["model.num_classes=-1"], r"model.num_classes=-1 must be >= 0")],
    "model.text_encoder": [(["model.text_encoder=gpt9"], r"model.text_encoder='gpt9' must be one of .* or null")],
    "model.text_encoder_path": [(_missing("model.text_encoder_path", "model.text_encoder=clip"),
                                 r"model.text_encoder_path: .*missing.file")],
    "model.cond_injection": [(["model.cond_injection=concat"], r"model.cond_injection='concat' must be one of"),
                             (["model.cond_injection=tokens", "model.max_token_grid=1"],
                              r"hierarchy.spec level 2 \(4x4x32\) is finer .* model.cond_injection=tokens")],
    "diffusion.timesteps": [(["diffusion.timesteps=0"], r"diffusion.timesteps=0 must be >= 1")],
    "diffusion.schedule": [(["diffusion.schedule=sigmoid"], r"diffusion.schedule='sigmoid' must be one of")],
    "diffusion.beta_start": [(["diffusion.beta_start=0"], r"diffusion.beta_start=0 must be > 0"),
                             (["diffusion.beta_start=0.05"], r"diffusion.beta_start=0.05 must be below diffusion.beta_end=0.02")],
    "diffusion.beta_end": [(["diffusion.beta_end=2"], r"diffusion.beta_end=2 must be < 1"),
                           (["diffusion.beta_end=1e-5"], r"diffusion.beta_start=0.0001 must be below diffusion.beta_end=1e-05")],
    "diffusion.cond_drop_prob": [(["diffusion.cond_drop_prob=1"], r"diffusion.cond_drop_prob=1 must be < 1")],
    "diffusion.prediction": [(["diffusion.prediction=x0"], r"diffusion.prediction='x0' must be one of \['eps', 'v'\]")],
    "diffusion.sampler": [(["diffusion.sampler=euler"], r"diffusion.sampler='euler' must be one of")],
    "diffusion.sample_steps": [(["diffusion.sample_steps=0"], r"diffusion.sample_steps=0 must be >= 1"),
                               (["diffusion.sample_steps=2000"], r"diffusion.sample_steps=2000 must not exceed"),
                               (["diffusion.sample_steps=1000", "diffusion.sampler=dpm_solver++_fast"],
                                r"diffusion.sample_steps=1000 must be below diffusion.timesteps=1000 for diffusion.sampler")],
    "diffusion.cfg_scale": [(["diffusion.cfg_scale=-1"], r"diffusion.cfg_scale=-1 must be >= 0")],
    "diffusion.eta": [(["diffusion.eta=2"], r"diffusion.eta=2 must be <= 1"),
                      (["diffusion.eta=0.5", "diffusion.sampler=ddpm"], r"diffusion.eta=0.5 is a DDIM setting")],
    "diffusion.latent_clip": [(["diffusion.latent_clip=0"], r"diffusion.latent_clip=0 must be > 0 \(or null: no clipping\)")],
    "training.steps": [(["training.steps=0"], r"training.steps=0 must be >= 1"),
                       (["training.steps=1.5"], r"config key 'training.steps' must be an integer, got 1.5")],
    "training.batch_size": [(["training.batch_size=0"], r"training.batch_size=0 must be >= 1")],
    "training.lr": [(["training.lr=0"], r"training.lr=0 must be > 0"),
                    (["training.lr=.inf"], r"config key 'training.lr' must be a finite number")],
    "training.warmup_steps": [(["training.warmup_steps=-1"], r"training.warmup_steps=-1 must be >= 0")],
    "training.weight_decay": [(["training.weight_decay=-0.1"], r"training.weight_decay=-0.1 must be >= 0")],
    "training.betas": [(["training.betas=[0.9]"], r"training.betas=\[0.9\] must have at least 2 entries"),
                       (["training.betas=[0.9, 1.0]"], r"training.betas\[1\]=1.0 must be < 1")],
    "training.grad_clip": [(["training.grad_clip=-1"], r"training.grad_clip=-1 must be >= 0")],
    "training.ema_decay": [(["training.ema_decay=1"], r"training.ema_decay=1 must be < 1")],
    "training.zero_stage": [(["training.zero_stage=4"], r"training.zero_stage=4 must be <= 3")],
    "training.precision": [(["training.precision=fp16"], r"training.precision='fp16' must be one of")],
    "training.log_every": [(["training.log_every=0"], r"training.log_every=0 must be >= 1")],
    "training.checkpoint_every": [(["training.checkpoint_every=0"], r"training.checkpoint_every=0 must be >= 1")],
    "training.max_failures": [(["training.max_failures=-1"], r"training.max_failures=-1 must be >= 0"),
                              (["training.max_failures=11"], r"training.max_failures=11 must be <= 10")],
    "training.fail_once_at_step": [(["training.fail_once_at_step=0"], r"training.fail_once_at_step=0 must be >= 1")],
    "training.nan_at_step": [(["training.nan_at_step=0"], r"training.nan_at_step=0 must be >= 1")],
    "training.kill_worker_at_step": [(["training.kill_worker_at_step=-2"], r"training.kill_worker_at_step=-2 must be >= 1")],
    "resources.workers_per_level": [(["resources.workers_per_level=0"], r"resources.workers_per_level=0 must be >= 1")],
    "resources.cpus_per_worker": [(["resources.cpus_per_worker=0"], r"resources.cpus_per_worker=0 must be > 0")],
    "resources.gpus_per_worker": [(["resources.gpus_per_worker=-1"], r"resources.gpus_per_worker=-1 must be >= 0"),
                                  (["resources.gpus_per_worker=1.5"], r"resources.gpus_per_worker=1.5: above 1 a worker")],
    "resources.driver_cpus": [(["resources.driver_cpus=0"], r"resources.driver_cpus=0 must be > 0")],
    "resources.eval_workers": [(["resources.eval_workers=0"], r"resources.eval_workers=0 must be >= 1")],
    "resources.eval_cpus_per_worker": [(["resources.eval_cpus_per_worker=0"], r"resources.eval_cpus_per_worker=0 must be > 0")],
    "resources.eval_gpus_per_worker": [(["resources.eval_gpus_per_worker=2.5"],
                                        r"resources.eval_gpus_per_worker=2.5: above 1 a worker takes whole GPUs")],
    "resources.max_concurrent_trials": [(["resources.max_concurrent_trials=0"],
                                         r"resources.max_concurrent_trials=0 must be >= 1")],
    "resources.ray_address": [(["resources.ray_address=localhost"], r"resources.ray_address='localhost': not a Ray address"),
                              (["resources.ray_address=http://127.0.0.1:8265"], r"not a Ray address: give auto, host:port"),
                              (lambda tmp: [f"resources.ray_address=127.0.0.1:{unused_port()}"],
                               r"resources.ray_address = 127.0.0.1:\d+: nothing answers at")],
    "resources.level_lock_stale_s": [(["resources.level_lock_stale_s=0"], r"resources.level_lock_stale_s=0 must be > 0")],
    "resources.level_wait_s": [(["resources.level_wait_s=0"], r"resources.level_wait_s=0 must be > 0 \(or null: while")],
    "eval.num_samples": [(["eval.num_samples=1"], r"eval.num_samples=1 must be >= 2")],
    "eval.batch_size": [(["eval.batch_size=0"], r"eval.batch_size=0 must be >= 1")],
    "eval.grid_size": [(["eval.grid_size=0"], r"eval.grid_size=0 must be >= 1")],
    "eval.substitute_image_size": [(["eval.substitute_image_size=0"], r"eval.substitute_image_size=0 must be >= 1")],
    "eval.data_classifier": [(_folder(1), r"eval.data_classifier: data.name=image_folder .* has 1 class \(class0\)")],
    "eval.classifier_steps": [(["eval.classifier_steps=0"], r"eval.classifier_steps=0 must be >= 1")],
    "eval.classifier_train_limit": [(["eval.classifier_train_limit=0"], r"eval.classifier_train_limit=0 must be >= 1")],
    "eval.diagnostic_samples": [(["eval.diagnostic_samples=-1"], r"eval.diagnostic_samples=-1 must be >= 0"),
                                (["eval.diagnostic_samples=1"], r"eval.diagnostic_samples=1: .* need 2 or more")],
    "eval.reference_split": [(["eval.reference_split=val"], r"eval.reference_split='val' must be one of")],
    "eval.clip_dir": [(_missing("eval.clip_dir"), r"eval.clip_dir: no CLIP model at .*missing.file")],
    "sweep.depths": [(["sweep.depths=[1,4]"], r"sweep.depths\[1\] = 4 must be between 1 and the 3 levels"),
                     (["sweep.depths=[2,2]"], r"sweep.depths\[1\] = 2 repeats sweep.depths\[0\] = 2")],
    "sweep.sigmas": [(["sweep.sigmas=[0.5,-1]"], r"sweep.sigmas\[1\]=-1 must be >= 0"),
                     (["sweep.sigmas=[]"], r"sweep.sigmas is empty: sweep_sigma sweeps σ_L at each depth L > 1"),
                     (["sweep.sigmas=[0.5,0.5]"], r"sweep.sigmas\[1\] = 0.5 repeats sweep.sigmas\[0\] = 0.5"),
                     (["sweep.sigmas=[0.5,0.5000001]"], r"sweep.sigmas\[0\] = 0.5 and sweep.sigmas\[1\] = 0.5000001 both "
                                                         r"print as 0.5 in trial names")],
    "sweep.cfg_scales": [(["sweep.cfg_scales=[1,-0.5]"], r"sweep.cfg_scales\[1\]=-0.5 must be >= 0"),
                         (["sweep.cfg_scales=[1,3,1.0]"], r"sweep.cfg_scales\[2\] = 1.0 repeats sweep.cfg_scales\[0\] = 1")],
    "sweep.seeds": [(["sweep.seeds=[]"], r"sweep.seeds=\[\] must have at least 1 entries"),
                    (["sweep.seeds=[0,1,0]"], r"sweep.seeds\[2\] = 0 repeats sweep.seeds\[0\] = 0.*second sample"),
                    (["sweep.seeds=[4294967296]"], r"sweep.seeds\[0\]=4294967296 must be < 4294967296")],
    "sweep.shapes": [(["sweep.shapes=['28x28']"], r"sweep.shapes\[0\] = '28x28': bad level"),
                     (["sweep.shapes=['28x28x1,4x4x32', '28x28x1, 4x4x32']"], r"sweep.shapes\[1\] = .* repeats")],
    "sweep.encoders": [(["sweep.encoders=[efficientnet_lite0,nope]"], r"sweep.encoders\[1\]='nope' must be one of"),
                       (["sweep.encoders=[vae,vae]"], r"sweep.encoders\[1\] = 'vae' repeats")],
    "sweep.encoder_specs": [(["sweep.encoders=[vae]", "sweep.encoder_specs=[null, null]"],
                             r"sweep.encoder_specs needs one spec \(or null\) per entry of sweep.encoders \(1\), got 2"),
                            (["sweep.encoders=[vae]", "sweep.encoder_specs=['4x4']"], r"sweep.encoder_specs\[0\] = '4x4'")],
    "sweep.rcg_encoder": [(["sweep.rcg_encoder=rcg"], r"sweep.rcg_encoder='rcg' must be one of")],
    "sweep.rcg_spec": [(["sweep.rcg_spec='28x28x1, 1x1'"], r"sweep.rcg_spec = '28x28x1, 1x1': bad level")],
    "sweep.mdm_resolutions": [(["sweep.mdm_resolutions=[[14,21]]"], r"sweep.mdm_resolutions\[0\] = \[14, 21\]: .*"
                                                                     r"not a power-of-two multiple", MDM),
                              (["sweep.mdm_resolutions=[[8,16],[8,16]]"], r"sweep.mdm_resolutions\[1\] = \[8, 16\] repeats")],
    "sweep.mdm_phase_steps": [(["sweep.mdm_phase_steps=[[1]]"], r"sweep.mdm_phase_steps\[0\] = \[1\]: mdm.phase_steps "
                                                                 r"needs one entry per resolution", MDM),
                              (["sweep.mdm_phase_steps=[[0,10],[0,10]]"], r"sweep.mdm_phase_steps\[1\] = \[0, 10\] repeats")],
    "sweep.mdm_baselines": [(["sweep.mdm_baselines=[ldm]"], r"sweep.mdm_baselines\[0\]='ldm' must be one of"),
                            (["sweep.mdm_baselines=[plain,plain]"], r"sweep.mdm_baselines\[1\] = 'plain' repeats")],
    "tracking.uri": [(["tracking.uri=127.0.0.1:5000"], r"tracking.uri='127.0.0.1:5000': no scheme: .*http://127.0.0.1:5000"),
                     (["tracking.uri=mlruns"], r"tracking.uri='mlruns': no scheme: .*sqlite:///mlruns"),
                     (["tracking.uri=localhost:5000"], r"tracking.uri='localhost:5000': no scheme: .*http://localhost:5000"),
                     (["tracking.uri=http://"], r"tracking.uri='http://': names no host"),
                     (lambda tmp: [f"tracking.uri=http://127.0.0.1:{unused_port()}"],
                      r"tracking.uri: no MLflow server answers at http://127.0.0.1:\d+"),
                     ("not_mlflow", r"tracking.uri: the server at http://127.0.0.1:\d+ is not an MLflow tracking server "
                                    r"\(HTTP 404 for MLflow's REST API")],
    "paths.runs_dir": [(_under_a_file("paths.runs_dir"), r"paths.runs_dir: cannot write .*a_file is a file"),
                       (["paths.runs_dir=$NDS_UNSET_VARIABLE/runs"],
                        r"paths.runs_dir='\$NDS_UNSET_VARIABLE/runs': environment variable \$NDS_UNSET_VARIABLE is not set")],
    "paths.cache_dir": [(_under_a_file("paths.cache_dir"), r"paths.cache_dir: cannot write .*a_file is a file")],
    "paths.levels_dir": [(_under_a_file("paths.levels_dir"), r"paths.levels_dir: cannot write .*a_file is a file")],
    "mdm.resolutions": [(["mdm.resolutions=[14,21]", "mdm.phase_steps=[1,1]"], r"mdm.resolutions\[1\] = 21 is not a power"),
                        (["mdm.resolutions=[]"], r"mdm.resolutions=\[\] must have at least 1 entries")],
    "mdm.channels": [(["mdm.channels=3"], r"mdm.channels=3, but data.name=digits images have 1 channel", MDM),
                     (["mdm.channels=0"], r"mdm.channels=0 must be >= 1")],
    "mdm.core_widths": [(["mdm.core_widths=[8,16,32]"], r"mdm: base resolution 14 is not divisible by 2\^2"),
                        (["mdm.core_widths=[]"], r"mdm.core_widths=\[\] must have at least 1 entries")],
    "mdm.core_blocks": [(["mdm.core_blocks=0"], r"mdm.core_blocks=0 must be >= 1")],
    "mdm.attention_levels": [(["mdm.attention_levels=[2]"], r"mdm: attention_levels \(2,\) must index core_widths")],
    "mdm.stage_widths": [(["mdm.stage_widths=[]"], r"mdm: stage_widths needs one positive width per outer resolution")],
    "mdm.stage_blocks": [(["mdm.stage_blocks=0"], r"mdm.stage_blocks=0 must be >= 1")],
    "mdm.heads": [(["mdm.heads=3"], r"mdm: core width 64 \(level 1, with attention\) is not a multiple of heads=3")],
    "mdm.num_classes": [(["mdm.num_classes=5"], r"mdm.num_classes=5, but data.name=digits has 10 classes", MDM),
                        (["mdm.num_classes=-1"], r"mdm.num_classes=-1 must be >= 0")],
    "mdm.cond_drop_prob": [(["mdm.cond_drop_prob=1"], r"mdm.cond_drop_prob=1 must be < 1")],
    "mdm.snr_power": [(["mdm.snr_power=-1"], r"mdm.snr_power=-1 must be >= 0")],
    "mdm.loss_weights": [(["mdm.loss_weights=[1.0]"], r"mdm.loss_weights needs one weight per resolution \(2\) or null"),
                         (["mdm.loss_weights=[1.0,-1.0]"], r"mdm.loss_weights\[1\]=-1.0 must be >= 0")],
    "mdm.prediction": [(["mdm.prediction=x0"], r"mdm.prediction='x0' must be one of")],
    "mdm.phase_steps": [(["mdm.phase_steps=[100]"], r"mdm.phase_steps needs one entry per resolution"),
                        (["mdm.phase_steps=[100,0]"], r"mdm.phase_steps: the last entry must be >= 1"),
                        (["mdm.phase_steps=[-1,100]"], r"mdm.phase_steps\[0\]=-1 must be >= 0")],
    "mdm.sampler": [(["mdm.sampler=euler"], r"mdm.sampler='euler' must be one of"),
                    (["mdm.sampler=dpm_solver++_fast", "diffusion.sample_steps=1000"],
                     r"must be below diffusion.timesteps=1000 for mdm.sampler=dpm_solver\+\+_fast")],
    "mdm.text_layers": [(["mdm.text_layers=-1"], r"mdm.text_layers=-1 must be >= 0")],
    "mdm.threshold": [(["mdm.threshold=0"], r"mdm.threshold=0 must be > 0 \(or null: off\)"),
                      (["mdm.threshold=1.5"], r"mdm.threshold=1.5 must be <= 1")],
    "mdm.downsample": [(["mdm.downsample=nearest"], r"mdm.downsample='nearest' must be one of \['bilinear', 'area'\]")],
    "mdm.baseline": [(["mdm.baseline=ldm"], r"mdm.baseline='ldm' must be one of"),
                     (["mdm.baseline=latent"], r"mdm.baseline=latent needs mdm.vae_weights"),
                     (["mdm.baseline=cascaded", "mdm.phase_steps=[0,200]"], r"mdm.baseline=cascaded: the cascaded baseline")],
    "mdm.vae_weights": [(_missing("mdm.vae_weights", "sweep.mdm_baselines=[latent]", "mdm.latent_downsample=2"),
                         r"mdm.vae_weights: no AutoencoderKL weights file at .*missing.file", MDM)],
    "mdm.latent_downsample": [(["mdm.baseline=latent", "mdm.vae_weights=/x.safetensors", "mdm.latent_downsample=3"],
                               r"mdm.latent_downsample=3 must divide the top resolution 28"),
                              (["mdm.latent_downsample=0"], r"mdm.latent_downsample=0 must be >= 1")],
    "mdm.latent_channels": [(["mdm.latent_channels=0"], r"mdm.latent_channels=0 must be >= 1")],
    "seed": [(["seed=-1"], r"seed=-1 must be >= 0"), (["seed=4294967296"], r"seed=4294967296 must be < 4294967296")],
}

NO_CONSTRAINT = {  # key: why every value of its type is valid
    "encoder.bf16": "a switch",
    "encoder.parallel": "a switch (the sweep runs Ray either way)",
    "model.qkv_bias": "a switch",
    "model.mlp_time_embed": "a switch",
    "diffusion.clip_images": "a switch",
    "sweep.reuse_finished": "a switch",
    "sweep.carry_best_sigma": "a switch",
    "tracking.experiment": "any name: MLflow creates the experiment (null: nds-<script>)",
    "eval.inception_dir": "a folder that may lack the Inception file: the metric is then the named substitute "
                          "(its file checks come with issue 28's security item)",
}


def test_every_key_has_a_violating_value_or_a_reason():
    schema_keys = {k.key for k in keys()}
    assert not set(VIOLATIONS) & set(NO_CONSTRAINT)
    assert schema_keys - set(VIOLATIONS) - set(NO_CONSTRAINT) == set(), "new keys: give each a violation or a reason"
    assert set(VIOLATIONS) | set(NO_CONSTRAINT) <= schema_keys, "keys listed here that the schema no longer has"


CASES = [(key, *case, None)[:4] for key, cases in VIOLATIONS.items() for case in cases]


@pytest.mark.parametrize("key, given, names, script", CASES,
                         ids=[f"{key}-{i}" for key, cases in VIOLATIONS.items() for i in range(len(cases))])
def test_the_dry_run_refuses_each_violation_naming_it(key, given, names, script, tmp_path, capsys, request):
    runs = tmp_path / "runs"
    if given == "not_mlflow":
        given = [f"tracking.uri={request.getfixturevalue('not_mlflow')}"]
    argv = ["--dry-run", "data.name=digits", f"paths.runs_dir={runs}",
            *(given(tmp_path) if callable(given) else given)]
    if script == MDM:
        code = sweep_mdm.main([*argv[:3], "sweep.mdm_resolutions=[]", "sweep.mdm_phase_steps=[]",
                               "sweep.mdm_baselines=[nested]", *argv[3:]])
    else:
        code = sweep_main("sweep_sigma", __doc__, sigma_plan, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{key}: {argv[3:]} was accepted"
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(names, err), err
    assert not ray.is_initialized()
    assert not runs.exists()


@pytest.mark.parametrize("script, extra", [("sweep_sigma", []), ("sweep_mdm", ["sweep.mdm_resolutions=[]",
                                                                              "sweep.mdm_phase_steps=[]"])])
def test_the_violations_name_their_key_and_the_defaults_pass(script, extra, tmp_path, capsys):
    """The control: the same command line without a violation passes (so each case above fails on its
    own value, not on the base)."""
    argv = ["--dry-run", "data.name=digits", f"paths.runs_dir={tmp_path / 'runs'}", *extra]
    code = sweep_mdm.main(argv) if script == "sweep_mdm" else sweep_main(script, __doc__, sigma_plan, argv)
    assert code == 0, capsys.readouterr().err


ISSUE_CASES = [  # issue 28's examples that only a data or an environment check can catch, as a user meets them
    (["model.num_classes=5"], {}, "model.num_classes=5, but data.name=digits has 10 classes"),
    ([], {"RAY_ADDRESS": "localhost"}, "RAY_ADDRESS (the environment) = localhost: not a Ray address"),
    ([], {"MLFLOW_TRACKING_URI": "127.0.0.1:5000"}, "MLFLOW_TRACKING_URI (the environment) = 127.0.0.1:5000: no scheme"),
]


@pytest.mark.parametrize("argv, env, names", ISSUE_CASES)
def test_the_dry_run_checks_the_environment_it_runs_in(argv, env, names, tmp_path, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = sweep_main("sweep_sigma", __doc__, sigma_plan, ["--dry-run", "data.name=digits",
                                                           f"paths.runs_dir={tmp_path / 'runs'}", *argv])
    err = capsys.readouterr().err
    assert code == 2 and names in err, err


def test_the_run_itself_refuses_before_ray(tmp_path):
    """Real processes without --dry-run (the run itself, not the dry run), side by side to save time: each
    refused with exit 2 before Ray starts (no Ray results, no MLflow store), the error naming the key."""
    runs = [("sweep_sigma", ["model.num_classes=5"], "model.num_classes=5, but data.name=digits has 10 classes"),
            ("sweep_sigma", ["diffusion.beta_end=2"], "diffusion.beta_end=2 must be < 1"),
            ("train_mdm", ["mdm.num_classes=3"], "mdm.num_classes=3, but data.name=digits has 10 classes")]
    procs = [subprocess.Popen([sys.executable, f"experiments/{script}.py", "data.name=digits",
                               f"paths.runs_dir={tmp_path / str(i)}", *argv],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (script, argv, _) in enumerate(runs)]
    for i, (proc, (script, argv, names)) in enumerate(zip(procs, runs)):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{script} {argv}: {err[-2000:]}"
        assert names in err, err[-2000:]
        assert not (tmp_path / str(i) / "ray_results").exists() and not (tmp_path / str(i) / "mlflow.db").exists()
