"""
CMAE: Contrastive Masked Autoencoders, in one file.
Huang, Jin, Lu, Hou, Cheng, Fu, Shen, Feng. "Contrastive Masked Autoencoders are Stronger Vision Learners",
TPAMI 2023, arXiv:2207.13532. Official code: github.com/ZhichengHuang/CMAE (its facts are cited as "official code").

MAE plus a contrastive term. One RandomResizedCrop to 256 px gives two 224-px views that differ only by a small
pixel shift and colour augmentation ("pixel shifting"). The online branch is an MAE: a ViT encodes the visible
2x2-patch blocks of the unshifted view, a pixel decoder reconstructs the hidden patches (normalized pixels, L2),
and a second, small "feature decoder" fills in the hidden patches in feature space; the mean of its outputs goes
through a projector and a predictor. The target branch is an EMA copy of the encoder and projector fed with the
FULL shifted, colour-augmented view. InfoNCE pulls each image's two embeddings together against all other images
in the (all-gathered) batch. Total loss = L_r + λ_c·L_c.

    python cmae.py                                        # toy demo: makes toy images once, ~2.5 min on a 2-core CPU
    python cmae.py --data imagenet/                       # one GPU (or CPU), official ViT-B/16 defaults
    torchrun --nproc_per_node=8 cmae.py --data imagenet/  # DDP; official: 32 GPUs x 128 = 4096 images per step
    python cmae.py --eval --ckpt out/cmae/checkpoint.pt   # k-NN and 1/2/5-shot logistic regression (or --ckpt random)
    python cmae.py --show-views                           # a figure of view pairs: what pixel shifting does
    python cmae.py --bench --model vit_base --batch-size 8  # throughput of one training step, no data needed

Measured on 2 idle CPU cores (no GPU), 2026-11-23: one step at batch 8, ViT-S/16 2.81 s (85 % of the fp32 matmul
rate), ViT-B/16 5.25 s (92 %). Commands and more in README.md "Results".

Sections: Config | ViT | Masking | CMAE model | Losses | Data | Schedule | Checkpointing | Pictures | Evaluation |
Benchmark | Train loop (main).
"""
import dataclasses
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import time
from contextlib import nullcontext

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distF
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP


# -----------------------------------------------------------------------------
# Config: every field is a CLI flag (--feat-decoder-depth for feat_decoder_depth). Defaults are the official code's
# ViT-B/16 300-epoch config (configs/pre-training/cmae/cmae_vit-base-p16_32xb128-coslr-300e_in1k.py).

@dataclasses.dataclass
class Config:
    data: str = ""                 # ImageFolder root with train/ (and val/ for --eval); empty = toy images + toy preset
    out: str = "out/cmae"          # checkpoint.pt, log.jsonl, figures and eval.json go here
    preset: str = ""               # "toy": small, fast settings for a CPU demo (applied before the flags you pass)
    # model (official: ViT-B/16, MAE pixel decoder, 2-block feature decoder)
    model: str = "vit_base"        # vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 16
    img_size: int = 224            # side of both views; a multiple of --patch-size
    decoder_depth: int = 8         # pixel decoder = MAE's decoder, 8 x 512 x 16 heads (official config)
    decoder_dim: int = 512
    decoder_heads: int = 16
    feat_decoder_depth: int = 2    # feature decoder: same design, 2 blocks (official config); predicts encoder features
    feat_decoder_dim: int = 512
    feat_decoder_heads: int = 16
    proj_hidden: int = 1536        # projector D -> 1536 -> 256 and predictor 256 -> 1536 -> 256 (official NonLinearNeck)
    proj_dim: int = 256
    # views (official CMAEDataset): crop to --crop-size, online = top-left --img-size, target shifted by [0, --shift]
    crop_size: int = 256           # RandomResizedCrop output; must be >= img_size + shift + 1 (official assert)
    crop_scale: tuple = (0.2, 1.0)  # RandomResizedCrop area range (MAE / official)
    shift: int = 31                # max pixel shift of the target view, per axis, uniform integers [0, shift]
    # masking: official code hides 2x2-patch blocks at 65 %; the paper text uses MAE's per-patch 75 % (--mask-block 1 --mask 0.75)
    mask: float = 0.65             # fraction of blocks hidden: 65 % keeps 17 of 49 blocks = 68 of 196 patches
    mask_block: int = 2            # block side in patches; 1 = MAE's per-patch random masking
    # losses (official CMAEPretrainHead): L = L_r + ct_weight * 2τ * L_c
    temperature: float = 0.07      # τ of InfoNCE
    ct_weight: float = 1.0         # multiplies 2τ; λ_c = ct_weight * 2τ = 0.14 with the defaults
    momentum: float = 0.996        # EMA momentum of the target encoder + projector (official: constant 0.996)
    momentum_end: float = 0.996    # cosine ramp momentum -> momentum_end over the run (official hook; equal = constant)
    # optimisation (official config)
    batch_size: int = 128          # images per GPU per step; official 4096 = 32 GPUs x 128 (use --accum on fewer GPUs)
    epochs: int = 300              # official configs: 300 / 800 / 1600
    max_steps: int = 0             # if > 0: train this many optimizer steps instead, and the schedules span them
    blr: float = 1.5e-4            # base lr; actual lr = blr * effective batch / 256 (2.4e-3 at 4096)
    lr: float = 0.0                # if > 0: absolute lr, no scaling
    min_lr: float = 0.0            # the cosine ends here (official: CosineAnnealingLR eta_min 0)
    warmup_epochs: float = 40      # linear warm-up length (official), converted to steps
    weight_decay: float = 0.05     # AdamW, betas (0.9, 0.95); none on LayerNorm, biases, pos/mask/cls tokens (official)
    accum: int = 1                 # gradient accumulation micro-steps per optimizer step
    # machine
    workers: int = 8               # DataLoader processes decoding images per GPU
    device: str = "auto"           # auto | cuda | cpu
    dtype: str = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False          # torch.compile the model (CUDA: faster after a minute of compiling)
    seed: int = 0
    resume: bool = False           # continue from <out>/checkpoint.pt
    bench: bool = False            # time a few training steps on synthetic input and exit
    show_views: bool = False       # write <out>/views.png (crop | online view | shifted view | + colour) and exit
    # evaluation (--eval): see the Evaluation section for the protocol
    eval: bool = False             # k-NN + few-shot of --ckpt on <data>/train -> <data>/val, then exit
    ckpt: str = ""                 # checkpoint of cmae.py, siammae.py or msn.py, or "random" (untrained --model)
    fewshot_lambda: float = 2.5e-4  # L2 strength of the few-shot logistic regression (MSN logistic_eval.py default)
    # logging
    log_every: int = 20            # steps between log lines (and log.jsonl records)
    fig_every: int = 1000          # steps between reconstruction figures (one more at the end)
    ckpt_every: int = 500          # steps between checkpoints (one more at the end)


PRESETS = {  # `python cmae.py` on a laptop CPU: all view geometry scaled by 64/224 (256 -> 72, 31 -> 7), 2x2 blocks kept
    "toy": dict(model="vit_tiny", patch_size=8, img_size=64, crop_size=72, shift=7, decoder_depth=2, decoder_dim=128,
                decoder_heads=4, feat_decoder_depth=1, feat_decoder_dim=128, feat_decoder_heads=4, proj_hidden=512,
                proj_dim=128, batch_size=32, epochs=40, warmup_epochs=4, blr=5e-3, workers=2,
                log_every=5, fig_every=100, ckpt_every=25),
}

VIT = {  # width / depth / heads (REFERENCE: timm sizes); encoder params at 224 px, patch 16
    "vit_tiny": dict(dim=192, depth=12, heads=3),     # 5.5M
    "vit_small": dict(dim=384, depth=12, heads=6),    # 21.7M
    "vit_base": dict(dim=768, depth=12, heads=12),    # 85.8M
    "vit_large": dict(dim=1024, depth=24, heads=16),  # 303M
}


def fail(msg):
    """User-facing input error: one line naming the problem and the fix, exit code 2, nothing written."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parse_config(argv=None):
    """argparse built from the dataclass, so flag names cannot drift; the preset applies before explicit flags."""
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            ap.add_argument(flag, action="store_true", default=None)
        elif f.type is tuple:
            ap.add_argument(flag, type=type(f.default[0]), nargs=2, default=None)
        else:
            ap.add_argument(flag, type=f.type, default=None)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    preset = given.get("preset") or ("toy" if not given.get("data") and not given.get("bench") else "")
    if preset and preset not in PRESETS:
        fail(f"unknown --preset {preset}; choose from {', '.join(PRESETS)}")
    cfg = Config(**{**(PRESETS[preset] if preset else {}), **given, "preset": preset})
    if preset:
        print(f"preset {preset}: " + ", ".join(f"{k}={v}" for k, v in PRESETS[preset].items() if k not in given))
    cfg.crop_scale = tuple(cfg.crop_scale)
    check_config(cfg)
    return cfg


def check_config(cfg):
    if cfg.model not in VIT:
        fail(f"unknown --model {cfg.model}; choose from {', '.join(VIT)}")
    if cfg.img_size % cfg.patch_size:
        fail(f"--img-size {cfg.img_size} is not divisible by --patch-size {cfg.patch_size}; "
             f"use e.g. --img-size {cfg.img_size // cfg.patch_size * cfg.patch_size}")
    grid = cfg.img_size // cfg.patch_size
    if cfg.mask_block < 1 or grid % cfg.mask_block:
        fail(f"--mask-block {cfg.mask_block} must divide the {grid}x{grid} patch grid; use 1 or a divisor of {grid}")
    if not 0 <= cfg.mask < 1 or int((grid // cfg.mask_block) ** 2 * (1 - cfg.mask)) < 1:
        fail(f"--mask {cfg.mask} must be in [0, 1) and leave at least one visible block")
    if cfg.shift < 0 or cfg.img_size + cfg.shift >= cfg.crop_size + 1:
        fail(f"--crop-size {cfg.crop_size} too small for --img-size {cfg.img_size} + --shift {cfg.shift}; "
             f"need crop >= img + shift (official: 224 + 31 < 256)")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        fail(f"--crop-scale {cfg.crop_scale[0]} {cfg.crop_scale[1]} must satisfy 0 < min <= max <= 1")
    for name in ("decoder", "feat_decoder"):
        if getattr(cfg, f"{name}_dim") % getattr(cfg, f"{name}_heads"):
            fail(f"--{name.replace('_', '-')}-dim must be divisible by --{name.replace('_', '-')}-heads")
    if cfg.temperature <= 0 or not 0 <= cfg.momentum <= 1 or not 0 <= cfg.momentum_end <= 1:
        fail("--temperature must be > 0 and --momentum, --momentum-end in [0, 1]")
    if cfg.batch_size < 2 and not cfg.eval:
        fail(f"--batch-size {cfg.batch_size}: InfoNCE and BatchNorm need at least 2 images per GPU")
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32") or cfg.device not in ("auto", "cuda", "cpu"):
        fail("--dtype takes auto|bf16|fp16|fp32 and --device auto|cuda|cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    if cfg.eval and not cfg.ckpt:
        fail("--eval needs --ckpt PATH (a checkpoint.pt of cmae.py, siammae.py or msn.py) or --ckpt random")


# -----------------------------------------------------------------------------
# ViT (MAE / timm parameter names, so the encoder loads as a plain ViT in propagate.py, timm, DINO tools).
# Shapes: B batch, N patches per image, Nv visible patches, D width, H heads, Dh = D / H, P = p*p*3 pixels per patch,
# G blocks per image (mask units), E projection width (--proj-dim), W world size (DDP processes).

def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D sin-cos table, (1 + grid², dim), cls row zeros. Per patch (x = column, y = row):
    [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)], ω_k = 10000^(−k/(dim/4)), k = 0 .. dim/4 − 1; float64 as MAE.
    (The official CMAE table, from mmselfsup, swaps x and y; for a fixed table trained from scratch that is
    immaterial, and one convention across our files keeps propagate.py simple.)"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")  # (grid, grid) each, row-major like the patches
    xw, yw = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega  # (grid², dim/4)
    table = torch.cat([xw.sin(), xw.cos(), yw.sin(), yw.cos()], dim=1)  # (grid², dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()  # (1 + grid², dim)


class Attention(nn.Module):
    """Multi-head self-attention, softmax(QKᵀ/√Dh)V through F.scaled_dot_product_attention."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh) x (B, H, Dh, N) -> (B, H, N, N) -> (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (ViT / MAE): x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The encoder. embed() makes patch tokens (masking happens between the two calls); encode() runs the blocks."""

    def __init__(self, img_size, patch_size, dim, depth, heads):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, self.grid)[None], requires_grad=False)  # fixed (MAE)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def embed(self, imgs):
        """(B, 3, Himg, Wimg) -> (B, N, D) patch tokens + position, no cls. Position is added BEFORE masking (MAE)."""
        B, C, Himg, Wimg = imgs.shape
        assert Himg == Wimg == self.grid * self.patch_size, f"expected {self.grid * self.patch_size}px input, got {Himg}x{Wimg}"
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D), row-major
        return x + self.pos_embed[:, 1:]

    def encode(self, x, final_norm=True):
        """(B, Nv, D) visible tokens -> (B, 1 + Nv, D): cls (with its zero position slot) prepended, blocks, final LN.
        final_norm=False: the target branch (official: final_norm=False) and the --eval features skip the last LN."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if final_norm else x

    def forward(self, imgs):
        """Plain ViT on a whole image (no mask): (B, 3, Himg, Wimg) -> (B, 1 + N, D)."""
        return self.encode(self.embed(imgs))


def init_weights(m):
    """MAE init: xavier_uniform Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_vit(vit):
    """MAE / official CMAEViT init: Linear + LN as init_weights, patch conv xavier on its (out, in·p·p) view, cls N(0.02)."""
    vit.apply(init_weights)
    w = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(vit.cls_token, std=0.02)
    return vit


# -----------------------------------------------------------------------------
# Masking and patches (MAE conventions, REFERENCE §0; block masking from the official CMAEViT.random_masking)

def block_masking(noise, ratio, grid, block):
    """Hide whole block x block squares of patches. noise (B, G) uniform, one value per block, G = (grid/block)²;
    the len_keep = int(G·(1 − ratio)) blocks with the SMALLEST noise stay visible (MAE's rule, per block). At 224/16
    with 2x2 blocks and ratio 0.65: keep int(49·0.35) = 17 of 49 blocks = 68 of 196 patches (official code).
    block = 1 is MAE's per-patch masking (the paper's 75 % variant). Returns, like MAE's random_masking:
    ids_keep (B, Nv) visible patch ids in raster order, ids_restore (B, N) to un-shuffle [visible, hidden] back to
    patch order, mask (B, N) float, 1 = hidden, 0 = visible."""
    B, G = noise.shape
    g = grid // block  # blocks per side
    len_keep = int(G * (1 - ratio))
    keep_blocks = torch.argsort(noise, dim=1)[:, :len_keep]  # (B, Gk) ids of the visible blocks
    visible = torch.zeros(B, G, device=noise.device).scatter_(1, keep_blocks, 1.0)  # (B, G) 1 = visible block
    visible = visible.view(B, g, 1, g, 1).expand(B, g, block, g, block)  # each block -> block x block patches
    visible = visible.reshape(B, grid * grid)  # (B, N) in patch raster order
    ids_shuffle = torch.argsort(1 - visible, dim=1, stable=True)  # visible patches first, each part in raster order
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :len_keep * block * block], ids_restore, 1 - visible


def gather_tokens(x, ids):
    """x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def patchify(imgs, p):
    """(B, 3, H, W) -> (B, h·w, p·p·3): patches row-major; inside a patch (pixel row, pixel col, channel), channel fastest."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)  # (B, 3, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)  # (B, h, w, p, p, 3) -> (B, N, P)


def unpatchify(x, p, h, w):
    """Inverse of patchify: (B, h·w, p·p·3) -> (B, 3, h·p, w·p)."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, h, p, w, p)
    return x.reshape(B, 3, h * p, w * p)


# -----------------------------------------------------------------------------
# CMAE model: online encoder + pixel decoder + feature decoder + projector + predictor; EMA target encoder + projector

class Decoder(nn.Module):
    """MAE's decoder (official: both the pixel and the feature decoder are MAEPretrainDecoder): Linear(D -> Dd) on the
    encoder's tokens, one learned mask token per hidden patch, un-shuffle, fixed sin-cos position, blocks, LN,
    Linear(Dd -> out). (B, 1 + Nv, D) -> (B, N, out), cls dropped."""

    def __init__(self, enc_dim, dim, depth, heads, out_dim, grid):
        super().__init__()
        self.decoder_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dim, grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, out_dim)

    def forward(self, h, ids_restore):
        y = self.decoder_embed(h)  # (B, 1+Nv, Dd)
        B, N, Nv = y.shape[0], ids_restore.shape[1], y.shape[1] - 1
        y_ = torch.cat([y[:, 1:], self.mask_token.expand(B, N - Nv, -1)], dim=1)  # (B, N, Dd) visible first
        y = torch.cat([y[:, :1], gather_tokens(y_, ids_restore)], dim=1)  # (B, 1+N, Dd) in patch order
        y = y + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]  # (B, N, out)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the GLOBAL batch (all DDP ranks), as the official SyncBN in the projector and predictor.
    Why not nn.SyncBatchNorm: it only runs on GPUs, and DDP on CPU (gloo) must give the same numbers as one process.
    Training: μ = Σx / (W·B), σ² = Σ(x − μ)² / (W·B) through autograd-aware all_reduce (the backward sums the
    gradients of the statistics across ranks, exactly as SyncBN); y = γ(x − μ)/√(σ² + ε) + β. Eval: running stats.
    Same parameter and buffer names as nn.BatchNorm1d."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = x.float()  # statistics in fp32 also under bf16 autocast
        world = dist.get_world_size() if dist.is_initialized() else 1
        n = x.shape[0] * world  # every rank has the same batch size (EpochSampler)
        total = lambda t: distF.all_reduce(t) if world > 1 else t  # noqa: E731  sum over ranks, with gradient
        mean = total(x.sum(0)) / n  # (C,)
        var = total(((x - mean) ** 2).sum(0)) / n  # (C,) biased, as BN normalizes
        with torch.no_grad():  # running stats as nn.BatchNorm1d (unbiased variance); only used in eval mode
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * n / max(n - 1, 1))
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class Head(nn.Module):
    """Projector / predictor (official NonLinearNeck, 2 layers, with_last_bn=False):
    Linear(in, hidden) - BN(eps 1e-6) - ReLU - Linear(hidden, out, no bias). Linear layers keep PyTorch's default
    init and BN starts at γ = 1, β = 0, as the official neck (its init_cfg touches only the BN)."""

    def __init__(self, in_dim, hidden, out_dim):
        super().__init__()
        self.fc0 = nn.Linear(in_dim, hidden)
        self.bn0 = GlobalBatchNorm1d(hidden, eps=1e-6)
        self.fc1 = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x):
        return self.fc1(F.relu(self.bn0(self.fc0(x))))


class CMAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v = VIT[cfg.model]
        self.cfg, self.p, self.grid = cfg, cfg.patch_size, cfg.img_size // cfg.patch_size
        self.encoder = init_vit(ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"]))  # first: the
        # encoder's init is the first use of the seeded RNG, so `--eval --ckpt random` rebuilds exactly this encoder
        self.pixel_decoder = Decoder(v["dim"], cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                                     cfg.patch_size ** 2 * 3, self.grid)
        # official: the feature decoder's Linear predicts p²·3 = 768 values, which equals ViT-B's width; what it must
        # match is the encoder width D, since the SAME projector (EMA) also takes the target encoder's D-dim feature
        self.feature_decoder = Decoder(v["dim"], cfg.feat_decoder_dim, cfg.feat_decoder_depth, cfg.feat_decoder_heads,
                                       v["dim"], self.grid)
        for dec in (self.pixel_decoder, self.feature_decoder):
            dec.apply(init_weights)
            nn.init.normal_(dec.mask_token, std=0.02)
        self.projector = Head(v["dim"], cfg.proj_hidden, cfg.proj_dim)
        self.predictor = Head(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        # target branch: starts as an exact copy (official init_weights), then follows by EMA; never trained by SGD
        self.target_encoder = ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"])
        self.target_projector = Head(v["dim"], cfg.proj_hidden, cfg.proj_dim)
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_projector.load_state_dict(self.projector.state_dict())
        for p in self.target_parameters():
            p.requires_grad = False

    def target_parameters(self):
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    def online_parameters(self):
        """The online twins of target_parameters(), in the same order: the EMA pairs them up."""
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def forward(self, online, target, noise):
        """online (B, 3, S, S): the unshifted view; target (B, 3, S, S): the shifted, colour-augmented view; both
        normalized. noise (B, G) U[0, 1) for the block mask. Returns (loss, loss_rc, loss_ct, pred (B, N, P), mask (B, N))."""
        # online branch (paper Fig. 2, top): encoder on visible blocks, two decoders
        x = self.encoder.embed(online)  # (B, N, D)
        ids_keep, ids_restore, mask = block_masking(noise, self.cfg.mask, self.grid, self.cfg.mask_block)
        h = self.encoder.encode(gather_tokens(x, ids_keep))  # (B, 1+Nv, D)
        pred = self.pixel_decoder(h, ids_restore)  # (B, N, P)
        feat = self.feature_decoder(h, ids_restore).mean(dim=1)  # (B, D): mean over ALL N outputs (official)
        q = self.predictor(self.projector(feat))  # (B, E)
        # target branch (Fig. 2, bottom): no graph at all, not only no gradient
        k = self.target_embedding(target)  # (B, E)
        loss_rc = norm_pix_loss(pred.float(), patchify(online, self.p).float(), mask)
        loss_ct = info_nce(q.float(), gather_across_ranks(k.float()), rank_of(), self.cfg.temperature)
        return total_loss(loss_rc, loss_ct, self.cfg), loss_rc, loss_ct, pred, mask

    @torch.no_grad()
    def target_embedding(self, imgs):
        """EMA encoder on the FULL image, without its final LayerNorm (official final_norm=False), mean of the patch
        tokens (cls excluded), then the EMA projector: (B, 3, S, S) -> (B, E)."""
        h = self.target_encoder.encode(self.target_encoder.embed(imgs), final_norm=False)  # (B, 1+N, D)
        return self.target_projector(h[:, 1:].mean(dim=1))  # (B, D) -> (B, E)


@torch.no_grad()
def ema_update(target_params, online_params, m):
    """θ_t ← m·θ_t + (1 − m)·θ_o for the target encoder and projector (official momentum_update; BN running stats
    are buffers and not averaged)."""
    for t, o in zip(target_params, online_params):
        t.mul_(m).add_((1 - m) * o)


# -----------------------------------------------------------------------------
# Losses (official CMAEPretrainHead)

def norm_pix_loss(pred, target, mask):
    """Reconstruction loss L_r (MAE normalized pixels, masked patches only):
    L_r = Σ_b,n m_bn · mean_P (ŷ_bn − (y_bn − μ_bn)/√(σ²_bn + 1e-6))² / Σ_b,n m_bn.
    pred, target (B, N, P); mask (B, N) 1 = hidden. μ, σ² per patch, σ² UNBIASED (torch .var, as MAE and official)."""
    mean = target.mean(dim=-1, keepdim=True)  # μ_bn
    var = target.var(dim=-1, keepdim=True)  # σ²_bn (unbiased)
    target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, N): MSE per patch
    return (loss * mask).sum() / mask.sum()  # masked patches only, averaged over the whole batch


def info_nce(pred, target_all, rank, tau):
    """Contrastive loss L_c, one direction (online prediction -> target projection), InfoNCE:
    L_c = −(1/B) Σ_i log [ exp(q_i·k_i⁺/τ) / Σ_j exp(q_i·k_j/τ) ],  q = pred/‖pred‖, k = target/‖target‖.
    pred (B, E) this rank's online predictions; target_all (W·B, E) every rank's target projections (rank-major);
    image i of this rank is row rank·B + i of target_all: the positives sit on the diagonal of this rank's block,
    all other W·B − 1 rows are negatives."""
    q = F.normalize(pred, dim=1)  # (B, E)
    k = F.normalize(target_all, dim=1)  # (W·B, E)
    logits = q @ k.T / tau  # (B, E) x (E, W·B) -> (B, W·B)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]  # positive of row i: column rank·B + i
    return F.cross_entropy(logits, labels)  # mean over this rank's B rows


def total_loss(loss_rc, loss_ct, cfg):
    """L = L_r + λ_c·L_c with λ_c = ct_weight · 2τ (official: loss_ct = ct_weight · 2 · t · CE, ct_weight 1):
    the 2τ factor cancels the 1/τ of the logits in the gradient's scale."""
    return loss_rc + cfg.ct_weight * 2 * cfg.temperature * loss_ct


def rank_of():
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def gather_across_ranks(x):
    """(B, E) on every rank -> (W·B, E), rank-major, identical everywhere (official concat_all_gather). No gradient is
    needed: the gathered tensors are the target branch's, computed under no_grad."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)  # (W·B, E)


# -----------------------------------------------------------------------------
# Data: an ImageFolder tree (ImageNet layout). Images are decoded in DataLoader workers and travel as uint8; they
# are normalized on the device. All randomness of a sample (crop, flip, shift, colour augmentation, mask noise) comes
# from a seed made of (seed, epoch, image index), so the data does not depend on worker count, rank count or resuming.

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet (MAE; official img_norm_cfg is the same x 255)


def list_images(root, classes=None):
    """[(path, class index)] of an ImageFolder split root/<class>/<image>, sorted; and the class names.
    Pass `classes` to index a val split with the train split's class list."""
    if not os.path.isdir(root):
        fail(f"{root} does not exist; --data must be an ImageFolder root holding train/<class>/*.jpg (and val/ for --eval)")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        fail(f"{root} has classes not in train/: {', '.join(unknown[:5])}; train/ and val/ must share class folders")
    samples = []
    for c in found:
        for d, _, files in os.walk(os.path.join(root, c), followlinks=True):
            samples += [(os.path.join(d, f), classes.index(c)) for f in sorted(files) if f.lower().endswith(IMG_EXTS)]
    if not samples:
        fail(f"{root} holds no images ({' '.join(IMG_EXTS)}) in class folders; expected {root}/<class>/<image>")
    return sorted(samples), classes


def read_image(path):
    """RGB uint8 (3, H, W), or None when the file cannot be decoded (PIL, as torchvision's ImageFolder loader)."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    except (OSError, ValueError):
        return None


def colour_augmentation(size):
    """Target view only (official CMAEDataset pipeline_aug): ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale
    p 0.2, Gaussian blur σ ∈ [0.1, 2] with p 0.5 (kernel ≈ 10 % of the side, odd, as BYOL's 23 px at 224).
    Works on uint8 tensors and draws from the global torch RNG (seeded per sample by the dataset)."""
    k = 2 * round(0.05 * size) + 1
    return T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                      T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5)])


def pixel_shift(big, size, shift):
    """Pixel shifting (paper §3, official ShiftPixel): from one big crop (3, C, C) take the online view = its top-left
    size x size corner, and the target view = the size x size window moved by dh, dw ~ U{0 .. shift} pixels.
    The two views overlap almost entirely, so the positive pair is plausible for the masked online view."""
    dh, dw = (int(v) for v in torch.randint(0, shift + 1, (2,)))
    return big[:, :size, :size], big[:, dh:dh + size, dw:dw + size], (dh, dw)


class ShiftedViews(torch.utils.data.Dataset):
    """Item (image index, epoch) -> online view (3, S, S) uint8, target view (3, S, S) uint8, mask noise (G,) float."""

    def __init__(self, samples, cfg):
        self.samples, self.cfg = samples, cfg
        self.colour = colour_augmentation(cfg.img_size)
        self.n_blocks = (cfg.img_size // cfg.patch_size // cfg.mask_block) ** 2

    def __len__(self):
        return len(self.samples)

    def views(self, idx):
        """All steps of one sample, kept apart for the tests and --show-views: dict(big, online, shifted, target,
        shift, noise), or None if the image cannot be decoded. Must run inside a seeded RNG fork (see __getitem__)."""
        img = read_image(self.samples[idx][0])
        if img is None:
            return None
        cfg = self.cfg
        # ONE RandomResizedCrop (bicubic) + ONE flip shared by both views (official pipeline_base)
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(cfg.crop_scale), [3 / 4, 4 / 3])
        big = TF.resized_crop(img, i, j, h, w, [cfg.crop_size, cfg.crop_size], T.InterpolationMode.BICUBIC,
                              antialias=True)  # (3, C, C) uint8
        big = big.flip(-1) if torch.rand(()) < 0.5 else big
        online, shifted, shift = pixel_shift(big, cfg.img_size, cfg.shift)
        target = self.colour(shifted)  # colour augmentation on the target view only
        noise = torch.rand(self.n_blocks)  # (G,) mask noise, one per block
        return dict(big=big, online=online, shifted=shifted, target=target, shift=shift, noise=noise)

    def __getitem__(self, key):
        idx, epoch = key
        for attempt in range(len(self.samples)):  # an unreadable image is replaced by the next one, with a warning
            j = (idx + attempt) % len(self.samples)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.cfg.seed, epoch, idx, attempt)) & 0xFFFF_FFFF)
                v = self.views(j)
            if v is not None:
                return v["online"], v["target"], v["noise"]
            print(f"warning: could not decode {self.samples[j][0]}; using another image", flush=True)
        raise RuntimeError("no image could be decoded")


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's split (one seeded permutation per epoch, rank r takes every world-th index), able to start
    mid-epoch after a resume. Yields (image index, epoch) keys."""

    def __init__(self, n, batch, seed, rank=0, world=1):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.epoch, self.start_batch = 0, 0
        self.batches = n // (world * batch)  # drop the ragged end, as drop_last does

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[:self.batches * self.world * self.batch]
        mine = perm[self.rank::self.world][self.start_batch * self.batch:]
        return iter([(int(i), self.epoch) for i in mine])

    def __len__(self):
        return (self.batches - self.start_batch) * self.batch


def normalize(x, device):
    """uint8 (B, 3, S, S) -> normalized float on the device."""
    x = x.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def data_root(cfg):
    if cfg.data:
        return cfg.data
    import toydata
    return os.path.join(toydata.ensure_toy_data(), "images")


# -----------------------------------------------------------------------------
# Schedule (MAE / official: per iteration, not per epoch)

def lr_at(step, total, warmup, peak, floor):
    """1) linear warm-up 0 -> peak over `warmup` steps (official LinearLR from 1e-4·peak, i.e. ~0);
    2) half-cycle cosine peak -> floor over the rest."""
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def momentum_at(step, total, base, end):
    """Official MomentumUpdateHook: m = end − (end − base)·(cos(π·step/total) + 1)/2; base = end = 0.996 -> constant."""
    return end - (end - base) * (math.cos(math.pi * step / total) + 1) / 2


def param_groups(model, weight_decay):
    """Official paramwise_cfg: no weight decay on parameters whose name contains 'ln' (every LayerNorm there is named
    ln*), 'bias', 'pos_embed', 'mask_token' or 'cls_token'. Our LayerNorms are named norm*, so we test the module
    type. Everything else IS decayed, including the projector/predictor BatchNorm weights (named bn* there)."""
    no_decay = set()
    for mod_name, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.LayerNorm) or name in ("bias", "pos_embed", "mask_token", "cls_token",
                                                         "decoder_pos_embed"):
                no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if id(p) not in no_decay], weight_decay=weight_decay),
            dict(params=[p for p in params if id(p) in no_decay], weight_decay=0.0)]


# -----------------------------------------------------------------------------
# Checkpointing: one dict with everything to continue exactly; written atomically (temp file + rename)

ARCH_KEYS = ("model", "patch_size", "img_size", "decoder_depth", "decoder_dim", "decoder_heads", "feat_decoder_depth",
             "feat_decoder_dim", "feat_decoder_heads", "proj_hidden", "proj_dim")


def atomic_write_text(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_checkpoint(path, model, optimizer, scaler, step, cfg):
    """model.state_dict() holds the online network (encoder., pixel_decoder., ...) AND the EMA branch
    (target_encoder., target_projector.): one dict restores both."""
    state = dict(method="cmae", model=model.state_dict(), optimizer=optimizer.state_dict(),
                 scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg), source_sha256=SOURCE_SHA,
                 rng=dict(torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, model, optimizer, scaler, cfg):
    """Restore everything; returns the step to continue from. Refuses a checkpoint of another architecture."""
    if not os.path.exists(path):
        fail(f"--resume but there is no checkpoint at {path}; drop --resume or point --out at the run's folder")
    state = torch.load(path, map_location="cpu", weights_only=True)
    theirs = state.get("config", {})
    diff = [f"{k}={theirs.get(k)} (you: {getattr(cfg, k)})" for k in ARCH_KEYS if theirs.get(k) != getattr(cfg, k)]
    if state.get("method") != "cmae" or diff:
        fail(f"{path} is a checkpoint of another architecture: {', '.join(diff) or state.get('method')}; "
             f"pass the same flags or another --out")
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


# -----------------------------------------------------------------------------
# Pictures: reconstruction (online | masked | prediction | target view) and the view pairs of --show-views

def to_rgb(x):
    """normalized (..., 3, S, S) -> uint8 in [0, 255]."""
    std, mu = torch.tensor(STD).view(3, 1, 1), torch.tensor(MEAN).view(3, 1, 1)
    return (x.float().cpu() * std + mu).clamp(0, 1).mul(255).byte()


def write_grid(path, grid):
    """grid (rows, cols, 3, S, S) uint8 -> one PNG, written atomically."""
    b, c, _, S, _ = grid.shape
    img = grid.permute(0, 3, 1, 4, 2).reshape(b * S, c * S, 3).numpy()  # (rows·S, cols·S, 3)
    cv2.imwrite(path + ".tmp.png", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
    os.replace(path + ".tmp.png", path)


@torch.no_grad()
def reconstruction_figure(path, online, target, pred, mask, p, rows=4):
    """online, target (B, 3, S, S) normalized; pred (B, N, P) in normalized-pixel units, de-normalized with the true
    patch statistics for display (as MAE's demo). Columns: online view | its visible blocks | reconstruction (visible
    patches pasted back) | target view (shifted + colour)."""
    online, pred, mask = online[:rows].float().cpu(), pred[:rows].float().cpu(), mask[:rows].cpu()
    g = online.shape[-1] // p
    x = patchify(online, p)  # (b, N, P)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    m = mask[..., None]  # (b, N, 1)
    masked = unpatchify(x * (1 - m), p, g, g)
    recon = unpatchify((pred * (var + 1e-6) ** 0.5 + mean) * m + x * (1 - m), p, g, g)
    write_grid(path, to_rgb(torch.stack([online, masked, recon, target[:rows].float().cpu()], dim=1)))


def show_views(cfg, samples, rows=6):
    """<out>/views.png: the crop with the online (green) and target (red) windows | online view | shifted view before
    colour | target view. Shows that pixel shifting keeps the two views almost aligned."""
    ds = ShiftedViews(samples, cfg)
    C, S = cfg.crop_size, cfg.img_size
    tiles = []
    for r in range(min(rows, len(samples))):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((cfg.seed, 0, r, 0)) & 0xFFFF_FFFF)
            v = ds.views(r)
        if v is None:
            continue
        big = np.ascontiguousarray(v["big"].permute(1, 2, 0).numpy())  # (C, C, 3) RGB
        dh, dw = v["shift"]
        cv2.rectangle(big, (0, 0), (S - 1, S - 1), (0, 255, 0), 1)
        cv2.rectangle(big, (dw, dh), (dw + S - 1, dh + S - 1), (255, 0, 0), 1)
        pad = lambda t: F.pad(t, (0, C - S, 0, C - S))  # noqa: E731  views (3, S, S) -> (3, C, C), black margin
        tiles.append(torch.stack([torch.from_numpy(big).permute(2, 0, 1), pad(v["online"]), pad(v["shifted"]),
                                  pad(v["target"])]))
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "views.png")
    write_grid(path, torch.stack(tiles))
    print(f"wrote {path}: crop {C}px with online (green) and target (red) windows | online | shifted | target")


# -----------------------------------------------------------------------------
# Evaluation (--eval), the protocol msn.py implements too, so the numbers compare across methods:
#   encoder  `encoder.` of a cmae.py / siammae.py checkpoint, `target_encoder.` of an msn.py one, architecture from the
#            checkpoint's config (model, patch_size, img_size); `--ckpt random` = the untrained encoder of --model
#            (exactly the initial encoder of a training run with the same --seed).
#   images   <data>/train (labelled pool) and <data>/val; shorter side -> round(img_size·256/224), bicubic; center
#            crop img_size; ImageNet mean/std.
#   features cls token output of the last block BEFORE the final LayerNorm (MSN's protocol), L2-normalized;
#            batched under torch.inference_mode.
#   k-NN     k = 20 (fewer if fewer train images), cosine similarity, each neighbour votes exp(sim/0.07) for its class
#            (DINO's weighted k-NN), top-1 % on val.
#   few-shot n = 1, 2, 5 train images per class, 5 seeded draws each; multinomial logistic regression without bias
#            on the L2-normalized features, full-batch L-BFGS (strong Wolfe) on mean cross-entropy + (λ/2)·‖W‖²,
#            λ = --fewshot-lambda / n_train (MSN logistic_eval.py: lambd 0.00025 divided by the number of samples);
#            top-1 % on the whole val set, mean ± std over the 5 draws.
#   output   one table `k-NN top-1 | 1-shot | 2-shot | 5-shot`, and <out>/eval.json.

KNN_K, KNN_T, SHOTS, DRAWS = 20, 0.07, (1, 2, 5), 5


def load_encoder(cfg):
    """(ViT, description) for --ckpt PATH or --ckpt random."""
    if cfg.ckpt == "random":
        torch.manual_seed(cfg.seed)  # same RNG use as CMAE.__init__, whose first act is building + initialising this
        v = VIT[cfg.model]
        return init_vit(ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"])), f"random {cfg.model}"
    if not os.path.exists(cfg.ckpt):
        fail(f"--ckpt {cfg.ckpt} does not exist; pass a checkpoint.pt of cmae.py, siammae.py or msn.py, or 'random'")
    try:
        state = torch.load(cfg.ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  any unreadable file is the same user error
        fail(f"--ckpt {cfg.ckpt} is not a readable torch checkpoint ({type(e).__name__}); pass a checkpoint.pt")
    method = state.get("method") if isinstance(state, dict) else None
    prefix = {"cmae": "encoder.", "siammae": "encoder.", "msn": "target_encoder."}.get(method)
    if prefix is None:
        fail(f"--ckpt {cfg.ckpt} has method {method!r}; expected a checkpoint of cmae.py, siammae.py or msn.py")
    arch = state["config"]
    if arch.get("model") not in VIT:
        fail(f"--ckpt {cfg.ckpt} has an unknown model {arch.get('model')!r}")
    v = VIT[arch["model"]]
    vit = ViT(arch["img_size"], arch["patch_size"], v["dim"], v["depth"], v["heads"])
    weights = {k[len(prefix):]: t for k, t in state["model"].items() if k.startswith(prefix)}
    missing, unexpected = vit.load_state_dict(weights, strict=False)
    if missing or unexpected:
        fail(f"--ckpt {cfg.ckpt}: '{prefix}' weights do not fit a {arch['model']}/{arch['patch_size']} ViT "
             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    cfg.model, cfg.patch_size, cfg.img_size = arch["model"], arch["patch_size"], arch["img_size"]
    return vit, f"{method} {arch['model']}/{arch['patch_size']} step {state.get('step')}"


class EvalImages(torch.utils.data.Dataset):
    def __init__(self, samples, img_size):
        self.samples, self.S = samples, img_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img = read_image(self.samples[i][0])
        if img is None:
            raise RuntimeError(f"cannot decode {self.samples[i][0]}")
        img = TF.resize(img, round(self.S * 256 / 224), T.InterpolationMode.BICUBIC, antialias=True)  # shorter side
        return TF.center_crop(img, self.S), self.samples[i][1]


def extract_features(vit, samples, cfg, device, batch=64):
    """L2-normalized cls features before the final LN: (n, D), labels (n,)."""
    loader = torch.utils.data.DataLoader(EvalImages(samples, cfg.img_size), batch_size=batch,
                                         num_workers=min(cfg.workers, 4))
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            h = vit.encode(vit.embed(normalize(x, device)), final_norm=False)  # (b, 1+N, D)
            feats.append(F.normalize(h[:, 0].float(), dim=1).cpu())  # (b, D) cls token
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)  # concatenated outside inference mode: usable by the L-BFGS fit


def knn_top1(train_f, train_y, val_f, val_y, n_classes, k=KNN_K, t=KNN_T):
    """DINO's weighted k-NN: the k most cosine-similar train images vote exp(sim/t) for their class; top-1 %."""
    k = min(k, train_f.shape[0])
    sim = val_f @ train_f.T  # (n_val, D) x (D, n_train) -> (n_val, n_train)
    top_sim, top_idx = sim.topk(k, dim=1)  # (n_val, k)
    votes = torch.zeros(val_f.shape[0], n_classes).scatter_add_(1, train_y[top_idx], (top_sim / t).exp())
    return 100.0 * (votes.argmax(1) == val_y).float().mean().item()


def logistic_regression(x, y, n_classes, lam, iters=100):
    """W (D, C) minimizing mean_i CE(x_i·W, y_i) + (λ/2)·‖W‖², full batch, L-BFGS from W = 0 (deterministic).
    At most `iters` iterations (the toy fits converge in ~15). Few-shot fits are tiny and latency-bound: on a busy
    2-core CPU one fit took 2.1 s with 2 threads and 16 ms with 1, so small fits run single-threaded."""
    W = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=iters, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W, y) + lam / 2 * (W ** 2).sum()  # (n, D) x (D, C) -> (n, C)
        loss.backward()
        return loss
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if x.numel() * n_classes < 10 ** 7 else threads)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return W.detach()


def few_shot(train_f, train_y, val_f, val_y, n_classes, shots, lam, seed):
    """Top-1 % per draw: n images per class drawn with a generator seeded by (seed, n, draw)."""
    accs = []
    for draw in range(DRAWS):
        g = torch.Generator().manual_seed(seed * 1000 + 10 * shots + draw)
        pick = []
        for c in range(n_classes):
            ids = (train_y == c).nonzero().flatten()
            pick.append(ids[torch.randperm(len(ids), generator=g)[:shots]])
        pick = torch.cat(pick)
        W = logistic_regression(train_f[pick], train_y[pick], n_classes, lam / len(pick))
        accs.append(100.0 * ((val_f @ W).argmax(1) == val_y).float().mean().item())
    return accs


def evaluate(cfg, device):
    vit, what = load_encoder(cfg)
    vit = vit.to(device).eval()
    root = data_root(cfg)
    train, classes = list_images(os.path.join(root, "train"))
    val, _ = list_images(os.path.join(root, "val"), classes)
    t0 = time.perf_counter()
    train_f, train_y = extract_features(vit, train, cfg, device)
    val_f, val_y = extract_features(vit, val, cfg, device)
    C = len(classes)
    result = dict(ckpt=cfg.ckpt, encoder=what, data=root, n_train=len(train), n_val=len(val), classes=C,
                  knn_top1=knn_top1(train_f, train_y, val_f, val_y, C))
    for n in SHOTS:
        accs = few_shot(train_f, train_y, val_f, val_y, C, n, cfg.fewshot_lambda, cfg.seed)
        result[f"{n}shot"] = dict(mean=statistics.mean(accs), std=statistics.pstdev(accs), draws=accs)
    print(f"eval {what} on {root}: {len(train)} train / {len(val)} val images, {C} classes, "
          f"{time.perf_counter() - t0:.0f} s")
    print("k-NN top-1 | 1-shot | 2-shot | 5-shot")
    print(f"{result['knn_top1']:.1f} | " + " | ".join(f"{result[f'{n}shot']['mean']:.1f} ± {result[f'{n}shot']['std']:.1f}"
                                                       for n in SHOTS))
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_text(os.path.join(cfg.out, "eval.json"), json.dumps(result, indent=1))
    return result


# -----------------------------------------------------------------------------
# Benchmark helpers: FLOPs of one training step, measured matmul rate of this machine

def synthetic_batch(cfg, batch, device):
    S, G = cfg.img_size, (cfg.img_size // cfg.patch_size // cfg.mask_block) ** 2
    return (torch.randn(batch, 3, S, S, device=device), torch.randn(batch, 3, S, S, device=device),
            torch.rand(batch, G, device=device))


def train_flops_per_image(model, cfg, device):
    """FLOPs of forward (online + target) + backward for one image, counted by torch's FlopCounterMode on a real step
    (attention through the math kernel so its matmuls are counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(*synthetic_batch(cfg, 2, device))[0].backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state, strict=False)  # the counting step must not move the BN running statistics
    return fc.get_total_flops() / 2


def matmul_rate(device, dtype, n=2048, reps=10):
    """FLOP/s of an n x n x n matmul, median of `reps` after one warm-up (the step time is a median too): the
    reference for '% of this machine's matmul rate'."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[1:])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(cfg, model, device, ctx, dtype, steps=5):
    """Times full training steps (forward, backward, AdamW, EMA) on synthetic input; one summary line."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, betas=(0.9, 0.95), fused=True)
    online, target, noise = synthetic_batch(cfg, cfg.batch_size, device)
    flops = train_flops_per_image(model, cfg, device) * cfg.batch_size
    times = []
    for i in range(steps + 2):  # the first two steps warm up allocators and caches
        sync(device)
        t = time.perf_counter()
        with ctx:
            loss = model(online, target, noise)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(model.target_parameters(), model.online_parameters(), cfg.momentum)
        sync(device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[2:])
    peak = matmul_rate(device, torch.float32 if dtype == "fp32" else torch.bfloat16)
    print(f"bench | {cfg.model}/{cfg.patch_size} {cfg.img_size}px | pixel decoder {cfg.decoder_depth}x{cfg.decoder_dim}"
          f"x{cfg.decoder_heads}, feature decoder {cfg.feat_decoder_depth}x{cfg.feat_decoder_dim}x{cfg.feat_decoder_heads} "
          f"| batch {cfg.batch_size} | mask {cfg.mask} block {cfg.mask_block} | {dt * 1e3:.0f} ms/step (median of {steps}) "
          f"| {cfg.batch_size / dt:.2f} img/s | {flops / dt / 1e9:.1f} GFLOP/s = {100 * flops / dt / peak:.0f}% of {dtype} "
          f"matmul {peak / 1e9:.1f} GFLOP/s (median 2048^3 on {device.type}, {torch.get_num_threads()} threads) | "
          f"{flops / 1e9:.1f} GFLOP/step", flush=True)


# -----------------------------------------------------------------------------
# Train loop

SOURCE_SHA = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:12]


def setup_device(cfg):
    """DDP from torchrun's environment (NCCL on CUDA, gloo on CPU), device, autocast context. Prints what it decided."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    rank, local, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = {"auto": "bf16" if cuda else "fp32"}.get(cfg.dtype, cfg.dtype)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    print0 = print if rank == 0 else (lambda *a, **k: None)
    print0(f"device {device} | autocast {dtype} | tf32 {'on' if cuda else 'n/a'} | world {world} | "
           f"{torch.get_num_threads()} cpu threads | source sha256 {SOURCE_SHA}")
    return device, ctx, dtype, rank, world, print0


def make_loader(cfg, rank, world, device, print0):
    root = data_root(cfg)
    if not os.path.isdir(root):
        fail(f"--data {root} does not exist; pass an ImageFolder root holding train/<class>/*.jpg (e.g. imagenet/)")
    samples, classes = list_images(os.path.join(root, "train"))
    sampler = EpochSampler(len(samples), cfg.batch_size, cfg.seed, rank, world)
    if sampler.batches == 0:
        fail(f"{len(samples)} images are fewer than one step needs ({world} x {cfg.batch_size}); lower --batch-size")
    loader = torch.utils.data.DataLoader(ShiftedViews(samples, cfg), batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if cfg.workers else None)
    print0(f"data {root}/train: {len(samples)} images in {len(classes)} folders (labels unused), "
           f"{sampler.batches} steps per epoch of {world} x {cfg.batch_size} images")
    return loader, sampler, samples


def main(argv=None):
    cfg = parse_config(argv)
    device, ctx, dtype, rank, world, print0 = setup_device(cfg)
    if cfg.eval:
        return evaluate(cfg, device)
    if cfg.show_views:
        return show_views(cfg, list_images(os.path.join(data_root(cfg), "train"))[0])
    torch.manual_seed(cfg.seed)  # same init on every rank; masks and augmentation come from the data seed
    model = CMAE(cfg).to(device)
    n_enc = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"CMAE {cfg.model}/{cfg.patch_size} encoder {n_enc / 1e6:.2f}M params | decoders, projector, predictor "
           f"{(n_all - n_enc) / 1e6:.2f}M | EMA target {sum(p.numel() for p in model.target_parameters()) / 1e6:.2f}M "
           f"(no gradient) | mask {cfg.mask} in {cfg.mask_block}x{cfg.mask_block} blocks")
    if cfg.bench:
        return bench(cfg, model, device, ctx, dtype)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not cfg.resume:
        fail(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
    loader, sampler, _ = make_loader(cfg, rank, world, device, print0)

    # optimizer and schedules (official config)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=True)  # fused: 3x faster on CPU too
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    eff_batch = cfg.batch_size * cfg.accum * world
    peak_lr = cfg.lr or cfg.blr * eff_batch / 256
    steps_per_epoch = sampler.batches // cfg.accum
    if steps_per_epoch == 0:
        fail(f"--accum {cfg.accum} is more than the {sampler.batches} batches of an epoch; lower --accum")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    print0(f"effective batch {eff_batch} images ({world} x {cfg.batch_size} x accum {cfg.accum}) | base lr {cfg.blr:.2e} "
           f"-> lr {peak_lr:.2e} | {total} steps, {warmup} warm-up | weight decay on "
           f"{sum(p.numel() for p in groups[0]['params']) / 1e6:.2f}M params, off on "
           f"{sum(p.numel() for p in groups[1]['params']) / 1e3:.1f}K | λ_c = {cfg.ct_weight * 2 * cfg.temperature:.3f}")
    step = load_checkpoint(ckpt_path, model, optimizer, scaler, cfg) if cfg.resume else 0
    if cfg.resume:
        print0(f"resumed from {ckpt_path} at step {step}")
    print0("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    raw_model = model
    flops_per_image = train_flops_per_image(raw_model, cfg, device)
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    stop = {"requested": False}  # Ctrl-C: finish the step, checkpoint, exit (a second Ctrl-C kills)
    def request_stop(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, request_stop)

    t_last, imgs_since, acc, n_acc, last_ckpt = time.perf_counter(), 0, torch.zeros(3), 0, "none yet"
    model.train()
    while step < total:
        sampler.epoch, first = divmod(step, steps_per_epoch)  # resume mid-epoch: same order, same samples
        sampler.start_batch = first * cfg.accum
        batches = iter(loader)
        for _ in range(min(steps_per_epoch - first, total - step)):
            # 1) schedules for this step
            lr = lr_at(step, total, warmup, peak_lr, cfg.min_lr)
            m = momentum_at(step, total, cfg.momentum, cfg.momentum_end)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # 2) forward / backward with accumulation
            t_data, losses = 0.0, torch.zeros(3, device=device)  # (L, L_r, L_c) of this step
            for micro in range(cfg.accum):
                t0 = time.perf_counter()
                online, target, noise = next(batches)
                online, target, noise = normalize(online, device), normalize(target, device), noise.to(device)
                t_data += time.perf_counter() - t0
                sync_grads = micro == cfg.accum - 1 or world == 1
                with (nullcontext() if sync_grads else model.no_sync()), ctx:
                    loss, loss_rc, loss_ct, pred, mask = model(online, target, noise)
                scaler.scale(loss / cfg.accum).backward()
                losses += torch.stack([loss, loss_rc, loss_ct]).detach().float() / cfg.accum
            # 3) optimizer step, then 4) the EMA of the target branch (official: after each iteration)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema_update(raw_model.target_parameters(), raw_model.online_parameters(), m)
            step += 1
            imgs_since += eff_batch
            # 5) NaN guard and Ctrl-C, agreed across ranks so that no rank waits for another
            flags = torch.cat([losses, torch.tensor([float(stop["requested"])], device=device)])
            if world > 1:
                dist.all_reduce(flags)
            flags = flags.cpu()
            if not math.isfinite(flags[0].item()):
                print0(f"error: loss is {flags[0].item()} at step {step}; lower --blr or use --dtype fp32 "
                       f"(last good checkpoint: {last_ckpt})", file=sys.stderr)
                raise SystemExit(1)
            acc, n_acc = acc + flags[:3] / world, n_acc + 1
            # 6) log
            if step % cfg.log_every == 0 or step == total:
                sync(device)
                dt = time.perf_counter() - t_last
                ms, rate = 1e3 * dt / (imgs_since / eff_batch), imgs_since / dt
                loss_val, rc, ct = (acc / n_acc).tolist()  # means over the interval and the ranks
                eta = (total - step) * ms / 1e3 / 3600
                print0(f"step {step:06d}/{total} ({100 * step / total:.1f}%) | loss {loss_val:.4f} (rc {rc:.4f}, "
                       f"ct {ct:.4f}) | lr {lr:.2e} | m {m:.4f} | {ms:.0f} ms/step (data {1e3 * t_data:.0f}) | "
                       f"{rate:.1f} img/s | {flops_per_image * rate / 1e9:.1f} GFLOP/s | eta {eta:.2f}h", flush=True)
                if rank == 0:
                    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(dict(step=step, epoch=step / steps_per_epoch, loss=loss_val, loss_rc=rc,
                                                loss_ct=ct, lr=lr, momentum=m, ms_per_step=ms, img_per_s=rate)) + "\n")
                t_last, imgs_since, acc, n_acc = time.perf_counter(), 0, torch.zeros(3), 0
            # 7) pictures and checkpoints
            if rank == 0 and (step % cfg.fig_every == 0 or step == total):
                reconstruction_figure(os.path.join(cfg.out, f"recon_{step:06d}.png"), online, target, pred, mask,
                                      cfg.patch_size)
            if step % cfg.ckpt_every == 0 or step == total or flags[3].item() > 0:
                if rank == 0:
                    save_checkpoint(ckpt_path, raw_model, optimizer, scaler, step, cfg)
                last_ckpt = f"{ckpt_path} at step {step}"
            if flags[3].item() > 0:
                print0(f"interrupted: checkpoint saved at step {step}; continue with --resume")
                raise SystemExit(130)
    print0(f"done: {step} steps; checkpoint {ckpt_path}; evaluate with: python cmae.py --eval --ckpt {ckpt_path}"
           + (f" --data {cfg.data}" if cfg.data else ""))
    if world > 1:
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
