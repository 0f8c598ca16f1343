"""
SiamMAE: Siamese Masked Autoencoders, in one file.
Gupta, Wu, Deng, Fei-Fei. "Siamese Masked Autoencoders", NeurIPS 2023, arXiv:2305.14344.

Two frames f1 < f2 of one video go through ONE shared-weight ViT encoder, each on its own: f1 with no mask,
f2 with 95 % of its patches hidden. A decoder whose blocks cross-attend from f2's tokens to f1's tokens
reconstructs f2's hidden patches (normalized pixels, L2). To fill in 95 % of f2 the model has to find where
things went since f1, so its features learn correspondence; propagate.py measures that on DAVIS-2017.

    python siammae.py                                   # toy demo: makes toy videos once, ~2 min on an idle 2-core CPU
    python siammae.py --data ucf101/ --mask 0.95        # one GPU (or CPU), paper defaults
    torchrun --nproc_per_node=8 siammae.py --data kinetics400/ --batch-size 256   # DDP, 2048 pairs per step
    python siammae.py --bench --model vit_small         # throughput of one training step, no data needed

Measured on a 2-core CPU (no GPU), 2026-11-23: one ViT-S/16 step (batch 8, mask 0.95, decoder 8x512) 3.57 s =
164 GFLOP/s = 87 % of the fp32 matmul rate; toy demo 110 steps in 1m52s. Commands and more in README.md "Results".

Sections: Config | ViT | Masking | SiamMAE model | Loss | Data | Schedule | Checkpointing | Pictures |
Benchmark | Train loop (main). The paper's text is cited as (§n), its tables as (Table n).
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch.nn.parallel import DistributedDataParallel as DDP

cv2.setNumThreads(1)  # decoding runs in DataLoader workers; OpenCV's own thread pool would oversubscribe the cores


# -----------------------------------------------------------------------------
# Config: every field is a CLI flag (--decoder-depth for decoder_depth). Defaults are the paper's (Table 4a).

@dataclasses.dataclass
class Config:
    data: str = ""                 # folder of videos, searched recursively (UCF101, Kinetics); empty = toy videos + toy preset
    out: str = "out/siammae"       # checkpoint.pt, log.jsonl and reconstruction figures go here
    preset: str = ""               # "toy": small, fast settings for a CPU demo (applied before the flags you pass)
    # model (Table 4a: ViT-S/16 at 224 px)
    model: str = "vit_small"       # vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 16           # 16 or 8; the paper's best DAVIS number is ViT-S/8 (Table 1)
    img_size: int = 224            # square crop side; must be a multiple of --patch-size
    encoder: str = "siamese"       # siamese: one shared ViT, each frame on its own (§3.2) | joint: both frames in one sequence
    decoder: str = "cross-self"    # cross-self (default, §3.2) | cross | joint: the decoder ablation (Table 2)
    decoder_depth: int = 8         # the paper does not give the decoder size; MAE's default 8 x 512 x 16 (SiamMAE
    decoder_dim: int = 512         #   follows MAE unless stated). CropMAE's re-implementation uses 4 x 256 x 8.
    decoder_heads: int = 16
    # masking and sampling
    mask: float = 0.95             # fraction of f2's patches hidden (§3.3; Table 2c: 95 % is best); f1 is never masked
    gap: tuple = (4, 48)           # frame gap f2 - f1, drawn uniformly from [min, max] frames of the file (Table 4a, at 30 fps)
    crop_scale: tuple = (0.5, 1.0)  # RandomResizedCrop scale, the SAME crop and flip on both frames (Table 4a)
    repeat: int = 2                # repeated sampling: pairs drawn from each decoded video (Table 4a)
    # optimisation (Table 4a)
    batch_size: int = 512          # pairs per GPU per step; paper: 2048 = 4 GPUs x 512 (use --accum on fewer GPUs)
    epochs: int = 2000             # passes over the videos (400 in the paper's ablations)
    max_steps: int = 0             # if > 0: train this many optimizer steps instead, and the lr schedule spans them
    blr: float = 1.5e-4            # base lr; actual lr = blr * effective batch / 256 (MAE's linear scaling rule)
    lr: float = 0.0                # if > 0: absolute lr, no scaling
    min_lr: float = 0.0            # the cosine ends here
    warmup_epochs: float = 40      # linear warm-up length (Table 4a); converted to steps
    weight_decay: float = 0.05     # AdamW, betas (0.9, 0.95); no decay on biases and norm weights (MAE)
    accum: int = 1                 # gradient accumulation micro-steps per optimizer step
    # machine
    workers: int = 8               # DataLoader processes decoding video per GPU
    device: str = "auto"           # auto | cuda | cpu
    dtype: str = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False          # torch.compile the model (CUDA: faster after a minute of compiling)
    seed: int = 0
    resume: bool = False           # continue from <out>/checkpoint.pt
    bench: bool = False            # time a few training steps on synthetic input and exit
    # logging
    log_every: int = 20            # steps between log lines (and log.jsonl records)
    fig_every: int = 1000          # steps between reconstruction figures (one more at the end)
    ckpt_every: int = 500          # steps between checkpoints (one more at the end)


PRESETS = {  # small settings so `python siammae.py` is a real demo on a laptop CPU (toy videos, ~2 minutes on 2 idle cores)
    "toy": dict(model="vit_tiny", patch_size=8, img_size=64, decoder_depth=4, decoder_dim=256, decoder_heads=8,
                batch_size=32, epochs=110, warmup_epochs=10, blr=5e-3, workers=2,
                log_every=10, fig_every=100, ckpt_every=100),
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
    import inspect
    import re
    # --help text = the comment beside each field, read from this file, so it is written once
    helps = {k: v.replace("%", "%%") for k, v in re.findall(r"^    (\w+): .*?#\s*(.*)$", inspect.getsource(Config), re.M)}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=None, help=f"{helps.get(f.name, '')} (default {f.default})")
        if f.type is bool:
            ap.add_argument(flag, action="store_true", **kw)
        elif f.type is tuple:
            ap.add_argument(flag, type=type(f.default[0]), nargs=2, **kw)
        else:
            ap.add_argument(flag, type=f.type, **kw)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    preset = given.get("preset") or ("toy" if not given.get("data") and not given.get("bench") else "")
    if preset and preset not in PRESETS:
        fail(f"unknown --preset {preset}; choose from {', '.join(PRESETS)}")
    cfg = Config(**{**(PRESETS[preset] if preset else {}), **given, "preset": preset})
    if preset:
        print(f"preset {preset}: " + ", ".join(f"{k}={v}" for k, v in PRESETS[preset].items() if k not in given))
    cfg.gap, cfg.crop_scale = tuple(cfg.gap), tuple(cfg.crop_scale)
    check_config(cfg)
    return cfg


def check_config(cfg):
    if cfg.model not in VIT:
        fail(f"unknown --model {cfg.model}; choose from {', '.join(VIT)}")
    if not 0 <= cfg.mask < 1:
        fail(f"--mask {cfg.mask} must be in [0, 1): it is the fraction of f2's patches hidden")
    if cfg.img_size % cfg.patch_size:
        fail(f"--img-size {cfg.img_size} is not divisible by --patch-size {cfg.patch_size}; "
             f"use e.g. --img-size {cfg.img_size // cfg.patch_size * cfg.patch_size}")
    if cfg.encoder not in ("siamese", "joint") or cfg.decoder not in ("cross-self", "cross", "joint"):
        fail("--encoder takes siamese|joint and --decoder cross-self|cross|joint")
    if not 1 <= cfg.gap[0] <= cfg.gap[1]:
        fail(f"--gap {cfg.gap[0]} {cfg.gap[1]} must satisfy 1 <= min <= max (frames between f1 and f2)")
    if cfg.batch_size % cfg.repeat:
        fail(f"--batch-size {cfg.batch_size} must be a multiple of --repeat {cfg.repeat} (pairs = videos x repeat)")
    if cfg.decoder_dim % cfg.decoder_heads or VIT[cfg.model]["dim"] % VIT[cfg.model]["heads"]:
        fail(f"--decoder-dim {cfg.decoder_dim} must be divisible by --decoder-heads {cfg.decoder_heads}")
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32") or cfg.device not in ("auto", "cuda", "cpu"):
        fail("--dtype takes auto|bf16|fp16|fp32 and --device auto|cuda|cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")


# -----------------------------------------------------------------------------
# ViT (MAE / timm parameter names, so the encoder loads as a plain ViT in propagate.py, timm, DINO tools).
# Shapes: B batch, N patches per frame, Nv visible patches, D width, H heads, Dh = D / H, P = p*p*3 pixels per patch.

def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D sin-cos table, (1 + grid², dim), cls row zeros. Per patch (x = column, y = row):
    [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)], ω_k = 10000^(−k/(dim/4)), k = 0 .. dim/4 − 1; float64 as MAE."""
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


class CrossAttention(nn.Module):
    """Queries from x (f2's tokens), keys and values from mem (f1's tokens): softmax(Q₂K₁ᵀ/√Dh)V₁ (§3.2)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mem):
        B, N, D = x.shape
        M, H = mem.shape[1], self.heads
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(mem).view(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, M, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh) x (B, H, Dh, M) -> (B, H, N, M) -> (B, H, N, Dh)
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

    def encode(self, x):
        """(B, Nv, D) visible tokens -> (B, 1 + Nv, D): cls (with its zero position slot) prepended, blocks, final LN."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, imgs):
        """Plain ViT on a whole image (no mask): (B, 3, Himg, Wimg) -> (B, 1 + N, D)."""
        return self.encode(self.embed(imgs))


# -----------------------------------------------------------------------------
# Masking and patches (MAE conventions, REFERENCE §0)

def random_masking(noise, ratio):
    """MAE per-sample random masking from uniform noise (B, N): keep the len_keep = int(N·(1 − ratio)) tokens with the
    SMALLEST noise. Returns ids_keep (B, Nv), ids_restore (B, N) and mask (B, N) float, 1 = hidden, 0 = visible, in
    the original patch order. gather(tokens, ids_keep) gives the encoder's input; ids_restore un-shuffles."""
    B, N = noise.shape
    len_keep = int(N * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, 1, ids_restore)


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
# SiamMAE model: siamese encoder + cross-self decoder (§3.2, Fig. 2)

class DecoderBlock(nn.Module):
    """cross-self (default): x += CrossAttn(LN(x), LN(f1)); x += SelfAttn(LN(x)); x += MLP(LN(x)).
    cross: the same without the self-attention. The paper does not say where the norms go: pre-norm as everywhere else."""

    def __init__(self, dim, heads, self_attn=True):
        super().__init__()
        self.norm_x, self.norm_mem, self.cross_attn = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6), CrossAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6) if self_attn else None
        self.attn = Attention(dim, heads) if self_attn else None
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, 4 * dim)

    def forward(self, x, mem):
        x = x + self.cross_attn(self.norm_x(x), self.norm_mem(mem))  # f2 queries f1 (§3.2)
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))  # f2 tokens among themselves
        return x + self.mlp(self.norm2(x))


class SiamMAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v = VIT[cfg.model]
        self.cfg, self.p, self.grid = cfg, cfg.patch_size, cfg.img_size // cfg.patch_size
        self.encoder = ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"])
        Dd = cfg.decoder_dim
        self.decoder_embed = nn.Linear(v["dim"], Dd)  # both frames' tokens enter the decoder through it
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(Dd, self.grid)[None], requires_grad=False)
        if cfg.decoder == "joint":  # self-attention over both frames' full token sets
            self.decoder_blocks = nn.ModuleList(Block(Dd, cfg.decoder_heads) for _ in range(cfg.decoder_depth))
        else:
            self.decoder_blocks = nn.ModuleList(DecoderBlock(Dd, cfg.decoder_heads, self_attn=cfg.decoder == "cross-self")
                                                for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size ** 2 * 3)
        self.apply(init_weights)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: patch embedding initialised like a Linear
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, frames, noise):
        """frames (B, 2, 3, Himg, Wimg) normalized, f1 = frames[:, 0] earlier than f2; noise (B, N) U[0, 1) for f2's mask.
        Returns the loss, the prediction (B, N, P) in normalized-pixel units and f2's mask (B, N), 1 = hidden."""
        B = frames.shape[0]
        x = self.encoder.embed(frames.flatten(0, 1)).view(B, 2, self.grid ** 2, -1)  # (B·2, N, D) -> (B, 2, N, D)
        x1, x2 = x[:, 0], x[:, 1]
        ids_keep, ids_restore, mask = random_masking(noise, self.cfg.mask)  # f1: 0 %, f2: --mask (§3.3)
        x2 = gather_tokens(x2, ids_keep)  # (B, Nv, D): only visible patches are encoded
        if self.cfg.encoder == "siamese":  # one encoder, each frame on its own: no attention between frames
            h1, h2 = self.encoder.encode(x1), self.encoder.encode(x2)  # (B, 1+N, D), (B, 1+Nv, D)
        else:  # joint ablation: both frames' visible tokens in one sequence
            h = self.encoder.encode(torch.cat([x1, x2], dim=1))  # (B, 1+N+Nv, D)
            N = x1.shape[1]
            h1, h2 = h[:, :1 + N], torch.cat([h[:, :1], h[:, 1 + N:]], dim=1)
        pred = self.decode(h1, h2, ids_restore)
        target = patchify(frames[:, 1], self.p)  # (B, N, P)
        return norm_pix_loss(pred.float(), target.float(), mask), pred, mask

    def decode(self, h1, h2, ids_restore):
        """f1 tokens (B, 1+N, D) and f2's visible tokens (B, 1+Nv, D) -> f2's patches (B, N, P)."""
        mem = self.decoder_embed(h1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        y = self.decoder_embed(h2)  # (B, 1+Nv, Dd)
        B, N, Nv = y.shape[0], ids_restore.shape[1], y.shape[1] - 1
        y_ = torch.cat([y[:, 1:], self.mask_token.expand(B, N - Nv, -1)], dim=1)  # (B, N, Dd) visible first, shuffled
        y = torch.cat([y[:, :1], gather_tokens(y_, ids_restore)], dim=1)  # (B, 1+N, Dd) in patch order
        y = y + self.decoder_pos_embed
        if self.cfg.decoder == "joint":
            z = torch.cat([mem, y], dim=1)  # (B, 2(1+N), Dd)
            for blk in self.decoder_blocks:
                z = blk(z)
            y = z[:, 1 + N:]
        else:
            for blk in self.decoder_blocks:
                y = blk(y, mem)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]  # drop cls: (B, N, P)


def init_weights(m):
    """MAE init: xavier_uniform Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# Loss (§3.3: "normalized pixel values as targets, L2 loss on the masked patches of f2")

def norm_pix_loss(pred, target, mask):
    """MAE normalized-pixel loss: L = Σ_b,n m_bn · mean_P (ŷ_bn − (y_bn − μ_bn)/√(σ²_bn + 1e-6))² / Σ_b,n m_bn.
    pred, target (B, N, P); mask (B, N) 1 = hidden. μ, σ² per patch, σ² UNBIASED (MAE's torch .var)."""
    mean = target.mean(dim=-1, keepdim=True)  # μ_bn
    var = target.var(dim=-1, keepdim=True)  # σ²_bn (unbiased)
    target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, N): MSE per patch
    return (loss * mask).sum() / mask.sum()  # masked patches only, averaged over the whole batch


# -----------------------------------------------------------------------------
# Data: pairs of frames from videos (Table 4a). Decoding happens in DataLoader workers; frames travel as uint8 and
# are normalized on the device. All randomness of a sample (frames, crop, flip, f2's mask noise) comes from a seed
# made of (seed, epoch, video index), so the data does not depend on worker count, rank count or resuming.

VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet (MAE)
SEEK_AHEAD = 64  # frames: jump with a seek instead of decoding forward when the next wanted frame is this far ahead


def list_videos(root):
    found = []
    for d, _, files in os.walk(root, followlinks=True):
        found += [os.path.join(d, f) for f in files if f.lower().endswith(VIDEO_EXTS)]
    return sorted(found)


def probe_video(path):
    """Number of frames, 0 when the file cannot be opened or its first frame not decoded."""
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened() or not cap.read()[0]:
            return 0
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()


def index_videos(root, cache_path, min_frames, threads=8):
    """[(path, n_frames)] of the usable videos under root; probes are cached in cache_path (only new files probed)."""
    if not os.path.isdir(root):
        fail(f"--data {root} does not exist; pass the folder that holds the videos (e.g. ucf101/ or kinetics400/train/)")
    paths = list_videos(root)
    if not paths:
        fail(f"--data {root} holds no video files ({' '.join(VIDEO_EXTS)}); point it at the folder of videos")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    todo = [p for p in paths if p not in cache]
    if todo:
        print(f"probing {len(todo)} videos ({len(paths) - len(todo)} cached) ...", flush=True)
        with ThreadPoolExecutor(threads) as ex:
            cache.update(zip(todo, ex.map(probe_video, todo)))
        atomic_write_text(cache_path, json.dumps(cache))
    videos = [(p, cache[p]) for p in paths if cache[p] >= min_frames]
    unreadable = sum(cache[p] == 0 for p in paths)
    short = len(paths) - len(videos) - unreadable
    if unreadable or short:
        print(f"warning: skipped {unreadable} unreadable and {short} too short (< {min_frames} frames) "
              f"of {len(paths)} videos", flush=True)
    if not videos:
        fail(f"none of the {len(paths)} videos in {root} is readable with at least {min_frames} frames; "
             f"check the files (ffprobe) or lower --gap")
    return videos


def read_frames(path, wanted):
    """Decode only the wanted frame indices (sorted): decode forward, seek when far ahead. {index: RGB uint8 (H, W, 3)},
    or None when the file ends early or is corrupt."""
    cap, pos, out = cv2.VideoCapture(path), 0, {}
    try:
        for idx in sorted(set(wanted)):
            if idx - pos > SEEK_AHEAD:
                cap.set(cv2.CAP_PROP_POS_FRAMES, idx)
                pos = idx
            while pos < idx:
                if not cap.grab():
                    return None
                pos += 1
            ok, frame = cap.read()
            if not ok:
                return None
            pos += 1
            out[idx] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return out
    finally:
        cap.release()


def sample_gap_and_start(n_frames, gap):
    """Gap ~ U{gmin .. min(gmax, n−1)}, then f1 ~ U{0 .. n−1−gap}, f2 = f1 + gap: f1 is always earlier (Table 4a)."""
    gmax = min(gap[1], n_frames - 1)
    g = int(torch.randint(gap[0], gmax + 1, ()))
    f1 = int(torch.randint(0, n_frames - g, ()))
    return f1, f1 + g


class VideoPairs(torch.utils.data.Dataset):
    """Item (video index, epoch) -> frames (R, 2, 3, S, S) uint8 and f2's mask noise (R, N) float."""

    def __init__(self, videos, cfg):
        self.videos, self.cfg = videos, cfg

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, key):
        idx, epoch = key
        for attempt in range(len(self.videos)):  # an unreadable video is replaced by the next one, with a warning
            path, n = self.videos[(idx + attempt) % len(self.videos)]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.cfg.seed, epoch, idx, attempt)) & 0xFFFF_FFFF)
                pairs = [sample_gap_and_start(n, self.cfg.gap) for _ in range(self.cfg.repeat)]
                frames = read_frames(path, [i for pair in pairs for i in pair])
                if frames is None:
                    print(f"warning: could not decode frames {pairs} of {path}; using another video", flush=True)
                    continue
                clips = torch.stack([self.crop_pair(frames[a], frames[b]) for a, b in pairs])  # (R, 2, 3, S, S)
                noise = torch.rand(self.cfg.repeat, (self.cfg.img_size // self.cfg.patch_size) ** 2)  # (R, N)
                return clips, noise
        raise RuntimeError("no video could be decoded")

    def crop_pair(self, a, b):
        """The SAME RandomResizedCrop (bicubic) and the SAME horizontal flip on both frames (Table 4a)."""
        pair = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2)  # (2, H, W, 3) -> (2, 3, H, W) uint8
        i, j, h, w = T.RandomResizedCrop.get_params(pair, list(self.cfg.crop_scale), [3 / 4, 4 / 3])
        S = self.cfg.img_size
        pair = TF.resized_crop(pair, i, j, h, w, [S, S], T.InterpolationMode.BICUBIC, antialias=True)
        return pair.flip(-1) if torch.rand(()) < 0.5 else pair


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's split (one seeded permutation per epoch, rank r takes every world-th index), able to start
    mid-epoch after a resume. Yields (video index, epoch) keys."""

    def __init__(self, n, videos_per_batch, seed, rank=0, world=1):
        self.n, self.vpb, self.seed, self.rank, self.world = n, videos_per_batch, seed, rank, world
        self.epoch, self.start_batch = 0, 0
        self.batches = n // (world * videos_per_batch)  # drop the ragged end, as drop_last does

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[:self.batches * self.world * self.vpb]
        mine = perm[self.rank::self.world][self.start_batch * self.vpb:]
        return iter([(int(i), self.epoch) for i in mine])

    def __len__(self):
        return (self.batches - self.start_batch) * self.vpb


def to_model_input(clips, noise, device):
    """uint8 (V, R, 2, 3, S, S) from the loader -> normalized float (V·R, 2, 3, S, S) on the device, noise (V·R, N)."""
    x = clips.to(device, non_blocking=True).flatten(0, 1).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 1, 3, 1, 1)
    return (x - mean) / std, noise.to(device, non_blocking=True).flatten(0, 1)


# -----------------------------------------------------------------------------
# Schedule (MAE: per iteration, not per epoch)

def lr_at(step, total, warmup, peak, floor):
    """1) linear warm-up 0 -> peak over `warmup` steps; 2) half-cycle cosine peak -> floor over the rest."""
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model, weight_decay):
    """No weight decay on 1-D parameters (biases, norm weights), as timm's add_weight_decay that MAE calls.
    cls_token and mask_token are 3-D and so ARE decayed (as in MAE); the fixed pos-embeds are not trained."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


# -----------------------------------------------------------------------------
# Checkpointing: one dict with everything to continue exactly; written atomically (temp file + rename)

ARCH_KEYS = ("model", "patch_size", "img_size", "encoder", "decoder", "decoder_depth", "decoder_dim", "decoder_heads")


def atomic_write_text(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_checkpoint(path, model, optimizer, scaler, step, cfg):
    state = dict(method="siammae", model=model.state_dict(), optimizer=optimizer.state_dict(),
                 scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg), source_sha256=SOURCE_SHA,
                 rng=dict(torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, model, optimizer, scaler, cfg):
    """Restore everything; returns the step to continue from. Refuses a checkpoint of another architecture."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    theirs = state.get("config", {})
    diff = [f"{k}={theirs.get(k)} (you: {getattr(cfg, k)})" for k in ARCH_KEYS if theirs.get(k) != getattr(cfg, k)]
    if state.get("method") != "siammae" or diff:
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
# Pictures: f1 | masked f2 | prediction (visible patches pasted back) | f2

@torch.no_grad()
def reconstruction_figure(path, frames, pred, mask, p, rows=4):
    """frames (B, 2, 3, S, S) normalized; pred (B, N, P) in normalized-pixel units, de-normalized with the true patch
    statistics for display (as MAE's demo does). Writes a PNG grid, one pair per row."""
    frames, pred, mask = frames[:rows].float().cpu(), pred[:rows].float().cpu(), mask[:rows].cpu()
    g = frames.shape[-1] // p
    target = patchify(frames[:, 1], p)  # (b, N, P)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    pred_pix = pred * (var + 1e-6) ** 0.5 + mean
    m = mask[..., None]  # (b, N, 1)
    masked_f2 = unpatchify(target * (1 - m), p, g, g)  # hidden patches at 0 = the dataset mean (grey)
    recon = unpatchify(pred_pix * m + target * (1 - m), p, g, g)
    grid = torch.stack([frames[:, 0], masked_f2, recon, frames[:, 1]], dim=1)  # (b, 4, 3, S, S)
    std, mu = torch.tensor(STD).view(3, 1, 1), torch.tensor(MEAN).view(3, 1, 1)
    img = (grid * std + mu).clamp(0, 1).mul(255).byte()  # back to RGB
    b, c, _, S, _ = img.shape
    img = img.permute(0, 3, 1, 4, 2).reshape(b * S, c * S, 3).numpy()  # rows of (f1 | masked f2 | pred | f2)
    zoom = max(1, 160 // S)  # small toy crops are enlarged (nearest) so the patches stay visible
    img = cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(path + ".tmp.png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    os.replace(path + ".tmp.png", path)


# -----------------------------------------------------------------------------
# Benchmark helpers: FLOPs of one training step, measured matmul rate of this machine

def train_flops_per_pair(model, cfg, device):
    """FLOPs of forward + backward for one pair, counted by torch's FlopCounterMode on a real step (attention through
    the math kernel so its matmuls are counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    frames = torch.randn(2, 2, 3, cfg.img_size, cfg.img_size, device=device)
    noise = torch.rand(2, (cfg.img_size // cfg.patch_size) ** 2, device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(frames, noise)[0].backward()
    model.zero_grad(set_to_none=True)
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
    data = cfg.data
    if not data:
        import toydata
        data = os.path.join(toydata.ensure_toy_data(), "ucf101")
    cache = os.path.join(cfg.out, "video_index.json")
    if rank == 0:
        videos = index_videos(data, cache, min_frames=cfg.gap[0] + 1, threads=max(cfg.workers, 4))
    if world > 1:
        dist.barrier()  # rank 0 probed the videos and wrote the cache; the others read it
        if rank != 0:
            videos = index_videos(data, cache, min_frames=cfg.gap[0] + 1)
    vpb = cfg.batch_size // cfg.repeat
    sampler = EpochSampler(len(videos), vpb, cfg.seed, rank, world)
    if sampler.batches == 0:
        fail(f"{len(videos)} videos are fewer than one step needs ({world} x {vpb} videos); lower --batch-size")
    loader = torch.utils.data.DataLoader(VideoPairs(videos, cfg), batch_size=vpb, sampler=sampler,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if cfg.workers else None, persistent_workers=cfg.workers > 0)
    print0(f"data {data}: {len(videos)} videos, {sampler.batches} steps per epoch of {world} x {cfg.batch_size} pairs")
    return loader, sampler


def bench(cfg, model, device, ctx, dtype, steps=5):
    """Times training steps on synthetic input; one summary line."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, betas=(0.9, 0.95), fused=True)
    frames = torch.randn(cfg.batch_size, 2, 3, cfg.img_size, cfg.img_size, device=device)
    noise = torch.rand(cfg.batch_size, (cfg.img_size // cfg.patch_size) ** 2, device=device)
    flops = train_flops_per_pair(model, cfg, device) * cfg.batch_size
    times = []
    for i in range(steps + 2):  # the first two steps warm up allocators and caches
        sync(device)
        t = time.perf_counter()
        with ctx:
            loss = model(frames, noise)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[2:])
    peak = matmul_rate(device, torch.float32 if dtype == "fp32" else torch.bfloat16)
    print(f"bench | {cfg.model}/{cfg.patch_size} {cfg.img_size}px | {cfg.encoder} encoder, {cfg.decoder} decoder "
          f"{cfg.decoder_depth}x{cfg.decoder_dim}x{cfg.decoder_heads} | batch {cfg.batch_size} | mask {cfg.mask} | "
          f"{dt * 1e3:.0f} ms/step (median of {steps}) | {cfg.batch_size / dt:.2f} pairs/s | "
          f"{flops / dt / 1e9:.1f} GFLOP/s = {100 * flops / dt / peak:.0f}% of {dtype} matmul {peak / 1e9:.1f} GFLOP/s "
          f"(median 2048^3 on {device.type}, {torch.get_num_threads()} threads) | {flops / 1e9:.1f} GFLOP/step")


def main(argv=None):
    cfg = parse_config(argv)
    device, ctx, dtype, rank, world, print0 = setup_device(cfg)
    torch.manual_seed(cfg.seed + rank)  # masks come from the data seed; this seeds init (same on all ranks via DDP)
    model = SiamMAE(cfg).to(device)
    n_enc = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    n_dec = sum(p.numel() for p in model.parameters() if p.requires_grad) - n_enc
    print0(f"SiamMAE {cfg.model}/{cfg.patch_size} {cfg.encoder} encoder {n_enc / 1e6:.2f}M params | {cfg.decoder} "
           f"decoder {cfg.decoder_depth}x{cfg.decoder_dim}x{cfg.decoder_heads} {n_dec / 1e6:.2f}M params")
    if cfg.bench:
        return bench(cfg, model, device, ctx, dtype)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not cfg.resume:
        fail(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
    if cfg.resume and not os.path.exists(ckpt_path):
        fail(f"--resume but there is no checkpoint at {ckpt_path}; drop --resume or point --out at the run's folder")
    loader, sampler = make_loader(cfg, rank, world, device, print0)

    # optimizer, schedule (Table 4a)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=True)  # fused: 3x faster on CPU too
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    eff_batch = cfg.batch_size * cfg.accum * world
    peak_lr = cfg.lr or cfg.blr * eff_batch / 256
    steps_per_epoch = sampler.batches // cfg.accum
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    print0(f"effective batch {eff_batch} pairs ({world} x {cfg.batch_size} x accum {cfg.accum}) | base lr {cfg.blr:.2e} "
           f"-> lr {peak_lr:.2e} | {total} steps, {warmup} warm-up | weight decay on "
           f"{sum(p.numel() for p in groups[0]['params']) / 1e6:.2f}M params, off on "
           f"{sum(p.numel() for p in groups[1]['params']) / 1e3:.1f}K")
    step = load_checkpoint(ckpt_path, model, optimizer, scaler, cfg) if cfg.resume else 0
    if cfg.resume:
        print0(f"resumed from {ckpt_path} at step {step}")
    print0("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    flops_per_pair = train_flops_per_pair(raw_model, cfg, device)

    stop = {"requested": False}  # Ctrl-C: finish the step, checkpoint, exit (a second Ctrl-C kills)
    def request_stop(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, request_stop)

    t_last, pairs_since, loss_acc, n_acc, last_ckpt = time.perf_counter(), 0, 0.0, 0, "none yet"
    model.train()
    while step < total:
        sampler.epoch, first = divmod(step, steps_per_epoch)  # resume mid-epoch: same order, same samples
        sampler.start_batch = first * cfg.accum
        batches = iter(loader)
        for _ in range(min(steps_per_epoch - first, total - step)):
            # 1) schedule for this step
            lr = lr_at(step, total, warmup, peak_lr, cfg.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # 2) forward / backward with accumulation
            t_data, loss_sum = 0.0, torch.zeros((), device=device)
            for micro in range(cfg.accum):
                t0 = time.perf_counter()
                frames, noise = to_model_input(*next(batches), device)
                t_data += time.perf_counter() - t0
                sync_grads = micro == cfg.accum - 1 or world == 1
                with (nullcontext() if sync_grads else model.no_sync()), ctx:
                    loss, pred, mask = model(frames, noise)
                scaler.scale(loss / cfg.accum).backward()
                loss_sum += loss.detach() / cfg.accum
            # 3) optimizer step
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pairs_since += eff_batch
            # 4) NaN guard and Ctrl-C, agreed across ranks so that no rank waits for another
            flags = torch.tensor([loss_sum.item(), float(stop["requested"])], device=device)
            if world > 1:
                dist.all_reduce(flags)
            if not math.isfinite(flags[0].item()):
                print0(f"error: loss is {flags[0].item()} at step {step}; lower --blr or use --dtype fp32 "
                       f"(last good checkpoint: {last_ckpt})", file=sys.stderr)
                raise SystemExit(1)
            loss_acc, n_acc = loss_acc + flags[0].item() / world, n_acc + 1
            # 5) log
            if step % cfg.log_every == 0 or step == total:
                sync(device)
                dt = time.perf_counter() - t_last
                ms, rate = 1e3 * dt / (pairs_since / eff_batch), pairs_since / dt
                loss_val = loss_acc / n_acc  # mean over the interval and the ranks
                eta = (total - step) * ms / 1e3 / 3600
                print0(f"step {step:06d}/{total} ({100 * step / total:.1f}%) | loss {loss_val:.4f} | lr {lr:.2e} | "
                       f"{ms:.0f} ms/step (data {1e3 * t_data:.0f}) | {rate:.1f} pairs/s | "
                       f"{flops_per_pair * rate / 1e9:.1f} GFLOP/s | eta {eta:.2f}h", flush=True)
                if rank == 0:
                    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(dict(step=step, epoch=step / steps_per_epoch, loss=loss_val, lr=lr,
                                                ms_per_step=ms, pairs_per_s=rate)) + "\n")
                t_last, pairs_since, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
            # 6) pictures and checkpoints
            if rank == 0 and (step % cfg.fig_every == 0 or step == total):
                reconstruction_figure(os.path.join(cfg.out, f"recon_{step:06d}.png"), frames, pred, mask, cfg.patch_size)
            if step % cfg.ckpt_every == 0 or step == total or flags[1].item() > 0:
                if rank == 0:
                    save_checkpoint(ckpt_path, raw_model, optimizer, scaler, step, cfg)
                last_ckpt = f"{ckpt_path} at step {step}"
            if flags[1].item() > 0:
                print0(f"interrupted: checkpoint saved at step {step}; continue with --resume")
                raise SystemExit(130)
    print0(f"done: {step} steps; checkpoint {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
