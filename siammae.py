"""
SiamMAE: Siamese Masked Autoencoders, in one file.
Gupta, Wu, Deng, Fei-Fei. "Siamese Masked Autoencoders", NeurIPS 2023, arXiv:2305.14344.

Two frames f1 < f2 of one video go through ONE shared-weight ViT encoder, each on its own: f1
whole, f2 with 95 % of its patches hidden. A decoder whose blocks cross-attend from f2's tokens to
f1's reconstructs f2's hidden patches (normalized pixels, L2). To fill in 95 % of f2 the model has
to find where things went since f1, so its features learn correspondence; propagate.py measures
that on DAVIS-2017. The paper has no official code; where it is silent we follow the MAE code it
builds on (facebookresearch/mae).

    python siammae.py                            # toy demo: makes toy videos once, ~5 min on 2 cores
    python siammae.py --data ucf101/             # one GPU (or CPU), the paper's settings
    torchrun --nproc_per_node=8 siammae.py --data kinetics400/ --batch-size 256  # 2048 pairs a step
    python siammae.py --bench --model vit_small  # throughput of one training step, no data needed

Measured on a 2-core CPU (no GPU), 2026-11-23: one ViT-S/16 step (batch 8, mask 0.95, decoder 8x512)
3.57 s = 164 GFLOP/s = 87 % of the fp32 matmul rate. 2026-12-01: toy demo (ViT-T/16, 128 px) 180 steps in
5m22s; on the toy DAVIS it does not yet beat the untrained ViT-T/16 (0.23 vs 0.27 J&F). See README.md.

Sections: Config | ViT | Masking | Model | Loss | Data | Schedule | Checkpoint | Train loop | Plumbing
"""
import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP

cv2.setNumThreads(1)  # video is decoded in DataLoader workers: OpenCV's own threads would oversubscribe
# FFmpeg's and OpenCV's own messages off: seeking in H.264 prints "mmco: unref short failure" and
# the like at almost every seek; the loader counts real failures and reports them itself. Read at
# the first VideoCapture, inherited by the DataLoader workers. OPENCV_FFMPEG_LOGLEVEL=24 (FFmpeg's
# AV_LOG_WARNING) shows them again, on stdout.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


# -----------------------------------------------------------------------------
# Config (every field is a flag, --decoder-depth for decoder_depth; its comment is the --help)

@dataclasses.dataclass
class Config:
    data: str = ""               # folder of videos, searched recursively (UCF101, Kinetics-400),
                                 # or of frame folders <video>/<frame>.jpg|png (DAVIS JPEGImages,
                                 # frames extracted by ffmpeg); empty: the toy videos (--preset toy)
    out: str = "out/siammae"     # checkpoint.pt, log.jsonl, video_index.json and figures go here
    preset: str = ""             # toy: small settings for a CPU demo; the flags given override it
    # model (the paper's ViT-S/16; Table 4a: 224 px)
    model: str = "vit_small"     # encoder size: vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 16         # 16 or 8 pixels; ViT-S/8 has the best DAVIS score (Table 1)
    img_size: int = 224          # side of the square crop in pixels, a multiple of --patch-size
    encoder: str = "siamese"     # siamese: one ViT, each frame on its own (§3, Encoder) | joint:
                                 # the visible patches of both frames in one sequence
    decoder: str = "cross-self"  # cross-self: f2 attends to f1, then to itself (§3, Decoder) |
                                 # cross: to f1 only | joint: self-attention over both frames
    decoder_depth: int = 8       # decoder blocks. The paper gives no decoder size: MAE's 8 x 512 x
                                 # 16 (models_mae.py); CropMAE's models/SiamMAE.py has 4 x 256 x 8
    decoder_dim: int = 512       # decoder width (MAE's default; see --decoder-depth)
    decoder_heads: int = 16      # decoder attention heads (MAE's default); divides --decoder-dim
    # masking and sampling (§3, Masking; Table 4a)
    mask: float = 0.95           # fraction of f2's patches hidden (§3, Masking: 0.95); f1 is never
                                 # masked. Lower makes the task easier
    gap: tuple = (4, 48)         # frames from f1 to f2 in --gap-unit, drawn uniformly in [MIN, MAX]
                                 # (Table 4a)
    gap_unit: str = "30fps"      # 30fps: frames at 30 fps (Kinetics', where Table 4a's 4-48 holds),
                                 # scaled by each file's fps (10 fps: 1-16) | frames: the file's own
    frames_fps: float = 30.0     # the frame rate of frame folders (they store none) and of videos
                                 # whose header gives none, for --gap-unit
    crop_scale: tuple = (0.5, 1.0)  # RandomResizedCrop area range, the SAME crop and flip on
                                    # both frames (Table 4a)
    repeat: int = 2              # repeated sampling: pairs per decoded video (Table 4a)
    # optimisation (Table 4a; the rest as MAE's main_pretrain.py)
    batch_size: int = 512        # pairs per process per step; the paper's 2048 = 4 GPUs x 512
    epochs: int = 2000           # passes over the videos (Table 4a; 400 in the ablations)
    max_steps: int = 0           # if > 0: this many optimizer steps instead, for the lr schedule too
    blr: float = 1.5e-4          # base lr: lr = blr x effective batch / 256 (MAE's scaling rule)
    lr: float = 0.0              # if > 0: this absolute lr instead, not scaled
    min_lr: float = 0.0          # the cosine ends here
    warmup_epochs: float = 40    # linear warm-up in epochs (Table 4a), converted to steps
    weight_decay: float = 0.05   # AdamW, betas (0.9, 0.95); none on biases and norm weights (MAE)
    accum: int = 1               # gradient accumulation: micro-steps per optimizer step
    # machine
    workers: int = 8             # DataLoader processes decoding video, per process (0: in this one)
    device: str = "auto"         # auto (cuda if visible, else cpu) | cuda | cpu
    dtype: str = "auto"          # auto (bf16 autocast on CUDA, fp32 on CPU; --preset toy: bf16 on a
                                 # CPU with native bf16) | bf16 | fp16 | fp32
    compile: bool = False        # torch.compile the model (CUDA: faster after a minute compiling)
    seed: int = 0                # seeds the init and every sample (frames, crop, flip, f2's mask)
    resume: bool = False         # continue from <out>/checkpoint.pt, with the same architecture
    bench: bool = False          # time a few training steps on synthetic input, print a line, exit
    bench_data: int = 0          # if > 0: decode pairs from --data with --workers for this many
                                 # seconds; prints pairs/s beside the step's and the workers needed
    # logging
    log_every: int = 20          # steps between log lines and log.jsonl records (and NaN checks)
    fig_every: int = 1000        # steps between reconstruction figures (and one at the end)
    ckpt_every: int = 500        # steps between checkpoints (and one at the end and on Ctrl-C)


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (Linux /proc/cpuinfo: avx512_bf16 or amx_bf16)."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", open("/proc/cpuinfo").read()))
    except OSError:
        return False


PRESETS = {  # small settings so that `python siammae.py` is a ~5 minute demo on a laptop CPU: ViT-T/16 at 128 px,
    # an 8 x 8 grid, near the 10 x 15 grid propagate.py's toy preset evaluates (README, Results: toy DAVIS)
    "toy": dict(model="vit_tiny", patch_size=16, img_size=128, decoder_depth=4, decoder_dim=256,
                decoder_heads=8, batch_size=32, epochs=180, warmup_epochs=10, blr=5e-3, workers=2,
                log_every=10, fig_every=100, ckpt_every=100,
                dtype="bf16" if cpu_has_bf16() else "auto"),  # bf16 autocast where native: README
}

VIT = {  # width / depth / heads as timm's vision_transformer.py; encoder params at 224 px, patch 16
    "vit_tiny": dict(dim=192, depth=12, heads=3),     # 5.5M
    "vit_small": dict(dim=384, depth=12, heads=6),    # 21.7M
    "vit_base": dict(dim=768, depth=12, heads=12),    # 85.8M
    "vit_large": dict(dim=1024, depth=24, heads=16),  # 303M
}


# -----------------------------------------------------------------------------
# ViT (MAE / timm parameter names: the encoder loads as a plain ViT in propagate.py, timm, DINO)
# Shapes: B batch, S image side, N patches per frame, Nv visible ones, M f1's tokens, D width,
# H heads, Dh = D / H, Dd decoder width, P = p*p*3 pixels per patch.

def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D sin-cos table (util/pos_embed.py) in float64, (1 + grid², dim), cls row 0.
    Patch (x column, y row): [sin xω, cos xω, sin yω, cos yω], ω_k = 10000^(−4k/dim), k < dim/4."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    ar = torch.arange(grid, dtype=torch.float64)
    y, x = torch.meshgrid(ar, ar, indexing="ij")  # (grid, grid) each, row-major like the patches
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
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # QKᵀ (B, H, N, N), then ·V: (B, H, N, Dh)
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
    """The encoder: embed() makes patch tokens, masking happens, then encode() runs the blocks."""

    def __init__(self, img_size, patch_size, dim, depth, heads):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_pos_embed(dim, self.grid)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed, as MAE's
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def embed(self, imgs):
        """(B, 3, S, S) -> (B, N, D) patch tokens + position (added BEFORE masking, as MAE), no cls."""
        S = self.grid * self.patch_size
        assert imgs.shape[-2:] == (S, S), f"expected {S}px input, got {tuple(imgs.shape[-2:])}"
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        return x + self.pos_embed[:, 1:]

    def encode(self, x):
        """(B, Nv, D) -> (B, 1 + Nv, D): cls (zero position) prepended, the blocks, the final LN."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def init_weights(m):
    """MAE's _init_weights (models_mae.py): xavier_uniform Linear weights, 0 biases, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# Masking (MAE models_mae.py: random_masking, patchify, unpatchify)

def random_masking(noise, ratio):
    """MAE's per-sample masking: of noise (B, N) ~ U[0, 1), the len_keep = int(N·(1 − ratio))
    SMALLEST stay visible. Returns ids_keep (B, Nv), ids_restore (B, N) that un-shuffles, and the
    mask (B, N) in patch order, 1 = hidden, 0 = visible."""
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
    """(B, 3, H, W) -> (B, h·w, p·p·3): patches row-major, inside one (pixel row, col, channel)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, 3)
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, P)


def unpatchify(x, p, h, w):
    """Inverse of patchify: (B, h·w, p·p·3) -> (B, 3, h·p, w·p)."""
    x = x.reshape(x.shape[0], h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, h, p, w, p)
    return x.reshape(x.shape[0], 3, h * p, w * p)


# -----------------------------------------------------------------------------
# Model (§3, Encoder and Decoder): a siamese encoder and a cross-self decoder

class CrossAttention(nn.Module):
    """Queries from f2's tokens x, keys and values from f1's mem: softmax(Q₂K₁ᵀ/√Dh)V₁."""

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
        x = F.scaled_dot_product_attention(q, k, v)  # QKᵀ (B, H, N, M), then ·V: (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class DecoderBlock(nn.Module):
    """cross-self: x += CrossAttn(LN(x), LN(f1)); x += SelfAttn(LN(x)); x += MLP(LN(x)).
    cross: without SelfAttn. The paper does not say where the norms go: pre-norm, as elsewhere."""

    def __init__(self, dim, heads, self_attn=True):
        super().__init__()
        self.norm_x, self.norm_mem = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6) if self_attn else None
        self.attn = Attention(dim, heads) if self_attn else None
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, 4 * dim)

    def forward(self, x, mem):
        x = x + self.cross_attn(self.norm_x(x), self.norm_mem(mem))  # f2 queries f1
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))  # f2's tokens among themselves
        return x + self.mlp(self.norm2(x))


class SiamMAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v, Dd, depth = VIT[cfg.model], cfg.decoder_dim, cfg.decoder_depth
        self.cfg, self.grid = cfg, cfg.img_size // cfg.patch_size
        self.encoder = ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"])
        self.decoder_embed = nn.Linear(v["dim"], Dd)  # for the tokens of both frames
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        pos = sincos_pos_embed(Dd, self.grid)[None]
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        if cfg.decoder == "joint":  # self-attention over both frames' full token sets
            blocks = [Block(Dd, cfg.decoder_heads) for _ in range(depth)]
        else:
            cross_self = cfg.decoder == "cross-self"
            blocks = [DecoderBlock(Dd, cfg.decoder_heads, cross_self) for _ in range(depth)]
        self.decoder_blocks = nn.ModuleList(blocks)
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size ** 2 * 3)
        self.apply(init_weights)  # then MAE's initialize_weights (models_mae.py), in our order
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch embedding as a Linear (MAE)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, frames, noise):
        """frames (B, 2, 3, S, S) normalized, f1 = frames[:, 0]; noise (B, N) for f2's mask.
        Returns f2's prediction (B, N, P) in normalized pixels and f2's mask (B, N), 1 = hidden."""
        B = frames.shape[0]
        x = self.encoder.embed(frames.flatten(0, 1)).view(B, 2, self.grid ** 2, -1)  # (B, 2, N, D)
        x1, x2 = x[:, 0], x[:, 1]
        ids_keep, ids_restore, mask = random_masking(noise, self.cfg.mask)  # f2 only (§3, Masking)
        x2 = gather_tokens(x2, ids_keep)  # (B, Nv, D): only the visible patches are encoded
        if self.cfg.encoder == "siamese":  # each frame on its own: no attention between frames
            h1, h2 = self.encoder.encode(x1), self.encoder.encode(x2)  # (B, 1+N, D), (B, 1+Nv, D)
        else:  # joint: both frames' visible tokens in one sequence
            N = x1.shape[1]
            h = self.encoder.encode(torch.cat([x1, x2], dim=1))  # (B, 1+N+Nv, D)
            h1, h2 = h[:, :1 + N], torch.cat([h[:, :1], h[:, 1 + N:]], dim=1)
        return self.decode(h1, h2, ids_restore), mask

    def decode(self, h1, h2, ids_restore):
        """f1's tokens (B, 1+N, D), f2's visible tokens (B, 1+Nv, D) -> f2's patches (B, N, P)."""
        mem = self.decoder_embed(h1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        y = self.decoder_embed(h2)  # (B, 1+Nv, Dd)
        B, N, Nv = y.shape[0], ids_restore.shape[1], y.shape[1] - 1
        y_ = torch.cat([y[:, 1:], self.mask_token.expand(B, N - Nv, -1)], dim=1)  # (B, N, Dd)
        y = torch.cat([y[:, :1], gather_tokens(y_, ids_restore)], dim=1)  # un-shuffled (MAE)
        y = y + self.decoder_pos_embed  # (B, 1+N, Dd)
        if self.cfg.decoder == "joint":
            z = torch.cat([mem, y], dim=1)  # (B, 2(1+N), Dd)
            for blk in self.decoder_blocks:
                z = blk(z)
            y = z[:, 1 + N:]
        else:
            for blk in self.decoder_blocks:
                y = blk(y, mem)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]  # drop cls: (B, N, P)


# -----------------------------------------------------------------------------
# Loss (§3, Decoder: normalized pixels as targets, L2 on f2's masked patches; f1 has no loss)

def norm_pix_loss(pred, target, mask):
    """MAE's forward_loss with norm_pix_loss (models_mae.py); pred, target (B, N, P), mask (B, N):
    L = Σ_bn m_bn · mean_P (ŷ_bn − (y_bn − μ_bn) / √(σ²_bn + 1e-6))² / Σ_bn m_bn."""
    mean = target.mean(dim=-1, keepdim=True)  # μ_bn (B, N, 1)
    var = target.var(dim=-1, keepdim=True)  # σ²_bn (B, N, 1), unbiased as MAE's
    target = (target - mean) / (var + 1e-6) ** 0.5  # normalized pixels
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, N): MSE per patch
    return (loss * mask).sum() / mask.sum()  # the hidden patches of the whole batch


def reconstruction_loss(frames, pred, mask, p):
    """SiamMAE's objective: norm_pix_loss of the prediction against f2's patches, in fp32."""
    return norm_pix_loss(pred.float(), patchify(frames[:, 1], p).float(), mask)


# -----------------------------------------------------------------------------
# Data (Table 4a): frame pairs, decoded in DataLoader workers, normalized on the device. All the
# randomness of a sample (frames, crop, flip, f2's mask noise) comes from a seed made of (seed,
# epoch, video index): the data does not depend on the number of workers or ranks, or on resuming.

VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_EXTS = (".jpg", ".jpeg", ".png")  # a frame folder: <video>/<frame>.jpg|png, in name order
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet (MAE)
SEEK_AHEAD = 64  # frames: seek instead of decoding forward when the next wanted one is this far


def frame_files(folder):
    """The images of a frame folder in natural order (frame_2.jpg before frame_10.jpg)."""
    names = [f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTS)]
    return sorted(names, key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f)])


def find_clips(root):
    """The videos under root, or its frame folders (folders holding .jpg/.png files), never both."""
    if not os.path.isdir(root):
        fail(f"--data {root} does not exist; pass the folder of the videos (e.g. ucf101/)")
    videos, folders = [], []
    for d, _, files in os.walk(root, followlinks=True):
        videos += [os.path.join(d, f) for f in files if f.lower().endswith(VIDEO_EXTS)]
        folders += [d] if any(f.lower().endswith(FRAME_EXTS) for f in files) else []
    if videos and folders:
        fail(f"--data {root} mixes {len(videos)} videos and {len(folders)} frame folders (e.g. "
             f"{folders[0]}); pass a folder of one kind")
    if not videos and not folders:
        fail(f"--data {root} holds no video files ({' '.join(VIDEO_EXTS)}) and no folders of "
             f"{'|'.join(FRAME_EXTS)} frames")
    return sorted(videos or folders)


def probe_video(path):
    """{"frames": n, "fps": f} as the header says: frames 0 when the file cannot be opened or its
    first frame not decoded, fps 0 when unknown; a frame folder has n images and fps 0. A header
    can claim more frames than decode: VideoPairs learns the true length when decoding stops."""
    if os.path.isdir(path):
        return dict(frames=len(frame_files(path)), fps=0.0)
    cap = cv2.VideoCapture(path)
    try:
        ok = cap.isOpened() and cap.read()[0]
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if ok else 0
        return dict(frames=n, fps=cap.get(cv2.CAP_PROP_FPS))
    finally:
        cap.release()


def index_videos(root, cache_path, min_frames, threads=8):
    """[(path, n_frames)] of the usable videos (or frame folders) under root, with at least
    min_frames (an int, or a function of the file's fps); the probes are cached in cache_path,
    {path: {"frames", "fps"}}."""
    paths = find_clips(root)
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    todo = [p for p in paths if not isinstance(cache.get(p), dict)]  # new, or an older cache's int
    if todo:
        print(f"probing {len(todo)} videos ({len(paths) - len(todo)} cached) ...", flush=True)
        with ThreadPoolExecutor(threads) as ex:
            cache.update(zip(todo, ex.map(probe_video, todo)))
    need = min_frames if callable(min_frames) else lambda fps: min_frames
    videos = [(p, cache[p]["frames"]) for p in paths if cache[p]["frames"] >= need(cache[p]["fps"])]
    bad = sum(cache[p]["frames"] == 0 for p in paths)
    if len(videos) < len(paths):
        print(f"warning: skipped {bad} unreadable and {len(paths) - len(videos) - bad} too short "
              f"(fewer frames than --gap's MIN + 1) of {len(paths)} videos", flush=True)
    if not videos:
        fail(f"none of the {len(paths)} videos in {root} is readable with more frames than --gap's "
             f"MIN; check the files (ffprobe) or lower --gap")
    if todo:  # --data is usable: only now is --out made, and the probes cached in it
        make_out_dir(os.path.dirname(cache_path) or ".")
        atomic_write_text(cache_path, json.dumps(cache))
    return videos


def read_frames(path, wanted):
    """Decodes the wanted frame indices only (seeking when far ahead): {index: RGB uint8 (H, W, 3)},
    or None when the file ends early or is corrupt. A frame folder: one image read per frame."""
    if os.path.isdir(path):
        names, out = frame_files(path), {}
        for idx in set(wanted):
            img = cv2.imread(os.path.join(path, names[idx])) if idx < len(names) else None
            if img is None:
                return None
            out[idx] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return out
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


def count_frames(path):
    """How many frames really decode, decoding them all: once per file whose header lies."""
    if os.path.isdir(path):  # the images before the first unreadable one
        names = frame_files(path)
        unreadable = (k for k, f in enumerate(names) if cv2.imread(os.path.join(path, f)) is None)
        return next(unreadable, len(names))
    cap, n = cv2.VideoCapture(path), 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def gap_in_frames(gap, fps, unit):
    """--gap (MIN, MAX) in a file's own frames: at --gap-unit 30fps scaled by fps / 30 (4-48 at 10
    fps: 1-16, at 25 fps: 3-40); at --gap-unit frames as given."""
    if unit == "frames":
        return gap
    scale = fps / float(unit.removesuffix("fps"))
    return max(1, round(gap[0] * scale)), max(1, round(gap[1] * scale))


def sample_gap_and_start(n_frames, gap):
    """Gap ~ U{gmin .. min(gmax, n−1)}, f1 ~ U{0 .. n−1−gap}, f2 = f1 + gap (Table 4a)."""
    g = int(torch.randint(gap[0], min(gap[1], n_frames - 1) + 1, ()))
    f1 = int(torch.randint(0, n_frames - g, ()))
    return f1, f1 + g


class VideoPairs(torch.utils.data.Dataset):
    """(video index, epoch) -> frames (R, 2, 3, S, S) uint8, f2's mask noise (R, N); R = --repeat.
    fps: each video's rate, for --gap-unit (None: all at the reference rate, the gap in frames);
    cache_path: the probe cache that report_learned updates.

    A video whose decoding stops early is decoded through once to learn its true length, which all
    workers then sample within (the lengths are in shared memory); the main process warns and caches
    it (report_learned). Its later draws depend on when that happened; the next run reads the
    cache."""

    def __init__(self, videos, cfg, fps=None, cache_path=None):
        self.paths, self.cfg, self.cache_path = [p for p, _ in videos], cfg, cache_path
        self.frames = torch.tensor([n for _, n in videos]).share_memory_()  # decodable lengths
        self.checked = torch.zeros(len(videos), dtype=torch.bool).share_memory_()  # length counted
        self.failed = torch.zeros(len(videos), dtype=torch.long).share_memory_()  # failed reads
        self.reported = (self.frames.clone(), 0)  # in the main process: what report_learned said
        self.gaps = ([gap_in_frames(cfg.gap, f or cfg.frames_fps, cfg.gap_unit) for f in fps] if fps
                     else [cfg.gap] * len(videos))  # (MIN, MAX) per video, in its own frames

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        (idx, epoch), cfg = key, self.cfg
        for attempt in range(len(self.paths)):  # an unreadable video: the next one
            i = (idx + attempt) % len(self.paths)
            n, gap = int(self.frames[i]), self.gaps[i]
            if n <= gap[0]:  # learned to be too short (0: nothing decodes)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((cfg.seed, epoch, idx, attempt)) & 0xFFFF_FFFF)
                pairs = [sample_gap_and_start(n, gap) for _ in range(cfg.repeat)]
                frames = read_frames(self.paths[i], [f for pair in pairs for f in pair])
                if frames is None:
                    self.learn_length(i)
                    continue
                clips = torch.stack([self.crop_pair(frames[a], frames[b]) for a, b in pairs])
                noise = torch.rand(cfg.repeat, (cfg.img_size // cfg.patch_size) ** 2)  # (R, N)
                return clips, noise  # (R, 2, 3, S, S), (R, N)
        raise RuntimeError("no video could be decoded")

    def learn_length(self, i):
        """Decoding stopped early: count what decodes, once per video (or once per worker that
        failed on it before the first count ended)."""
        self.failed[i] += 1
        if not self.checked[i]:
            self.checked[i] = True
            self.frames[i] = min(int(self.frames[i]), count_frames(self.paths[i]))

    def report_learned(self, print0):
        """In the main process: one warning per video whose length was learned since the last call,
        the lengths saved in the probe cache (the next run samples within them from its start), and
        a count of the failed reads."""
        old, failed_before = self.reported
        changed = np.flatnonzero(self.frames.numpy() != old.numpy()).tolist()  # no device read
        for i in changed:
            n, was = int(self.frames[i]), int(old[i])
            print0(f"warning: {self.paths[i]} " + ("decodes no frame; dropped" if n == 0 else
                   f"decodes {n} frames, its header says {was}; sampling within {n} from now on"))
        if changed and self.cache_path:
            cache = json.load(open(self.cache_path))
            for i in changed:
                cache[self.paths[i]]["frames"] = int(self.frames[i])
            write_or_warn(atomic_write_text, self.cache_path, json.dumps(cache))
        failed = int(self.failed.sum())
        if failed > failed_before:
            print0(f"warning: {failed - failed_before} reads failed since the last report "
                   f"({failed} in all); each was replaced by the next video", flush=True)
        self.reported = (self.frames.clone(), failed)

    def crop_pair(self, a, b):
        """The SAME RandomResizedCrop and horizontal flip on both frames (Table 4a), resized by
        OpenCV: area averaging when shrinking (antialiased), bicubic when enlarging (MAE's
        interpolation=3). 3x less CPU than torchvision's antialiased bicubic on uint8 tensors."""
        H, W, _ = a.shape
        scale, ratio = list(self.cfg.crop_scale), [3 / 4, 4 / 3]
        i, j, h, w = T.RandomResizedCrop.get_params(torch.empty(0, H, W), scale, ratio)  # reads H, W
        S = self.cfg.img_size
        interp = cv2.INTER_AREA if h * w > S * S else cv2.INTER_CUBIC
        pair = np.stack([cv2.resize(f[i:i + h, j:j + w], (S, S), interpolation=interp) for f in (a, b)])
        pair = pair[:, :, ::-1] if torch.rand(()) < 0.5 else pair  # (2, S, S, 3), flipped left-right
        return torch.from_numpy(np.ascontiguousarray(pair)).permute(0, 3, 1, 2)  # (2, 3, S, S) uint8


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's split (one seeded permutation per epoch, rank r takes every world-th
    index) that can start mid-epoch after a resume. Yields (index, epoch), `batch` per step."""

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


def make_loader(cfg, rank, world, device, print0):
    """Rank 0 indexes the videos, the others read its cache; a batch is batch_size / repeat videos."""
    data = cfg.data
    if not data:
        import toydata
        data = os.path.join(toydata.ensure_toy_data(), "ucf101")
    def min_frames(fps):  # a pair needs more frames than --gap's MIN, at the file's rate
        return gap_in_frames(cfg.gap, fps or cfg.frames_fps, cfg.gap_unit)[0] + 1

    cache = os.path.join(cfg.out, "video_index.json")  # index_videos makes --out once --data is checked
    if rank == 0:
        videos = index_videos(data, cache, min_frames, threads=max(cfg.workers, 4))
    if world > 1:
        dist.barrier()  # rank 0 probed the videos and wrote the cache
        if rank != 0:
            videos = index_videos(data, cache, min_frames)
    probes = json.load(open(cache))
    fps = [probes[p]["fps"] for p, _ in videos]
    vpb = cfg.batch_size // cfg.repeat
    sampler = EpochSampler(len(videos), vpb, cfg.seed, rank, world)
    if sampler.batches == 0:
        fail(f"{len(videos)} videos are fewer than one step needs ({world} x {vpb}); lower --batch-size")
    dataset = VideoPairs(videos, cfg, fps, cache if rank == 0 else None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=vpb, sampler=sampler, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
        persistent_workers=cfg.workers > 0, worker_init_fn=ignore_stop_signals)
    print0(f"data {data}: {len(videos)} videos, {sampler.batches} steps per epoch of {world} x "
           f"{cfg.batch_size} pairs")
    return loader, sampler


@functools.cache
def mean_std(device):
    """MEAN and STD as (3, 1, 1) tensors on the device, made once: a copy to the GPU at every step
    would wait for the GPU each time."""
    return tuple(torch.tensor(v, device=device).view(3, 1, 1) for v in (MEAN, STD))


def to_model_input(clips, noise, device):
    """uint8 (V, R, 2, 3, S, S) -> normalized (V·R, 2, 3, S, S) on the device; noise -> (V·R, N)."""
    x = clips.to(device, non_blocking=True).flatten(0, 1).float().div_(255)
    mean, std = mean_std(device)
    return (x - mean) / std, noise.to(device, non_blocking=True).flatten(0, 1)


# -----------------------------------------------------------------------------
# Schedule (MAE util/lr_sched.py, per step rather than per fraction of an epoch)

def lr_at(step, total, warmup, peak, floor):
    """1) linear warm-up 0 -> peak over `warmup` steps; 2) half-cycle cosine peak -> floor."""
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model, weight_decay):
    """No weight decay on 1-D parameters (biases, norm weights): timm's add_weight_decay, which MAE's
    main_pretrain.py calls. The 3-D cls_token and mask_token ARE decayed, as there."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


# -----------------------------------------------------------------------------
# Checkpoint: one dict with everything to continue exactly. Written to a temp file, flushed to the disk and
# renamed; the one before stays as checkpoint.prev.pt, so a crash, a full disk or a damaged file at any moment
# leaves a good checkpoint to --resume from.

METHOD = "siammae"  # written into every checkpoint: --resume refuses one of another program
SOURCE_SHA = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:12]  # the code that ran
ARCH_KEYS = ("model", "patch_size", "img_size", "encoder", "decoder", "decoder_depth",
             "decoder_dim", "decoder_heads")
LAYOUT = {"method", "model", "optimizer", "scaler", "step", "config", "source_sha256", "rng"}  # what save writes


def atomic_write_text(path, text):
    """`text` to `path` through a temp file and a rename: never half a file, and no temp file left behind."""
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    finally:
        with suppress(OSError):
            os.remove(path + ".tmp")


def previous(path):
    """checkpoint.pt -> checkpoint.prev.pt, the checkpoint before the latest."""
    return os.path.splitext(path)[0] + ".prev.pt"


def save_checkpoint(path, model, optimizer, scaler, step, cfg):
    """model = the whole SiamMAE module: encoder and decoder. A write that fails (full disk, no permission,
    read-only) leaves the checkpoints on disk as they were and returns False (every rank then stops, exit 1)."""
    rng = dict(torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    state = dict(method=METHOD, model=model.state_dict(), optimizer=optimizer.state_dict(),
                 scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg),
                 source_sha256=SOURCE_SHA, rng=rng)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename makes it the checkpoint
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        with suppress(OSError):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(tmp) or ".").free
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"write failed, {free >> 20} MiB free"
        print(f"error: cannot write the checkpoint of step {step} to {tmp} ({why}); the checkpoints in "
              f"{os.path.dirname(tmp)} are as they were: free space or fix permissions, then --resume",
              file=sys.stderr, flush=True)
        return False
    if os.path.exists(path):
        os.replace(path, previous(path))
    os.replace(tmp, path)
    return True


def read_checkpoint(path):
    """-> (the dict save_checkpoint wrote, None), or (None, what is wrong with the file). torch.load does not check
    the CRC-32 that torch.save writes for every record (a flipped byte in a tensor loads silently): zipfile does."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # the first record whose bytes do not match their CRC-32
        if bad:
            return None, f"corrupted (record {bad} fails its CRC-32)"
        return torch.load(path, map_location="cpu", weights_only=True), None
    except zipfile.BadZipFile:
        return None, "truncated, or not a torch.save file"
    except Exception as e:  # whatever zipfile or the unpickler raise on bytes that are no checkpoint
        return None, f"unreadable ({type(e).__name__})"


def resume_state(path):
    """(state, its path) for --resume: `path`, or when that is missing or damaged the previous checkpoint, with a
    line that says so (the damaged file is kept aside as <path>.damaged). Neither readable: a one-line error."""
    state, why = read_checkpoint(path) if os.path.exists(path) else (None, "missing")
    if state is not None:
        return state, path
    prev = previous(path)
    state, why_prev = read_checkpoint(prev) if os.path.exists(prev) else (None, "missing")
    if state is None:
        fail(f"{path} is {why} and {prev} is {why_prev}: nothing to resume; start again without --resume "
             f"in another --out")
    if os.path.exists(path) and int(os.environ.get("RANK", 0)) == 0:
        os.replace(path, path + ".damaged")  # else the next save would rotate it over the good one
    print(f"warning: {path} is {why}; resuming from the previous checkpoint {prev}", flush=True)
    return state, prev


def check_checkpoint(state, path, cfg):
    """A checkpoint of another program, another layout (another version of this file) or another architecture is
    a one-line error that names the fix."""
    if not isinstance(state, dict) or "method" not in state:
        fail(f"{path} is no checkpoint of {METHOD}.py (it has no 'method' entry); --resume needs one that "
             f"{METHOD}.py wrote: choose another --out")
    if state["method"] != METHOD:
        fail(f"{path} is a checkpoint of {state['method']}.py, not {METHOD}.py; resume it with "
             f"{state['method']}.py, or choose another --out")
    if set(state) != LAYOUT:
        fail(f"{path} has another layout (missing {sorted(LAYOUT - set(state))}, unknown "
             f"{sorted(set(state) - LAYOUT)}): another version of {METHOD}.py wrote it; resume it with that "
             f"version, or choose another --out")
    theirs, ours = state["config"], dataclasses.asdict(cfg)
    diff = [f"{k}={theirs.get(k)} (you: {ours[k]})" for k in ARCH_KEYS if theirs.get(k) != ours[k]]
    if diff:
        fail(f"{path} is a checkpoint of another architecture: {', '.join(diff)}; pass the same flags or "
             f"another --out")


def load_checkpoint(path, model, optimizer, scaler, cfg):
    """Restores everything from `path` (or the previous checkpoint, see resume_state); returns the step to
    continue from and the file it came from."""
    state, path = resume_state(path)
    check_checkpoint(state, path, cfg)
    try:
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # tensors of other names, shapes or groups
        fail(f"{path} does not fit this {METHOD}.py ({str(e).strip().splitlines()[0][:80]}); resume it with "
             f"the version that wrote it (source sha256 {state['source_sha256']}), or choose another --out")
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], path


# -----------------------------------------------------------------------------
# Train loop

def main(argv=None):
    cfg = parse_config(argv)
    device, ctx, dtype, rank, world, print0 = setup_device(cfg)
    torch.manual_seed(cfg.seed + rank)  # the init (DDP broadcasts rank 0's); the data seeds itself
    model = SiamMAE(cfg).to(device)
    n_enc = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    n_dec = sum(p.numel() for p in model.parameters() if p.requires_grad) - n_enc
    print0(f"SiamMAE {cfg.model}/{cfg.patch_size} {cfg.encoder} encoder {n_enc / 1e6:.2f}M params | "
           f"{cfg.decoder} decoder {cfg.decoder_depth}x{cfg.decoder_dim}x{cfg.decoder_heads} "
           f"{n_dec / 1e6:.2f}M params")
    if cfg.bench:
        return bench(cfg, model, device, ctx, dtype)
    if cfg.bench_data:
        return bench_data(cfg, model, device, ctx, dtype)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    found = [p for p in (ckpt_path, previous(ckpt_path)) if os.path.exists(p)]
    if found and not cfg.resume:
        fail(f"{found[0]} exists; pass --resume to continue that run, or choose another --out")
    if cfg.resume and not found:
        fail(f"--resume but there is no checkpoint at {ckpt_path}; drop --resume or fix --out")
    loader, sampler = make_loader(cfg, rank, world, device, print0)  # checks --data before --out is made
    make_out_dir(cfg.out)

    # optimizer and schedule (Table 4a)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=True)  # fused: 3x on CPU
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    eff_batch = cfg.batch_size * cfg.accum * world
    peak_lr = cfg.lr or cfg.blr * eff_batch / 256
    steps_per_epoch = sampler.batches // cfg.accum
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    n_decay, n_no_decay = (sum(p.numel() for p in g["params"]) for g in groups)
    print0(f"effective batch {eff_batch} pairs ({world} x {cfg.batch_size} x accum {cfg.accum}) | "
           f"base lr {cfg.blr:.2e} -> lr {peak_lr:.2e} | {total} steps, {warmup} warm-up | "
           f"weight decay on {n_decay / 1e6:.2f}M params, off on {n_no_decay / 1e3:.1f}K")
    step, resumed = load_checkpoint(ckpt_path, model, optimizer, scaler, cfg) if cfg.resume else (0, None)
    if cfg.resume:
        print0(f"resumed from {resumed} at step {step}")
    print0("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dist.is_initialized():  # under torchrun, also with one process (the 1-GPU test of NCCL DDP)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        print0(f"DDP: {world} process(es), {dist.get_backend()} all-reduce of the gradients")

    stop = stop_on_signals()
    interval = torch.zeros((), dtype=torch.float64, device=device)  # Σ loss since the last log
    n_steps, t_data, t_last, last_ckpt = 0, 0.0, time.perf_counter(), "none yet"
    model.train()
    while step < total:
        loader.dataset.report_learned(print0)  # lengths learned last epoch: warned once, cached
        sampler.epoch, first = divmod(step, steps_per_epoch)  # mid-epoch: same order and samples
        sampler.start_batch = first * cfg.accum
        batches = iter(loader)
        for _ in range(min(steps_per_epoch - first, total - step)):
            # 1) schedule for this step
            lr = lr_at(step, total, warmup, peak_lr, cfg.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # 2) forward / backward with accumulation
            for micro in range(cfg.accum):
                t0 = time.perf_counter()
                frames, noise = to_model_input(*next(batches), device)
                t_data += time.perf_counter() - t0
                sync_grads = micro == cfg.accum - 1 or world == 1
                with (nullcontext() if sync_grads else model.no_sync()), ctx:
                    pred, mask = model(frames, noise)
                    loss = reconstruction_loss(frames, pred, mask, cfg.patch_size)
                scaler.scale(loss / cfg.accum).backward()
                interval += loss.detach().double() / cfg.accum
            # 3) optimizer step
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_steps += 1
            # 4) at log and checkpoint steps (and after a stop signal on one process): check, log, save
            log_now = step % cfg.log_every == 0 or step == total
            ckpt_now = step % cfg.ckpt_every == 0 or step == total
            sig = 0
            if log_now or ckpt_now or (world == 1 and stop["requested"]):
                got = [stop["requested"] == s for s in STOP_SIGNALS]  # one-hot: the signal this rank received
                loss_sum, *counts = sum_over_ranks([interval, *got], device, world)  # 1 + 3 floats
                loss_val, sig = loss_sum / world / n_steps, stop_signal(counts)  # mean: steps and ranks
                if not math.isfinite(loss_val):
                    print0(f"error: loss is {loss_val} at step {step}; lower --blr or use --dtype "
                           f"fp32 (last good checkpoint: {last_ckpt})", file=sys.stderr)
                    raise SystemExit(1)
                if log_now:
                    dt = time.perf_counter() - t_last
                    ms, rate, data = 1e3 * dt / n_steps, n_steps * eff_batch / dt, t_data / dt
                    print0(f"step {step:06d}/{total} ({100 * step / total:.1f}%) | loss "
                           f"{loss_val:.4f} | lr {lr:.2e} | {ms:.0f} ms/step (data {100 * data:.0f}%)"
                           f" | {rate:.1f} pairs/s | eta {(total - step) * ms / 3.6e6:.2f}h", flush=True)
                    if rank == 0:
                        write_or_warn(append_line, os.path.join(cfg.out, "log.jsonl"), json.dumps(dict(
                            step=step, epoch=step / steps_per_epoch, lr=lr, loss=loss_val, ms_per_step=ms,
                            pairs_per_s=rate, data=data)))
                    interval.zero_()
                    n_steps, t_data, t_last = 0, 0.0, time.perf_counter()
            if rank == 0 and (step % cfg.fig_every == 0 or step == total):
                path = os.path.join(cfg.out, f"recon_{step:06d}.png")
                write_or_warn(reconstruction_figure, path, frames, pred, mask, cfg.patch_size)
            if ckpt_now or sig:
                if not torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all():
                    print0(f"error: parameters not finite at step {step}; lower --blr or use --dtype "
                           f"fp32 (last good checkpoint: {last_ckpt})", file=sys.stderr)
                    raise SystemExit(1)
                failed = rank == 0 and not save_checkpoint(ckpt_path, raw_model, optimizer, scaler, step, cfg)
                if world > 1:  # every rank learns whether rank 0 could write, and all stop together
                    failed = sum_over_ranks([failed], device, world)[0] > 0
                if failed:
                    raise SystemExit(1)
                last_ckpt = f"{ckpt_path} at step {step}"
            if sig:
                stop_all(sig, step, world, print0)
    loader.dataset.report_learned(print0)
    print0(f"done: {step} steps; checkpoint {ckpt_path}\nwhat it learned: python propagate.py --ckpt {ckpt_path} "
           f"--compare random,pixels   # J&F against the untrained network and raw pixels, and their matches")
    if dist.is_initialized():
        dist.destroy_process_group()
    return raw_model


# -----------------------------------------------------------------------------
# Plumbing: command line, device and DDP, figures, benchmark

def fail(msg):
    """A user error: one line naming the problem and the fix, exit code 2 (argparse's code for bad usage)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def config_help():
    """{field: its --help text}: the comment after each Config field, joined with the comment lines under it that
    start in the same column (a help text wrapped over several lines). The comments are the documentation."""
    helps, field, col = {}, None, -1
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"    (\w+): .*?  # (.*)$", line)
        if m:
            field, col = m.group(1), line.index("  # ") + 2
            helps[field] = m.group(2).strip()
        elif field and line.find("#") == col and not line[:col].strip():
            helps[field] += " " + line[col + 1:].strip()
        else:
            field = None
    return helps


def parse_config(argv=None):
    """Config from the command line: defaults < --preset < the flags given. Bool flags are --x / --no-x, so a
    preset's choice can be undone. Prints what the preset set."""
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    helps = config_help()
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=None)
        kw["help"] = f"{helps.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type is tuple:
            ap.add_argument(flag, type=type(f.default[0]), nargs=2, metavar=("MIN", "MAX"), **kw)
        else:
            ap.add_argument(flag, type=f.type, metavar=f.type.__name__.upper(), **kw)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    preset = given.get("preset") or ("toy" if not given.get("data") and not given.get("bench") else "")
    if preset and preset not in PRESETS:
        fail(f"unknown --preset {preset}; choose from {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS.get(preset, {}), **given, "preset": preset})
    if preset:
        print(f"preset {preset}: " + ", ".join(f"{k}={v}" for k, v in PRESETS[preset].items() if k not in given))
    for f in dataclasses.fields(cfg):  # nargs=2 gives lists; keep tuples, as the defaults are
        if f.type is tuple:
            setattr(cfg, f.name, tuple(getattr(cfg, f.name)))
    check_config(cfg)
    return cfg


def check_config(cfg):
    """A bad flag is a one-line error naming the fix, before anything is built or written."""
    p, enc, dec = cfg.patch_size, cfg.encoder, cfg.decoder
    for bad, msg in [
            (cfg.model not in VIT, f"unknown --model {cfg.model}; choose from {', '.join(VIT)}"),
            (not 0 <= cfg.mask < 1, f"--mask {cfg.mask} must be in [0, 1): the fraction hidden"),
            (cfg.img_size % p, f"--img-size {cfg.img_size} is not divisible by --patch-size {p}; "
                               f"use e.g. --img-size {cfg.img_size // p * p}"),
            (enc not in ("siamese", "joint") or dec not in ("cross-self", "cross", "joint"),
             "--encoder takes siamese|joint and --decoder cross-self|cross|joint"),
            (not 1 <= cfg.gap[0] <= cfg.gap[1], f"--gap {cfg.gap[0]} {cfg.gap[1]}: need 1 <= MIN <= MAX"),
            (not re.fullmatch(r"frames|[1-9]\d*(\.\d+)?fps", cfg.gap_unit),
             f"--gap-unit {cfg.gap_unit}: use frames, or a rate such as 30fps"),
            (cfg.batch_size % cfg.repeat,
             f"--batch-size {cfg.batch_size} must be a multiple of --repeat {cfg.repeat}"),
            (cfg.decoder_dim % cfg.decoder_heads,
             f"--decoder-dim {cfg.decoder_dim} must be divisible by --decoder-heads {cfg.decoder_heads}"),
            (cfg.dtype not in ("auto", "bf16", "fp16", "fp32") or cfg.device not in ("auto", "cuda", "cpu"),
             "--dtype takes auto|bf16|fp16|fp32 and --device auto|cuda|cpu"),
            (cfg.device == "cuda" and not torch.cuda.is_available(),
             "--device cuda but no CUDA GPU is visible; use --device cpu")]:
        if bad:
            fail(msg)


def setup_device(cfg):
    """DDP from torchrun's environment (NCCL on CUDA, gloo on CPU), the device and the autocast context; prints what
    it decided."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    rank, local, world = 0, 0, 1
    if ddp:
        rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
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


# Ctrl-C; the early warning of `#SBATCH --signal=USR1@120`; what SLURM, Kubernetes, `docker stop`
# and torchrun stop a job with (SIGKILL follows after a grace period: SLURM's KillWait and
# Kubernetes' default are 30 s, docker's 10 s)
STOP_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)


def stop_on_signals():
    """Each of STOP_SIGNALS sets stop["requested"] to its number. The train loop reads it at its
    next check (after every step on one process; at log and checkpoint steps under torchrun, where
    the ranks agree in the all-reduce they do there anyway), saves and exits 128 + the number
    (130, 138, 143), as a shell reports a process that signal killed. A second Ctrl-C interrupts
    at once."""
    stop = {"requested": 0}

    def request(signum, frame):
        stop["requested"] = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in STOP_SIGNALS:
        signal.signal(s, request)
    return stop


def stop_signal(counts):
    """The signal to stop on, from how many ranks received each of STOP_SIGNALS: the highest-
    numbered one any rank received (SIGTERM over SIGUSR1 over SIGINT), 0 for none."""
    return max((s for s, n in zip(STOP_SIGNALS, counts) if n), default=0)


def stop_all(sig, step, world, print0):
    """After the checkpoint of `step`: every rank waits until rank 0 has written it (torchrun
    stops the others once one has exited), then exits 128 + sig."""
    if world > 1:
        dist.barrier()
    print0(f"interrupted: checkpoint saved at step {step}; continue with --resume "
           f"({signal.Signals(sig).name}: exit {128 + sig})", flush=True)
    raise SystemExit(128 + sig)


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore STOP_SIGNALS: SLURM and a terminal signal every process of the
    job, and a worker killed by one would take the main process down before it saved. The main
    process ends its workers."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def make_out_dir(out):
    """Creates --out and writes a probe file in it before training: an unwritable folder is a
    one-line error now, not a failed checkpoint after hours of training."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"--out {out} is not writable ({e.strerror}); fix its permissions or choose another "
             f"--out")


def append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def write_or_warn(write, path, *args):
    """write(path, *args) for a log line, figure or eval.json: if it fails (full disk, no
    permission), one warning and training goes on; only a failed checkpoint stops the run."""
    try:
        write(path, *args)
    except OSError as e:
        print(f"warning: cannot write {path} ({e.strerror or e}); training goes on",
              file=sys.stderr, flush=True)


def sum_over_ranks(values, device, world):
    """Floats (or 0-d tensors) summed over all DDP ranks -> Python floats: the train loop's one host sync, taken at
    log and checkpoint steps only (every rank reaches those at the same step, so none waits for another)."""
    t = torch.stack([torch.as_tensor(v, device=device).double() for v in values])
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def reconstruction_figure(path, frames, pred, mask, p, rows=4):
    """A PNG, a pair per row: f1 | masked f2 | prediction, visible patches pasted in | f2. pred is
    de-normalized with the true patch statistics, as in MAE's demo/mae_visualize.ipynb."""
    frames, pred, mask = frames[:rows].float().cpu(), pred[:rows].float().cpu(), mask[:rows].cpu()
    g, m = frames.shape[-1] // p, mask[..., None]  # m: (b, N, 1)
    target = patchify(frames[:, 1], p)  # (b, N, P)
    pred_pix = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    masked_f2 = unpatchify(target * (1 - m), p, g, g)  # hidden patches at 0, the dataset mean
    recon = unpatchify(pred_pix * m + target * (1 - m), p, g, g)
    grid = torch.stack([frames[:, 0], masked_f2, recon, frames[:, 1]], dim=1)  # (b, 4, 3, S, S)
    std, mean = torch.tensor(STD).view(3, 1, 1), torch.tensor(MEAN).view(3, 1, 1)
    img = (grid * std + mean).clamp(0, 1).mul(255).byte()  # back to RGB
    b, c, _, S, _ = img.shape
    img = img.permute(0, 3, 1, 4, 2).reshape(b * S, c * S, 3).numpy()  # rows of the 4 images
    zoom = max(1, 160 // S)  # small toy crops are enlarged (nearest) so the patches stay visible
    img = cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    if not cv2.imwrite(path + ".tmp.png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):  # False, not an error
        with suppress(OSError):
            os.remove(path + ".tmp.png")
        raise OSError(f"cv2.imwrite failed on {path}.tmp.png")
    os.replace(path + ".tmp.png", path)


def matmul_rate(device, dtype, reps=10):
    """FLOP/s of an n x n x n matmul in the step's precision, n = 8192 on a GPU (2048 would not fill
    it) and 2048 on a CPU, median of `reps` after a warm-up: --bench's "% of the matmul rate"."""
    n = 8192 if device.type == "cuda" else 2048
    mm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=mm_dtype) for _ in range(2))
    times = []
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[1:]), n


def flop_rate(x):
    """FLOP/s in the unit that reads best: TFLOP/s on a GPU, GFLOP/s on a CPU."""
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops_per_pair(model, cfg, device):
    """FLOPs of forward + backward for one pair, counted by torch's FlopCounterMode on a real step
    (attention through the math kernel, so that its matmuls are counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    frames = torch.randn(2, 2, 3, cfg.img_size, cfg.img_size, device=device)
    noise = torch.rand(2, (cfg.img_size // cfg.patch_size) ** 2, device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        reconstruction_loss(frames, *model(frames, noise), cfg.patch_size).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def bench(cfg, model, device, ctx, dtype, steps=5):
    """Times whole training steps on random input as main() runs them (autocast, the fp16 scaler,
    fused AdamW; compiled with --compile): one line with the FLOP rate against this device's matmul
    rate in the step's precision. The first two steps (and any compiling) only warm up."""
    B, S = cfg.batch_size, cfg.img_size
    frames = torch.randn(B, 2, 3, S, S, device=device)
    noise = torch.rand(B, (S // cfg.patch_size) ** 2, device=device)
    flops = train_flops_per_pair(model, cfg, device) * B
    step_model = torch.compile(model) if cfg.compile else model
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, betas=(0.9, 0.95),
                            fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    times = []
    for _ in range(steps + 2):
        sync(device)
        t = time.perf_counter()
        with ctx:
            loss = reconstruction_loss(frames, *step_model(frames, noise), cfg.patch_size)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    dt, (peak, n) = statistics.median(times[2:]), matmul_rate(device, dtype)
    print(f"bench | {cfg.model}/{cfg.patch_size} {S}px | {cfg.encoder} encoder, {cfg.decoder} "
          f"decoder {cfg.decoder_depth}x{cfg.decoder_dim}x{cfg.decoder_heads} | mask {cfg.mask} | "
          f"{dtype}, {'compiled' if cfg.compile else 'eager'} | batch {B} | {dt * 1e3:.1f} ms/step "
          f"(median of {steps}) | {B / dt:.1f} pairs/s | {flop_rate(flops / dt)} = "
          f"{100 * flops / dt / peak:.0f}% of {dtype} matmul {flop_rate(peak)} (median {n}^3 on "
          f"{device.type}) | {flops / 1e9:.1f} GFLOP/step", flush=True)
    return B / dt


def bench_data(cfg, model, device, ctx, dtype):
    """Pairs/s of the loader (--workers processes decoding --data) over --bench-data seconds,
    beside the training step's pairs/s on this device (bench): how many workers keep it fed."""
    loader, sampler = make_loader(cfg, 0, 1, device, print)
    batches, pairs = iter(loader), 0
    next(batches)  # the workers are up
    t = time.perf_counter()
    while time.perf_counter() - t < cfg.bench_data:
        batch = next(batches, None)
        if batch is None:  # the epoch ended: the next one
            sampler.epoch += 1
            batches = iter(loader)
            continue
        pairs += batch[0].shape[0] * batch[0].shape[1]  # videos x --repeat
    rate = pairs / (time.perf_counter() - t)
    per_worker = rate / max(1, cfg.workers)
    print(f"bench-data | {cfg.data or 'toy videos'} | {cfg.workers} workers: {rate:.1f} pairs/s, "
          f"{per_worker:.1f} per worker | {cfg.img_size}px crops, --repeat {cfg.repeat}", flush=True)
    del batches, loader  # the workers stop before the step is timed
    step_rate = bench(cfg, model, device, ctx, dtype)
    idle = max(0.0, 1 - rate / step_rate)  # the share of time the step would wait for data
    print(f"bench-data | the step eats {step_rate:.1f} pairs/s on {device}: it needs "
          f"{math.ceil(step_rate / per_worker)} workers at {per_worker:.1f} pairs/s each; with "
          f"{cfg.workers} it would wait for data {100 * idle:.0f}% of the time", flush=True)


if __name__ == "__main__":
    main()
