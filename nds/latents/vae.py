"""Stable-Diffusion-style AutoencoderKL (the paper's VAE bottleneck and its 256 px -> 32x32x4 z_0).

The modules mirror ``diffusers.AutoencoderKL`` so that its state-dict key names
(``encoder.down_blocks.0.resnets.0.conv1.weight``, ``decoder.mid_block.attentions.0.to_q.weight``,
``quant_conv.weight``, ...) load unchanged from a diffusers-format ``.safetensors`` file such as
``stabilityai/sd-vae-ft-mse``'s ``diffusion_pytorch_model.safetensors``; older files with the
deprecated attention names (``query``/``key``/``value``/``proj_attn``) are renamed on load.
diffusers itself is not needed.  A file written by :func:`save_autoencoder` carries its
architecture in the safetensors metadata, so small VAEs trained here load the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nds.files import atomic_path

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "nds.vae_config"
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config fields; the defaults are Stable Diffusion's VAE."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    scaling_factor: float = 0.18215

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each axis (8 for SD: 256 px -> 32x32)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VAEConfig:
        fields = json.loads(text)
        fields["block_out_channels"] = tuple(fields["block_out_channels"])
        return cls(**fields)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head spatial self-attention with a residual connection (diffusers ``Attention``)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # SD's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Block(nn.Module):
    """``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: resnets then an optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resampler in getattr(self, "downsamplers", []) or getattr(self, "upsamplers", []):
            x = resampler(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            _Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < len(ch) - 1 else None)
            for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([
            _Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, "up" if i < len(ch) - 1 else None)
            for i in range(len(ch))
        ])
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] <-> latents scaled by ``scaling_factor`` (unit-ish variance, as SD's LDMs use them)."""

    def __init__(self, cfg: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
            raise ValueError(f"VAE block_out_channels {cfg.block_out_channels} must be multiples of norm_num_groups={cfg.norm_num_groups}")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance (unscaled) of images ``x`` in [-1, 1]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latents: the posterior mean times ``scaling_factor``."""
        return self.moments(x)[0] * self.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in (roughly) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z / self.config.scaling_factor))


# -- files ------------------------------------------------------------------------------------


def _rename_legacy_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
            key = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
        renamed[key] = value
    return renamed


def _config_of(path: Path, metadata: dict[str, str]) -> VAEConfig:
    """The architecture of a weights file: its own metadata (files saved here), else the diffusers
    ``config.json`` beside it (a diffusers VAE folder), else Stable Diffusion's VAE."""
    if CONFIG_METADATA_KEY in metadata:
        return VAEConfig.from_json(metadata[CONFIG_METADATA_KEY])
    beside = path.with_name("config.json")
    if beside.is_file():
        known = {f.name for f in dataclasses.fields(VAEConfig)}
        return VAEConfig.from_json(json.dumps({k: v for k, v in json.loads(beside.read_text()).items() if k in known}))
    return VAEConfig()


def autoencoder_config(path: str | Path) -> VAEConfig:
    """The architecture of the AutoencoderKL in ``path`` without loading its weights (for preflight checks)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return _config_of(path, f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """A diffusers-format AutoencoderKL ``.safetensors``; errors name the file and what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VAE weights file not found: {path}. Download diffusion_pytorch_model.safetensors from the "
            "Hugging Face repo stabilityai/sd-vae-ft-mse (the SD VAE) and point the config at it."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e
    cfg = _config_of(path, metadata)
    vae = AutoencoderKL(cfg)
    try:
        vae.load_state_dict(_rename_legacy_attention(state), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: not an AutoencoderKL with config {cfg} ({str(e)[:500]})") from e
    return vae.eval().requires_grad_(False)


def save_autoencoder(vae: AutoencoderKL, path: str | Path) -> None:
    """diffusers key names plus the architecture in the metadata (atomic: temp file then rename)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", CONFIG_METADATA_KEY: vae.config.to_json()})


# -- a small VAE for datasets without a pretrained one ----------------------------------------------


def to_unit_range(images: np.ndarray, size: int, channels: int = 3) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float [B, channels, size, size] in [-1, 1] (grey repeated to RGB)."""
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def train_autoencoder(
    images: np.ndarray,
    cfg: VAEConfig,
    image_size: int,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> AutoencoderKL:
    """Fit a KL autoencoder (L1 + L2 reconstruction, SD's tiny KL weight) on uint8 images.

    For datasets whose pretrained VAE is unavailable offline: it gives a real VAE
    bottleneck (low-level, not semantic) for the Table 4a / Fig. 3 comparison.  The
    scaling factor is re-estimated at the end so latents have unit standard deviation.
    """
    if image_size % cfg.downsample:
        raise ValueError(f"VAE image_size {image_size} must be a multiple of {cfg.downsample}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    vae.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen).numpy()
        x = to_unit_range(images[np.sort(idx)], image_size, cfg.in_channels)
        mean, logvar = vae.moments(x)
        z = mean + torch.randn(mean.shape, generator=gen) * (0.5 * logvar).exp()
        recon = vae.decoder(vae.post_quant_conv(z))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("VAE step %d/%d: loss %.4f (kl %.1f)", step + 1, steps, loss.item(), kl.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = to_unit_range(images[: min(len(images), 512)], image_size, cfg.in_channels)
        std = vae.moments(sample)[0].std().item()
    vae.config = dataclasses.replace(cfg, scaling_factor=1.0 / max(std, 1e-6))
    return vae
