"""U-ViT backbone (Bao et al. 2023, "All are worth words") with nested-diffusion conditioning.

Everything is a token: a time token, an optional class token and the patch tokens of the noisy
latent z_l go through pre-LN transformer blocks arranged as in-blocks, a mid block and out-blocks
joined by long skip connections.

Nested conditioning follows §4.1 of the nested diffusion paper: "we use deconvolutional layers to
upsample [ẑ_{l+1}] to match the resolution of z^l. These features are then concatenated as tokens
every two attention blocks, followed by two fully connected layers." Two readings are built
(``cond_injection``), because the sentence admits both and they train differently:

- ``tokens``: a channel-mixing transposed convolution upsamples ẑ_{l+1} (h×w×c)
  to the level's token grid with the model's width, two fully connected layers make condition
  tokens, and these join the sequence as real tokens: they get queries, attention outputs and MLP
  updates like the patch tokens. Before blocks 0, 2, 4, ... of the in/mid/out sequence the
  condition tokens in the sequence are replaced by fresh ones, so each injection lives for two
  blocks.
- ``kv``: a depthwise transposed convolution upsamples ẑ_{l+1} to the level's resolution, it is
  cut into the level's patches and two fully connected layers make condition tokens that, before
  blocks 0, 2, 4, ..., only supply keys and values (their outputs would be discarded, so they are
  not computed): a cheaper path that the condition reaches only through attention. The default:
  on Fashion-MNIST at the small budget both readings score the same within the seed spread (three
  seeds), and ``kv`` costs about half the sampling (README, "The nested gain at laptop scale"); the
  paper presets use ``tokens``, the closer reading of the sentence.

Text conditioning (COCO in the paper) follows U-ViT: the frozen encoder's token sequence is
projected to the width and joins the sequence as extra tokens in every block; padding tokens are
masked out of attention so a caption's length does not change the result.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from nds.config.specs import COND_INJECTIONS, UVIT_SIZES

ARCHITECTURE_VERSION = 5  # bump when a change alters what a level trains to or how its weights load (keys the level store)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, c: int, h: int, w: int) -> Tensor:
    """Inverse of `patchify`: [B, N, p*p*C] -> [B, C, H, W]."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def upsample_geometry(small: int, large: int) -> tuple[int, int]:
    """(kernel, stride) of a ConvTranspose whose output is exactly `large` for input `small`.

    Output size is (small-1)*stride + kernel; kernel >= stride so every output pixel is covered.
    """
    stride = large // small
    return large - (small - 1) * stride, stride


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, ctx: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """Tokens x attend to [x; ctx]; ctx only supplies keys and values (its outputs would be
        discarded, so they are not computed). key_mask: [B, N] bool over x, False = padding."""
        b, n, d = x.shape

        def heads(z: Tensor) -> Tensor:
            return z.reshape(b, z.shape[1], self.heads, d // self.heads).transpose(1, 2)

        if ctx is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            bias = (None, None) if self.qkv.bias is None else (self.qkv.bias[:d], self.qkv.bias[d:])
            q = F.linear(x, self.qkv.weight[:d], bias[0])
            k, v = F.linear(torch.cat([x, ctx], dim=1), self.qkv.weight[d:], bias[1]).chunk(2, dim=-1)
            if key_mask is not None:
                key_mask = F.pad(key_mask, (0, ctx.shape[1]), value=True)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        x = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN transformer block; out-blocks first fuse the long skip with a linear layer.

    Condition tokens ctx join the attention as extra keys and values only: the condition outputs
    are discarded, so queries, MLP and projections run on the main tokens alone."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, skip: bool = False, qkv_bias: bool = True):
        super().__init__()
        self.skip = nn.Linear(2 * width, width) if skip else None
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(
        self, x: Tensor, skip: Tensor | None = None, ctx: Tensor | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x), None if ctx is None else self.norm1(ctx), key_mask)
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT for one level of a nested diffusion model; it outputs ε or v, whichever it is trained on.

    `cond_shape` is the (h, w, c) of ẑ_{l+1} (None at the top level), `num_classes` enables a
    class token (0 = none) and `text_dim` text tokens of that width (0 = none). All conditions
    share one classifier-free guidance drop mask: a dropped example sees the learned null
    condition tokens, the null class (index num_classes) and a single learned null text token.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        cond_shape: tuple[int, int, int] | None = None,
        num_classes: int = 0,
        cond_drop_prob: float = 0.5,
        final_conv: bool = True,
        text_dim: int = 0,
        cond_injection: str = "kv",
        qkv_bias: bool = True,
        mlp_time_embed: bool = True,
    ):
        super().__init__()
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be positive (H, W, C), got {input_shape}")
        H, W, C = input_shape
        if patch_size < 1 or H % patch_size or W % patch_size:
            raise ValueError(f"input {H}x{W} is not divisible by patch_size={patch_size}")
        if width < 1 or heads < 1 or width % heads:
            raise ValueError(f"width={width} must be a positive multiple of heads={heads}")
        if depth < 0 or depth % 2:
            raise ValueError(f"depth={depth} must be even (depth//2 in-blocks and out-blocks)")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if text_dim < 0:
            raise ValueError(f"text_dim must be >= 0, got {text_dim}")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        if cond_injection not in COND_INJECTIONS:
            raise ValueError(f"unknown cond_injection {cond_injection!r}; expected one of {list(COND_INJECTIONS)}")
        if cond_shape is not None:
            if len(cond_shape) != 3 or min(cond_shape) < 1:
                raise ValueError(f"cond_shape must be positive (h, w, c), got {cond_shape}")
            if cond_shape[0] > H or cond_shape[1] > W:
                h, w, _ = cond_shape
                raise ValueError(f"condition {h}x{w} is larger than the level {H}x{W}")

        self.input_shape = tuple(input_shape)
        self.cond_shape = None if cond_shape is None else tuple(cond_shape)
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.text_dim = text_dim
        self.cond_drop_prob = cond_drop_prob
        self.num_patches = num_patches = (H // patch_size) * (W // patch_size)
        self.num_extras = 1 + (num_classes > 0)
        self.cond_injection = cond_injection

        self.patch_embed = nn.Conv2d(C, width, kernel_size=patch_size, stride=patch_size)
        # U-ViT's own configs use the sinusoidal embedding as the time token directly (mlp_time_embed=False)
        self.time_embed = (nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
                           if mlp_time_embed else nn.Identity())
        self.label_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extras + num_patches, width))

        if cond_shape is not None:
            h, w, c = cond_shape
            if cond_injection == "tokens":
                if h > H // patch_size or w > W // patch_size:
                    raise ValueError(f"condition {h}x{w} is finer than the level's {H // patch_size}x{W // patch_size} "
                                     "token grid: cond_injection='tokens' upsamples to the token grid (use 'kv', "
                                     "or a smaller patch)")
                # to the token grid, channels mixed into the width: a full kernel to the pixel grid would
                # dominate the model for a small, wide condition (1x1x256 -> 28x28: 51M weights)
                (kh, sh), (kw, sw) = upsample_geometry(h, H // patch_size), upsample_geometry(w, W // patch_size)
                self.cond_upsample = nn.ConvTranspose2d(c, width, kernel_size=(kh, kw), stride=(sh, sw))
                token_features = width
            else:
                # depthwise to the pixel grid; the MLP below mixes the channels of each patch
                (kh, sh), (kw, sw) = upsample_geometry(h, H), upsample_geometry(w, W)
                self.cond_upsample = nn.ConvTranspose2d(c, c, kernel_size=(kh, kw), stride=(sh, sw), groups=c)
                token_features = c * patch_size**2
            self.cond_mlp = nn.Sequential(nn.Linear(token_features, width), nn.GELU(), nn.Linear(width, width))
            self.cond_pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
            self.null_cond = nn.Parameter(torch.zeros(1, 1, width))

        if text_dim > 0:
            self.text_proj = nn.Linear(text_dim, width)
            self.null_text = nn.Parameter(torch.zeros(1, 1, width))

        self.in_blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth // 2))
        self.mid_block = Block(width, heads, mlp_ratio, qkv_bias=qkv_bias)
        self.out_blocks = nn.ModuleList(Block(width, heads, mlp_ratio, skip=True, qkv_bias=qkv_bias)
                                        for _ in range(depth // 2))

        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_size**2 * C)
        self.final_conv = nn.Conv2d(C, C, 3, padding=1) if final_conv else nn.Identity()
        self.apply(self._init_weights)
        if final_conv:
            # start as the identity: at PyTorch's default init a one-channel level's output passes through one
            # random 3x3 filter, which nearly zeroes some frequencies; the fine noise of the low-noise steps is
            # then hard to predict, and a single level plateaued (loss 0.30 against 0.27) on 2 of 5 seeds
            nn.init.dirac_(self.final_conv.weight)
            nn.init.zeros_(self.final_conv.bias)
        extra_params = ([self.cond_pos_embed, self.null_cond] if cond_shape else []) + (
            [self.null_text] if text_dim else []
        )
        for p in [self.pos_embed] + extra_params:
            nn.init.trunc_normal_(p, std=0.02)
        if cond_shape is not None:
            # variance-preserving, so the condition tokens vary with ẑ_{l+1} at the patch tokens' scale from
            # step 0: through two FC layers at ViT's std 0.02 they carried ~1e-3 of it (below cond_pos_embed)
            # and small levels learned to ignore the condition
            for layer in self.cond_mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
            self._init_upsampling()

    def _init_upsampling(self) -> None:
        """Start the deconvolution as a nearest-neighbour upsampling (each pixel of ẑ_{l+1} copied
        over the patch it covers; mixed by a random unit-gain matrix into the width for ``tokens``).
        PyTorch's default init scales it by ~1/kernel size, which left the condition ~10x below
        the patch tokens: a toy level trained for 500 steps then did not use its condition at all."""
        weight = self.cond_upsample.weight  # [c_in, c_out / groups, kh, kw]
        with torch.no_grad():
            if self.cond_injection == "kv":  # depthwise: one copy per channel
                weight.fill_(1.0)
            else:
                mix = torch.randn(weight.shape[0], weight.shape[1]) / weight.shape[0] ** 0.5
                weight.copy_(mix[:, :, None, None].expand_as(weight))
            nn.init.zeros_(self.cond_upsample.bias)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Small (not zero) output init so the output depends on the condition from step 0.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_inputs(
        self, x: Tensor, cond: Tensor | None, labels: Tensor | None, text: Tensor | None, text_mask: Tensor | None
    ) -> None:
        H, W, C = self.input_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise ValueError(f"x must be [B, {C}, {H}, {W}], got {list(x.shape)}")
        if self.cond_shape is None and cond is not None:
            raise ValueError("cond was passed to a model built without cond_shape (unconditional level)")
        if self.cond_shape is not None:
            h, w, c = self.cond_shape
            if cond is None:
                raise ValueError(
                    f"model expects cond [B, {c}, {h}, {w}]; for the unconditional branch pass a cond "
                    "with drop_cond=ones"
                )
            if tuple(cond.shape) != (x.shape[0], c, h, w):
                raise ValueError(f"cond must be [{x.shape[0]}, {c}, {h}, {w}], got {list(cond.shape)}")
        if self.num_classes == 0 and labels is not None:
            raise ValueError("labels were passed to a model built with num_classes=0")
        if self.num_classes > 0 and (labels is None or tuple(labels.shape) != (x.shape[0],)):
            got = None if labels is None else list(labels.shape)
            raise ValueError(f"model expects labels of shape [{x.shape[0]}], got {got}")
        check_text(self.text_dim, x.shape[0], text, text_mask)

    def _cond_tokens(self, cond: Tensor) -> Tensor:
        """ẑ_{l+1} [B, c, h, w] -> condition tokens [B, num_patches, width], before the null swap."""
        up = self.cond_upsample(cond)
        up = up.flatten(2).transpose(1, 2) if self.cond_injection == "tokens" else patchify(up, self.patch_size)
        return self.cond_mlp(up)

    def _run_blocks(self, blocks, h: Tensor, key_mask: Tensor | None, inject) -> Tensor:
        """The in/mid/out blocks with long skips; ``inject(i, h)`` -> (the sequence for block i, its K/V context)."""
        skips, n_in = [], len(self.in_blocks)
        for i, block in enumerate(blocks):
            h, ctx = inject(i, h)
            h = block(h, skip=skips.pop() if i > n_in else None, ctx=ctx, key_mask=key_mask)
            if i < n_in:
                skips.append(h)
        return h

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor | None = None,
        labels: Tensor | None = None,
        drop_cond: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """x: [B,C,H,W]; t: [B] timesteps in [0, T); cond: [B,c,h,w] (ẑ_{l+1}) or None;
        labels: [B] long or None; drop_cond: [B] bool, True = use the null condition;
        text: [B,N,text_dim] encoder tokens or None; text_mask: [B,N] bool, False = padding.
        drop_cond=None samples Bernoulli(cond_drop_prob) in training and drops nothing in eval.
        Returns the prediction [B,C,H,W]."""
        self._check_inputs(x, cond, labels, text, text_mask)
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if drop_cond is None:
            if self.training:
                drop_cond = torch.rand(b, device=x.device) < self.cond_drop_prob
            else:
                drop_cond = torch.zeros(b, dtype=torch.bool, device=x.device)
        elif tuple(drop_cond.shape) != (b,):
            raise ValueError(f"drop_cond must be [{b}] bool, got {list(drop_cond.shape)}")

        extras = [self.time_embed(timestep_embedding(t, self.pos_embed.shape[-1]))[:, None]]
        if self.label_embed is not None:
            labels = torch.where(drop_cond, self.num_classes, labels)
            extras.append(self.label_embed(labels)[:, None])
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat(extras + [tokens], dim=1) + self.pos_embed
        key_mask = None
        if self.text_dim:
            text_tokens, text_mask = null_text_tokens(self.text_proj(text), text_mask, drop_cond, self.null_text)
            key_mask = F.pad(text_mask, (h.shape[1], 0), value=True)
            h = torch.cat([h, text_tokens], dim=1)

        blocks = [*self.in_blocks, self.mid_block, *self.out_blocks]
        if self.cond_shape is None:
            h = self._run_blocks(blocks, h, key_mask, lambda i, h: (h, None))
        else:
            ctx = self._cond_tokens(cond)
            ctx = torch.where(drop_cond[:, None, None], self.null_cond, ctx) + self.cond_pos_embed
            if self.cond_injection == "kv":  # keys and values in blocks 0, 2, 4, ...
                h = self._run_blocks(blocks, h, key_mask, lambda i, h: (h, ctx if i % 2 == 0 else None))
            else:  # real tokens, replaced by fresh ones before blocks 0, 2, 4, ...
                n = h.shape[1]
                if key_mask is not None:
                    key_mask = F.pad(key_mask, (0, ctx.shape[1]), value=True)
                h = self._run_blocks(blocks, h, key_mask,
                                     lambda i, h: (torch.cat([h[:, :n], ctx], dim=1) if i % 2 == 0 else h, None))

        H, W, C = self.input_shape
        out = self.head(self.norm(h)[:, self.num_extras : self.num_extras + self.num_patches])
        return self.final_conv(unpatchify(out, self.patch_size, C, H, W))


def check_text(text_dim: int, batch: int, text: Tensor | None, text_mask: Tensor | None) -> None:
    """Shared input check of text-conditional models (U-ViT and NestedUNet)."""
    if text_dim == 0:
        if text is not None or text_mask is not None:
            raise ValueError("text was passed to a model built with text_dim=0")
        return
    if text is None or text.ndim != 3 or text.shape[0] != batch or text.shape[2] != text_dim:
        got = None if text is None else list(text.shape)
        raise ValueError(f"model expects text tokens [{batch}, N, {text_dim}], got {got}")
    if text_mask is not None and (text_mask.dtype != torch.bool or text_mask.shape != text.shape[:2]):
        got = f"{text_mask.dtype} {list(text_mask.shape)}"
        raise ValueError(f"text_mask must be bool {list(text.shape[:2])}, got {got}")


def null_text_tokens(
    tokens: Tensor, mask: Tensor | None, drop: Tensor, null_token: Tensor
) -> tuple[Tensor, Tensor]:
    """Replace dropped examples' text by one learned null token (the rest masked out), so the
    unconditional branch is independent of both the caption and its padded length."""
    b, n, _ = tokens.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    only_first = torch.arange(n, device=tokens.device) == 0
    tokens = torch.where(drop[:, None, None], null_token.to(tokens.dtype), tokens)
    return tokens, torch.where(drop[:, None], only_first, mask)


def uvit_from_size(size: str, **kwargs) -> UViT:
    """Build a U-ViT from a named size in UVIT_SIZES; kwargs supply the rest (and may override)."""
    if size not in UVIT_SIZES:
        raise ValueError(f"unknown U-ViT size {size!r}; known sizes: {sorted(UVIT_SIZES)}")
    return UViT(**{**UVIT_SIZES[size], **kwargs})


def count_params(model: nn.Module) -> int:
    """Parameters of any model (U-ViT, NestedUNet, ...)."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, *example_args, **example_kwargs) -> int:
    """FLOPs of one eval-mode forward on the example inputs (matmuls/convs/attention).

    Any nn.Module: a NestedUNet takes its list of per-resolution inputs as the first argument."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*example_args, **example_kwargs)
    finally:
        model.train(was_training)
    return counter.get_total_flops()
