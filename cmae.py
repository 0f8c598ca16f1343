"""
CMAE: Contrastive Masked Autoencoders, in one file.
Huang, Jin, Lu, Hou, Cheng, Fu, Shen, Feng. "Contrastive Masked Autoencoders are Stronger Vision
Learners", IEEE TPAMI 2023, arXiv:2207.13532. Official code: github.com/ZhichengHuang/CMAE.

MAE plus a contrastive term. One RandomResizedCrop to 256 px gives two 224-px views that differ only
by a small pixel shift and colour augmentation ("pixel shifting"). The online branch is an MAE: a
ViT encodes the visible 2x2-patch blocks of the unshifted view, a pixel decoder reconstructs the
hidden patches (normalized pixels, L2), and a small "feature decoder" fills them in in feature
space; the mean of its outputs goes through a projector and a predictor. The target branch, an EMA
copy of the encoder and projector, sees the FULL shifted, colour-augmented view. InfoNCE pulls each
image's two embeddings together against all other images of the (all-gathered) batch.

    python cmae.py                      # toy demo, 2-core CPU (~3 min): evaluate.py before / after
    python cmae.py --data imagenet/     # one GPU (or CPU), official ViT-B/16 defaults
    torchrun --nproc_per_node=8 cmae.py --data imagenet/  # DDP; official: 32 GPUs x 128 images
    python evaluate.py --ckpt out/cmae/checkpoint.pt      # k-NN and 1/2/5-shot logistic regression
    python cmae.py --show-views         # a figure of view pairs: what pixel shifting does
    python cmae.py --bench --model vit_base --batch-size 8  # speed of one training step, no data

Measured on 2 idle CPU cores (no GPU), 2026-11-23: one step at batch 8, ViT-S/16 2.81 s (85 % of the
fp32 matmul rate), ViT-B/16 5.25 s (92 %). Toy demo on the shared 2-core CPU, 2026-12-01: 3m13s with
both evaluations; k-NN 76.7 -> 92.5, 1/2/5-shot 50.0/66.7/80.5 -> 64.3/83.3/88.3. More in README.md.

Sections: Config, ViT, Masking, Model, Loss, Data, Schedule, Checkpoint, Train loop, Plumbing.
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
from contextlib import nullcontext, suppress

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP


# -----------------------------------------------------------------------------
# Config: each field is a flag (--feat-decoder-depth for feat_decoder_depth), its comment the help.
# Defaults: official configs/pre-training/cmae/cmae_vit-base-p16_32xb128-coslr-300e_in1k.py

@dataclasses.dataclass
class Config:
    data: str = ""                # ImageFolder root holding train/<class>/<image> (and val/ for
                                  # --eval); empty: the toy images and the toy preset
    out: str = "out/cmae"         # folder for checkpoint.pt, log.jsonl, eval.json and the figures
    preset: str = ""              # "toy": small, fast settings for a CPU demo, set before the flags
    # model (official config: ViT-B/16, MAE's pixel decoder, a 2-block feature decoder)
    model: str = "vit_base"       # encoder size: vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 16          # patch side in pixels
    img_size: int = 224           # side of both views in pixels; a multiple of --patch-size
    decoder_depth: int = 8        # pixel decoder blocks (MAE's decoder; official 8 x 512, 16 heads)
    decoder_dim: int = 512        # width of the pixel decoder
    decoder_heads: int = 16       # attention heads of the pixel decoder
    feat_decoder_depth: int = 2   # feature decoder blocks, predicting encoder features (official 2)
    feat_decoder_dim: int = 512   # width of the feature decoder
    feat_decoder_heads: int = 16  # attention heads of the feature decoder
    proj_hidden: int = 1536       # hidden width of the projector (D -> 1536 -> E) and the predictor
                                  # (E -> 1536 -> E), official NonLinearNeck
    proj_dim: int = 256           # E, the width in which InfoNCE compares the two branches
    # views ("pixel shifting", official cmae/datasets/cmae_dataset.py): one crop; online view = its
    # top-left corner; target view = that window shifted by a few pixels, colour-augmented
    crop_size: int = 256          # side of the one RandomResizedCrop both views come from; must
                                  # exceed --img-size + --shift (official 256 > 224 + 31)
    crop_scale: tuple = (0.2, 1.0)  # RandomResizedCrop area range (MAE, official)
    shift: int = 31               # largest shift of the target view per axis, uniform integers in
                                  # [0, shift] (official ShiftPixel); 0: the same window
    # masking (official CMAEViT.random_masking: 2x2-patch blocks, 65 %; the paper text: MAE's 75 %)
    mask: float = 0.65            # fraction of blocks hidden: 0.65 keeps 17 of 49 blocks = 68 of
                                  # 196 patches (official); MAE: --mask-block 1 --mask 0.75
    mask_block: int = 2           # side of a mask block in patches; 1 = MAE's per-patch masking
    # losses (official cmae/models/heads/cmae_head.py): L = L_r + ct_weight * 2 * temperature * L_c
    temperature: float = 0.07     # InfoNCE temperature (official 0.07); lower = harder negatives
    ct_weight: float = 1.0        # L_c weight = ct_weight * 2 * temperature (official 1: 0.14)
    momentum: float = 0.996       # EMA momentum of target encoder + projector (official 0.996)
    momentum_end: float = 0.996   # momentum at the end of a cosine ramp from --momentum (official
                                  # MomentumUpdateHook); equal = constant
    # optimisation (official config)
    batch_size: int = 128         # images per GPU per step; official 32 GPUs x 128 (else --accum)
    epochs: int = 300             # length of training (official configs: 300 / 800 / 1600)
    max_steps: int = 0            # if > 0: train this many steps instead; the schedules span them
    blr: float = 1.5e-4           # base lr; lr = blr x effective batch / 256 (2.4e-3 at 4096)
    lr: float = 0.0               # if > 0: this absolute lr, no batch scaling
    min_lr: float = 0.0           # the cosine ends here (official CosineAnnealingLR eta_min 0)
    warmup_epochs: float = 40     # linear warm-up in epochs (official 40), converted to steps
    weight_decay: float = 0.05    # AdamW weight decay, betas (0.9, 0.95); none on LayerNorms,
                                  # biases and pos / mask / cls tokens (official paramwise_cfg)
    accum: int = 1                # gradient accumulation micro-steps per optimizer step
    # machine
    workers: int = 8              # DataLoader processes decoding images, per GPU
    device: str = "auto"          # auto (cuda if available) | cuda | cpu
    dtype: str = "auto"           # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False         # torch.compile the model (faster on CUDA after compiling)
    seed: int = 0                 # seeds the initial network and each sample's crop, colour, mask
    resume: bool = False          # continue from <out>/checkpoint.pt (same flags), bit for bit
    bench: bool = False           # time training steps on synthetic input, print one line, exit
    show_views: bool = False      # write <out>/views.png (crop | online | shifted | +colour), exit
    eval: bool = False            # evaluate.py's k-NN and few-shot on --data's val/, before and
                                  # after training (under torchrun: after only); the toy preset: on
    # logging
    log_every: int = 20           # steps between log lines and log.jsonl records
    fig_every: int = 1000         # steps between reconstruction figures (one more at the end)
    ckpt_every: int = 500         # steps between checkpoints (one more at the end)


PRESETS = {  # `python cmae.py` on a CPU: view geometry x 64/224 (256 -> 72, 31 -> 7), 2x2 blocks
    "toy": dict(model="vit_tiny", patch_size=8, img_size=64, crop_size=72, shift=7, decoder_depth=2,
                decoder_dim=128, decoder_heads=4, feat_decoder_depth=1, feat_decoder_dim=128,
                feat_decoder_heads=4, proj_hidden=512, proj_dim=128, batch_size=32, epochs=40,
                warmup_epochs=4, blr=5e-3, workers=2, log_every=5, fig_every=100, ckpt_every=25,
                eval=True),
}

VIT = {  # width / depth / heads: timm's sizes; encoder parameters at 224 px, patch 16
    "vit_tiny": dict(dim=192, depth=12, heads=3),     # 5.5M
    "vit_small": dict(dim=384, depth=12, heads=6),    # 21.7M
    "vit_base": dict(dim=768, depth=12, heads=12),    # 85.8M
    "vit_large": dict(dim=1024, depth=24, heads=16),  # 303M
}


# -----------------------------------------------------------------------------
# ViT (MAE / timm names: the encoder loads as a plain ViT in propagate.py, evaluate.py, timm)
# Shapes: B batch, N patches per image, Nv visible, D width, H heads, Dh = D / H, P = p·p·3 pixels
# per patch, G mask blocks per image, E projection width, W world size (DDP processes).

def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D sin-cos table (1 + grid², dim), cls row 0. Patch (x column, y row) gets
    [sin xω, cos xω, sin yω, cos yω], ω_k = 10000^(−4k/dim), k < dim/4; float64 as MAE. (The
    official mmselfsup table swaps x and y: immaterial for a fixed table trained from scratch.)"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)
    y, x = torch.meshgrid(pos, pos, indexing="ij")  # (grid, grid) each, row-major as the patches
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
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, N) x (B, H, N, Dh) -> (B, H, N, Dh)
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
    """The encoder: embed() makes patch tokens, the masking picks some, encode() runs the blocks."""

    def __init__(self, img_size, patch_size, dim, depth, heads):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = sincos_pos_embed(dim, self.grid)[None]  # (1, 1 + N, D)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # fixed, as MAE's
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def embed(self, imgs):
        """(B, 3, S, S) -> (B, N, D) patch tokens + position (before masking, as MAE), no cls."""
        S = self.grid * self.patch_size
        assert imgs.shape[-2:] == (S, S), f"expected {S}px input, got {tuple(imgs.shape[-2:])}"
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        return x + self.pos_embed[:, 1:]

    def encode(self, x, final_norm=True):
        """(B, Nv, D) -> (B, 1 + Nv, D): cls (with its zero position) prepended, blocks, final LN.
        final_norm=False: the target branch skips the last LN (official final_norm=False)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if final_norm else x


def init_weights(m):
    """MAE init: xavier_uniform Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_vit(vit):
    """MAE / official CMAEViT init: init_weights, the patch conv xavier on its (out, in·p·p) view,
    cls N(0, 0.02)."""
    vit.apply(init_weights)
    w = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(vit.cls_token, std=0.02)
    return vit


# -----------------------------------------------------------------------------
# Masking (MAE models_mae.py random_masking, by blocks: official cmae/models/backbones/cmae_vit.py)

def block_masking(noise, ratio, grid, block):
    """Hide whole block x block squares of patches. noise (B, G) uniform, G = (grid / block)²;
    the int(G·(1 − ratio)) blocks of SMALLEST noise stay visible (MAE's rule, per block): at
    224/16, 2x2 blocks, ratio 0.65: 17 of 49 blocks = 68 of 196 patches (official). block 1: MAE's
    masking. Returns as MAE's random_masking: ids_keep (B, Nv) visible patches in raster order,
    ids_restore (B, N) un-shuffles [visible, hidden] to patch order, mask (B, N) 1 = hidden."""
    B, G = noise.shape
    g = grid // block  # blocks per side
    len_keep = int(G * (1 - ratio))
    keep_blocks = torch.argsort(noise, dim=1)[:, :len_keep]  # (B, Gk) ids of the visible blocks
    visible = torch.zeros(B, G, device=noise.device).scatter_(1, keep_blocks, 1.0)  # (B, G) 1: seen
    visible = visible.view(B, g, 1, g, 1).expand(B, g, block, g, block)  # a block -> its patches
    visible = visible.reshape(B, grid * grid)  # (B, N) in patch raster order
    ids_shuffle = torch.argsort(1 - visible, dim=1, stable=True)  # visible first; raster order kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :len_keep * block * block], ids_restore, 1 - visible


def gather_tokens(x, ids):
    """x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def patchify(imgs, p):
    """(B, 3, H, W) -> (B, h·w, p·p·3): patches row-major, each as (pixel row, col, channel)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)  # (B, 3, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, 3)
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, P)


def unpatchify(x, p, h, w):
    """Inverse of patchify: (B, h·w, p·p·3) -> (B, 3, h·p, w·p)."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, h, p, w, p)
    return x.reshape(B, 3, h * p, w * p)


# -----------------------------------------------------------------------------
# Model: online encoder, pixel and feature decoders, projector, predictor; EMA target encoder and
# projector (paper Fig. 2; official cmae/models/algorithms/cmae.py)

class Decoder(nn.Module):
    """MAE's decoder (official MAEPretrainDecoder, cmae/models/necks/mae_neck.py, both decoders):
    Linear(D -> Dd) on the encoder's tokens, a learned mask token per hidden patch, un-shuffle,
    fixed sin-cos position, blocks, LN, Linear(Dd -> out). (B, 1 + Nv, D) -> (B, N, out)."""

    def __init__(self, enc_dim, dim, depth, heads, out_dim, grid):
        super().__init__()
        self.decoder_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = sincos_pos_embed(dim, grid)[None]  # (1, 1 + N, Dd)
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, out_dim)

    def forward(self, h, ids_restore):
        y = self.decoder_embed(h)  # (B, 1 + Nv, Dd)
        B, N, Nv = y.shape[0], ids_restore.shape[1], y.shape[1] - 1
        y_ = torch.cat([y[:, 1:], self.mask_token.expand(B, N - Nv, -1)], dim=1)  # (B, N, Dd)
        y = torch.cat([y[:, :1], gather_tokens(y_, ids_restore)], dim=1)  # (B, 1 + N, Dd) in order
        y = y + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]  # (B, N, out), cls dropped


class AllReduceSum(torch.autograd.Function):
    """Σ over the DDP ranks, differentiable: every rank's output feeds every rank's loss, so the
    backward sums the incoming gradients over the ranks too (what torch.distributed.nn's all_reduce
    does; torch 2.14 deprecates that one)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the GLOBAL batch (all DDP ranks), as the official
    SyncBatchNorm. Not nn.SyncBatchNorm: that one needs a GPU, and DDP on CPU (gloo) must give the
    numbers of one process. Training: μ = Σx / n, σ² = Σ(x − μ)² / n over all n = W·B rows (two
    passes through AllReduceSum, so the backward sums the statistics' gradients over the ranks, as
    SyncBN's does); y = γ(x − μ)/√(σ² + ε) + β. Eval: the running statistics. Same parameters and
    buffers as nn.BatchNorm1d."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = x.float()  # statistics in fp32, also under bf16 autocast
        world = dist.get_world_size() if dist.is_initialized() else 1
        n = x.shape[0] * world  # every rank has the same batch size (EpochSampler)
        total = AllReduceSum.apply if world > 1 else (lambda t: t)  # Σ over the ranks
        mean = total(x.sum(0)) / n  # (C,)
        var = total(((x - mean) ** 2).sum(0)) / n  # (C,) biased, as BatchNorm normalizes
        with torch.no_grad():  # running statistics as nn.BatchNorm1d's (unbiased variance)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * n / max(n - 1, 1))
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class Head(nn.Module):
    """Projector / predictor (official NonLinearNeck, cmae/models/necks/nonlinear_neck.py, 2 layers,
    with_last_bn=False): Linear(in, hidden) - BN(eps 1e-6) - ReLU - Linear(hidden, out, no bias),
    PyTorch's default Linear init, BN γ = 1, β = 0, as the official neck."""

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
        v, p = VIT[cfg.model], cfg.patch_size
        self.cfg, self.grid = cfg, cfg.img_size // p
        self.encoder = init_vit(ViT(cfg.img_size, p, v["dim"], v["depth"], v["heads"]))
        self.pixel_decoder = Decoder(v["dim"], cfg.decoder_dim, cfg.decoder_depth,
                                     cfg.decoder_heads, p * p * 3, self.grid)
        # official: the feature decoder predicts p²·3 = 768 values, ViT-B's width; what it must
        # match is the encoder width D: the SAME projector (as EMA) takes the target's D features
        self.feature_decoder = Decoder(v["dim"], cfg.feat_decoder_dim, cfg.feat_decoder_depth,
                                       cfg.feat_decoder_heads, v["dim"], self.grid)
        for dec in (self.pixel_decoder, self.feature_decoder):
            dec.apply(init_weights)
            nn.init.normal_(dec.mask_token, std=0.02)
        self.projector = Head(v["dim"], cfg.proj_hidden, cfg.proj_dim)
        self.predictor = Head(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        # target branch: an exact copy (official init_weights), then the EMA; never trained by SGD
        self.target_encoder = ViT(cfg.img_size, p, v["dim"], v["depth"], v["heads"])
        self.target_projector = Head(v["dim"], cfg.proj_hidden, cfg.proj_dim)
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_projector.load_state_dict(self.projector.state_dict())
        for t in self.target_parameters():
            t.requires_grad = False

    def target_parameters(self):
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    def online_parameters(self):
        """The online twins of target_parameters(), in the same order: the EMA pairs them up."""
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def forward(self, online, target, noise):
        """online (B, 3, S, S): the unshifted view; target: the shifted, colour-augmented one; both
        normalized. noise (B, G) U[0, 1) for the block mask. Returns what the losses compare:
        pred (B, N, P) the pixels of every patch, mask (B, N), q (B, E) the online prediction,
        k (B, E) the target projection."""
        # online branch (paper Fig. 2, top): the encoder sees the visible blocks; 2 decoders fill in
        x = self.encoder.embed(online)  # (B, N, D)
        ids_keep, ids_restore, mask = block_masking(noise, self.cfg.mask, self.grid,
                                                    self.cfg.mask_block)
        h = self.encoder.encode(gather_tokens(x, ids_keep))  # (B, 1 + Nv, D)
        pred = self.pixel_decoder(h, ids_restore)  # (B, N, P)
        feat = self.feature_decoder(h, ids_restore).mean(dim=1)  # (B, D): mean of ALL N (official)
        q = self.predictor(self.projector(feat))  # (B, E)
        return pred, mask, q, self.target_embedding(target)

    @torch.no_grad()
    def target_embedding(self, imgs):
        """Target branch (Fig. 2, bottom), with no graph: the EMA encoder on the FULL image without
        its final LN, the mean of its patch tokens (official target_cls=True: cls left out), the EMA
        projector. (B, 3, S, S) -> (B, E)."""
        x = self.target_encoder.embed(imgs)  # (B, N, D)
        h = self.target_encoder.encode(x, final_norm=False)  # (B, 1 + N, D)
        return self.target_projector(h[:, 1:].mean(dim=1))  # (B, D) -> (B, E)


@torch.no_grad()
def ema_update(target, online, m):
    """θ_target ← m·θ_target + (1 − m)·θ_online for each parameter pair (DINO main_dino.py's update). Buffers
    (BatchNorm running statistics) are not averaged: each network keeps its own, as the official code."""
    for t, o in zip(target, online):
        t.mul_(m).add_((1 - m) * o.detach())


# -----------------------------------------------------------------------------
# Loss (paper §3: the reconstruction loss, the contrastive loss and their weighted sum; official
# cmae/models/heads/cmae_head.py, CMAEPretrainHead.forward, computes all three)

def norm_pix_loss(pred, target, mask):
    """Reconstruction loss L_r: MAE's normalized-pixel MSE on the hidden patches only,
    L_r = Σ_bn m_bn · mean_P (ŷ_bn − (y_bn − μ_bn) / √(σ²_bn + 1e-6))² / Σ_bn m_bn.
    pred, target (B, N, P); mask (B, N), 1 = hidden; μ, σ² per patch, σ² UNBIASED (as MAE)."""
    mean = target.mean(dim=-1, keepdim=True)  # μ_bn
    var = target.var(dim=-1, keepdim=True)  # σ²_bn (unbiased)
    target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, N): MSE per patch
    return (loss * mask).sum() / mask.sum()  # hidden patches only, averaged over the whole batch


def info_nce(pred, target_all, rank, tau):
    """Contrastive loss L_c, InfoNCE in one direction (online prediction q -> target projection k):
    L_c = −(1/B) Σ_i log [exp(q_i·k_i⁺ / τ) / Σ_j exp(q_i·k_j / τ)], q, k L2-normalized.
    pred (B, E) this rank's predictions; target_all (W·B, E) all ranks' target projections,
    rank-major: row rank·B + i is image i's positive, the other W·B − 1 rows its negatives."""
    q = F.normalize(pred, dim=1)  # (B, E)
    k = F.normalize(target_all, dim=1)  # (W·B, E)
    logits = q @ k.T / tau  # (B, E) x (E, W·B) -> (B, W·B)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]  # row i's positive
    return F.cross_entropy(logits, labels)  # mean over this rank's B rows


def total_loss(loss_rc, loss_ct, cfg):
    """L = L_r + λ_c·L_c with λ_c = ct_weight·2τ (official: loss_ct = ct_weight * 2 * t * CE,
    ct_weight 1): the 2τ cancels the 1/τ of the logits in the gradient's scale."""
    return loss_rc + cfg.ct_weight * 2 * cfg.temperature * loss_ct


@torch.no_grad()
def gather_across_ranks(x):
    """(B, E) on every rank -> (W·B, E), rank-major, the same everywhere (official
    concat_all_gather, cmae/utils/gather.py). No gradient: these are the target branch's."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)  # (W·B, E)


def cmae_losses(online, pred, mask, q, k, cfg):
    """(L, L_r, L_c) of one batch from the model's outputs, in fp32. online (B, 3, S, S) is what L_r
    reconstructs; every rank's k are the negatives of L_c."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    loss_rc = norm_pix_loss(pred.float(), patchify(online, cfg.patch_size).float(), mask)
    loss_ct = info_nce(q.float(), gather_across_ranks(k.float()), rank, cfg.temperature)
    return total_loss(loss_rc, loss_ct, cfg), loss_rc, loss_ct


# -----------------------------------------------------------------------------
# Data: an ImageFolder tree (ImageNet layout). DataLoader workers decode the images, which travel as
# uint8 and are normalized on the device. All randomness of a sample (crop, flip, shift, colour,
# mask) is seeded by (seed, epoch, image index): no worker count, rank count or resume changes it.

IMG_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet (MAE; official: the same x 255)


def list_images(folder):
    """[(path, class index)] of an ImageFolder split such as <--data>/train, in torchvision
    ImageFolder's order, and the class names. A folder that cannot be one is a one-line error that
    names the fix."""
    root, split = os.path.split(os.path.normpath(folder))
    if not os.path.isdir(folder):
        gone = f" ({root} does not exist)" if not os.path.isdir(root) else ""
        fail(f"--data {root} has no {split}/ folder{gone}; pass an ImageFolder root holding "
             f"{split}/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        fail(f"{folder} holds no images in class folders; put them in {folder}/<class>/<image> "
             f"(ImageFolder layout)")
    samples = []
    for i, c in enumerate(classes):
        walk = sorted(os.walk(os.path.join(folder, c), followlinks=True))
        found = [os.path.join(d, f) for d, _, files in walk for f in sorted(files)
                 if f.lower().endswith(IMG_EXTS)]
        if not found:
            fail(f"class folder {folder}/{c} holds no images ({' '.join(IMG_EXTS)}); add some or "
                 f"remove it")
        samples += [(p, i) for p in found]
    if not any(read_image(p) is not None for p, _ in samples):  # stops at the first readable image
        fail(f"none of the {len(samples)} images under {folder} can be read by PIL; replace them or "
             f"pass another --data")
    return samples, classes


def read_image(path):
    """The image decoded to RGB (PIL), or None when the file is unreadable, truncated or none."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError):  # what PIL raises on such files
        return None


def warn_unreadable(path, skipped):
    """One warning per unreadable image and process, counted (each DataLoader worker keeps its own
    `skipped` set); the caller takes the next image instead."""
    if path not in skipped:
        skipped.add(path)
        print(f"warning: skipped unreadable image {path} ({len(skipped)} so far in this process); "
              f"using the next one", flush=True)


def colour_augmentation(size):
    """The target view's (official CMAEDataset pipeline_aug): ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8,
    grayscale p 0.2, Gaussian blur σ in [0.1, 2] p 0.5 (kernel 10 % of the side, odd: BYOL's 23 px
    at 224). On uint8 tensors, from the global torch RNG, which the dataset seeds per sample."""
    blur = T.GaussianBlur(2 * round(0.05 * size) + 1, sigma=(0.1, 2.0))
    return T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                      T.RandomGrayscale(p=0.2), T.RandomApply([blur], p=0.5)])


def pixel_shift(big, size, shift):
    """Pixel shifting (paper §3; official ShiftPixel, cmae/datasets/pipelines/processing.py): of
    one big crop (3, C, C), online view = its top-left size x size corner, target view = that window
    moved by dh, dw ~ U{0 .. shift}. They overlap almost entirely: a plausible pair for the masked
    online view."""
    dh, dw = (int(v) for v in torch.randint(0, shift + 1, (2,)))
    return big[:, :size, :size], big[:, dh:dh + size, dw:dw + size], (dh, dw)


class ShiftedViews(torch.utils.data.Dataset):
    """(image index, epoch) -> online view, target view (3, S, S) uint8, mask noise (G,)."""

    def __init__(self, samples, cfg):
        self.samples, self.cfg, self.skipped = samples, cfg, set()
        self.colour = colour_augmentation(cfg.img_size)
        self.n_blocks = (cfg.img_size // cfg.patch_size // cfg.mask_block) ** 2

    def __len__(self):
        return len(self.samples)

    def views(self, idx):
        """Every stage of one sample, for the tests and --show-views: dict(big, online, shifted,
        target, shift, noise), or None if the image cannot be decoded. Runs in a seeded RNG fork."""
        img = read_image(self.samples[idx][0])
        if img is None:
            return None
        img = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        cfg, C = self.cfg, self.cfg.crop_size
        # ONE RandomResizedCrop (bicubic) + ONE flip shared by both views (official pipeline_base)
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(cfg.crop_scale), [3 / 4, 4 / 3])
        big = TF.resized_crop(img, i, j, h, w, [C, C], T.InterpolationMode.BICUBIC, antialias=True)
        big = big.flip(-1) if torch.rand(()) < 0.5 else big  # (3, C, C) uint8
        online, shifted, shift = pixel_shift(big, cfg.img_size, cfg.shift)
        target = self.colour(shifted)  # colour augmentation on the target view only
        noise = torch.rand(self.n_blocks)  # (G,) mask noise, one per block
        return dict(big=big, online=online, shifted=shifted, target=target, shift=shift,
                    noise=noise)

    def __getitem__(self, key):
        idx, epoch = key
        for attempt in range(len(self.samples)):  # an unreadable image: the next, with a warning
            j = (idx + attempt) % len(self.samples)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.cfg.seed, epoch, idx, attempt)) & 0xFFFF_FFFF)
                v = self.views(j)
            if v is not None:
                return v["online"], v["target"], v["noise"]
            warn_unreadable(self.samples[j][0], self.skipped)
        raise RuntimeError(f"none of the {len(self.samples)} images under --data can be read; check the files")


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's split (one seeded permutation per epoch, rank r takes every world-th
    index), able to start mid-epoch after a resume. Yields (image index, epoch) keys."""

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


def data_root(cfg):
    """The ImageFolder root: --data, or the toy images (toydata.py makes them once)."""
    if cfg.data:
        return cfg.data
    import toydata
    return os.path.join(toydata.ensure_toy_data(), "images")


def check_eval_data(cfg, root):
    """--eval: evaluate.py's checks of train/ and val/ now, before training, not after it."""
    if not cfg.eval:
        return
    if not os.path.isdir(os.path.join(root, "val")):
        fail(f"--eval needs labelled images in {root}/val/<class>/<image>; add some or --no-eval")
    import evaluate
    evaluate.labelled_splits(root)


def make_loader(cfg, rank, world, device, print0):
    """This rank's DataLoader of (online, target, noise) batches, and its EpochSampler."""
    root = data_root(cfg)
    samples, classes = list_images(os.path.join(root, "train"))
    sampler = EpochSampler(len(samples), cfg.batch_size, cfg.seed, rank, world)
    if sampler.batches == 0:
        fail(f"{len(samples)} images are fewer than one step needs ({world} x {cfg.batch_size}); "
             f"lower --batch-size")
    check_eval_data(cfg, root)
    loader = torch.utils.data.DataLoader(ShiftedViews(samples, cfg), cfg.batch_size,
                                         sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if cfg.workers else None,
                                         worker_init_fn=ignore_stop_signals)
    print0(f"data {root}/train: {len(samples)} images in {len(classes)} folders (labels unused), "
           f"{sampler.batches} steps per epoch of {world} x {cfg.batch_size} images")
    return loader, sampler


@functools.cache
def mean_std(device):
    """MEAN and STD as (3, 1, 1) tensors on the device, made once: a copy to the GPU at every step
    would wait for the GPU each time."""
    return tuple(torch.tensor(v, device=device).view(3, 1, 1) for v in (MEAN, STD))


def normalize(x, device):
    """uint8 (B, 3, S, S) -> normalized float on the device."""
    x = x.to(device, non_blocking=True).float().div_(255)
    mean, std = mean_std(device)
    return (x - mean) / std


# -----------------------------------------------------------------------------
# Schedule (MAE and official: per iteration, not per epoch)

def lr_at(step, total, warmup, peak, floor):
    """1) linear warm-up 0 -> peak over `warmup` steps (official LinearLR from 1e-4·peak, i.e. ~0);
    2) half-cycle cosine peak -> floor over the rest."""
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def momentum_at(step, total, base, end):
    """Official MomentumUpdateHook (cmae/core/hooks/momentum_update_hook.py):
    m = end − (end − base)·(cos(π·step/total) + 1)/2; base = end = 0.996: constant."""
    return end - (end - base) * (math.cos(math.pi * step / total) + 1) / 2


def param_groups(model, weight_decay):
    """Official paramwise_cfg: no weight decay on names containing 'ln' (its LayerNorms are ln*),
    'bias', 'pos_embed', 'mask_token' or 'cls_token'. Ours are named norm*, so LayerNorm is found
    by type. Everything else IS decayed, the projector / predictor BatchNorm weights (bn*) too."""
    exempt = ("bias", "pos_embed", "mask_token", "cls_token", "decoder_pos_embed")
    no_decay = {id(p) for mod in model.modules() for name, p in mod.named_parameters(recurse=False)
                if isinstance(mod, nn.LayerNorm) or name in exempt}
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if id(p) not in no_decay], weight_decay=weight_decay),
            dict(params=[p for p in params if id(p) in no_decay], weight_decay=0.0)]


# -----------------------------------------------------------------------------
# Checkpoint: one dict with everything to continue exactly. Written to a temp file, flushed to the disk and
# renamed; the one before stays as checkpoint.prev.pt, so a crash, a full disk or a damaged file at any moment
# leaves a good checkpoint to --resume from.

METHOD = "cmae"  # written into every checkpoint: --resume refuses one of another program
SOURCE_SHA = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:12]
ARCH_KEYS = ("model", "patch_size", "img_size", "decoder_depth", "decoder_dim", "decoder_heads",
             "feat_decoder_depth", "feat_decoder_dim", "feat_decoder_heads", "proj_hidden",
             "proj_dim")
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
    """model.state_dict() holds the online network (encoder., pixel_decoder., ...) AND the EMA branch
    (target_encoder., target_projector.): one dict restores both. A write that fails (full disk, no permission,
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

def evaluate_encoder(model, cfg, device, step):
    """evaluate.py's k-NN and few-shot top-1 of the online encoder, the one CMAE trains and
    fine-tunes, on --data's val/. In a forked RNG: the run's random stream stays."""
    import evaluate  # the project's one label-efficient protocol, shared by the three trainers
    desc, heads = f"cmae encoder {cfg.model}/{cfg.patch_size} step {step}", VIT[cfg.model]["heads"]
    with torch.random.fork_rng(devices=[]):
        return evaluate.evaluate_vit(model.encoder.state_dict(), cfg.img_size, data_root(cfg),
                                     device, desc, workers=cfg.workers, seed=cfg.seed, heads=heads)


def main(argv=None):
    cfg = parse_config(argv)
    device, ctx, dtype, rank, world, print0 = setup_device(cfg)
    if cfg.show_views:
        return show_views(cfg, list_images(os.path.join(data_root(cfg), "train"))[0])
    torch.manual_seed(cfg.seed)  # the same init on every rank; the data seeds masks, augmentation
    model = CMAE(cfg).to(device)
    n_enc = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_ema = sum(p.numel() for p in model.target_parameters())
    print0(f"CMAE {cfg.model}/{cfg.patch_size} encoder {n_enc / 1e6:.2f}M params | decoders, "
           f"projector, predictor {(n_all - n_enc) / 1e6:.2f}M | EMA target {n_ema / 1e6:.2f}M (no "
           f"gradient) | mask {cfg.mask} in {cfg.mask_block}x{cfg.mask_block} blocks")
    if cfg.bench:
        return bench(cfg, model, device, ctx, dtype)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    found = [p for p in (ckpt_path, previous(ckpt_path)) if os.path.exists(p)]
    if found and not cfg.resume:
        fail(f"{found[0]} exists; pass --resume to continue that run, or choose another --out")
    if cfg.resume and not found:
        fail(f"--resume but there is no checkpoint at {ckpt_path}; drop --resume or fix --out")
    loader, sampler = make_loader(cfg, rank, world, device, print0)  # checks --data before --out is made
    make_out_dir(cfg.out)

    # optimizer and schedules (official config)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=True)  # fused: faster
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    eff_batch = cfg.batch_size * cfg.accum * world
    peak_lr = cfg.lr or cfg.blr * eff_batch / 256
    steps_per_epoch = sampler.batches // cfg.accum
    if steps_per_epoch == 0:
        fail(f"--accum {cfg.accum} exceeds the {sampler.batches} batches of one epoch; lower it")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    n_decay, n_no_decay = (sum(p.numel() for p in g["params"]) for g in groups)
    print0(f"effective batch {eff_batch} images ({world} x {cfg.batch_size} x accum {cfg.accum}) | "
           f"base lr {cfg.blr:.2e} -> lr {peak_lr:.2e} | {total} steps, {warmup} warm-up | weight "
           f"decay on {n_decay / 1e6:.2f}M params, off on {n_no_decay / 1e3:.1f}K | "
           f"λ_c = {cfg.ct_weight * 2 * cfg.temperature:.3f}")
    step, resumed = load_checkpoint(ckpt_path, model, optimizer, scaler, cfg) if cfg.resume else (0, None)
    if cfg.resume:
        print0(f"resumed from {resumed} at step {step}")
    print0("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    raw_model = model
    evals = dict(before=None)  # --eval: evaluate.py at step 0 and after the last step, in eval.json
    if cfg.eval and world > 1:  # the other ranks would wait for rank 0's evaluation in a collective
        print0("--eval under torchrun: evaluating after training only")
    if cfg.eval and world == 1 and step == 0:
        evals["before"] = evaluate_encoder(raw_model, cfg, device, step)
    if cfg.compile:
        model = torch.compile(model)
    if dist.is_initialized():  # under torchrun, also with one process (the 1-GPU test of NCCL DDP)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        print0(f"DDP: {world} process(es), {dist.get_backend()} all-reduce of the gradients")
    stop = stop_on_signals()  # Ctrl-C, SIGTERM, SIGUSR1: checkpoint at the next check step, exit 128 + signal

    interval, n_interval = torch.zeros(3, device=device), 0  # Σ (L, L_r, L_c) since the last log
    t_last, t_data, last_ckpt = time.perf_counter(), 0.0, "none yet"
    model.train()
    while step < total:
        sampler.epoch, first = divmod(step, steps_per_epoch)  # a resume continues mid-epoch
        sampler.start_batch = first * cfg.accum
        batches = iter(loader)
        for _ in range(min(steps_per_epoch - first, total - step)):
            # 1) schedules for this step
            lr = lr_at(step, total, warmup, peak_lr, cfg.min_lr)
            m = momentum_at(step, total, cfg.momentum, cfg.momentum_end)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # 2) forward / backward with accumulation; the loss terms stay on the device
            for micro in range(cfg.accum):
                t0 = time.perf_counter()
                online, target, noise = next(batches)
                online, target = normalize(online, device), normalize(target, device)
                noise = noise.to(device, non_blocking=True)
                t_data += time.perf_counter() - t0
                sync_grads = micro == cfg.accum - 1 or world == 1
                with (nullcontext() if sync_grads else model.no_sync()), ctx:
                    pred, mask, q, k = model(online, target, noise)
                    loss, loss_rc, loss_ct = cmae_losses(online, pred, mask, q, k, cfg)
                scaler.scale(loss / cfg.accum).backward()
                interval += torch.stack([loss, loss_rc, loss_ct]).detach().float() / cfg.accum
            # 3) optimizer step, then 4) the EMA of the target branch (official: every iteration)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema_update(raw_model.target_parameters(), raw_model.online_parameters(), m)
            step, n_interval = step + 1, n_interval + 1
            # 5) check steps only (one host sync): NaN guard, log, checkpoint, stop on a signal
            logs = step % cfg.log_every == 0 or step == total
            saves = step % cfg.ckpt_every == 0 or step == total
            if logs or saves or (world == 1 and stop["requested"]):
                got = [stop["requested"] == s for s in STOP_SIGNALS]  # one-hot: the signal this rank received
                sums = sum_over_ranks([*interval, *got], device, world)  # 3 + 3 floats
                sums, sig = sums[:-len(got)], stop_signal(sums[-len(got):])  # every rank: the same signal, step
                loss_val, rc, ct = (s / (world * n_interval) for s in sums)  # mean of steps, ranks
                if not math.isfinite(loss_val):
                    print0(f"error: loss is {loss_val} at step {step}; lower --blr or use --dtype "
                           f"fp32 (last good checkpoint: {last_ckpt})", file=sys.stderr)
                    raise SystemExit(1)
                if logs:
                    dt = time.perf_counter() - t_last
                    ms, rate = 1e3 * dt / n_interval, n_interval * eff_batch / dt
                    print0(f"step {step:06d}/{total} ({100 * step / total:.1f}%) | loss "
                           f"{loss_val:.4f} (rc {rc:.4f}, ct {ct:.4f}) | lr {lr:.2e} | m {m:.4f} | "
                           f"{ms:.0f} ms/step (data {100 * t_data / dt:.0f}%) | {rate:.1f} img/s | "
                           f"eta {(total - step) * ms / 3.6e6:.2f}h", flush=True)
                    record = dict(step=step, epoch=step / steps_per_epoch, loss=loss_val,
                                  loss_rc=rc, loss_ct=ct, lr=lr, momentum=m, ms_per_step=ms,
                                  img_per_s=rate)
                    if rank == 0:
                        write_or_warn(append_line, os.path.join(cfg.out, "log.jsonl"), json.dumps(record))
                    t_last, t_data, n_interval = time.perf_counter(), 0.0, 0
                    interval.zero_()
                if saves or sig:
                    if not torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all():
                        print0(f"error: non-finite parameters at step {step}; lower --blr or use "
                               f"--dtype fp32 (last good checkpoint: {last_ckpt})", file=sys.stderr)
                        raise SystemExit(1)
                    failed = rank == 0 and not save_checkpoint(ckpt_path, raw_model, optimizer, scaler, step, cfg)
                    if world > 1:  # every rank learns whether rank 0 could write, and all stop together
                        failed = sum_over_ranks([failed], device, world)[0] > 0
                    if failed:
                        raise SystemExit(1)
                    last_ckpt = f"{ckpt_path} at step {step}"
                if sig:
                    stop_all(sig, step, world, print0)
            if rank == 0 and (step % cfg.fig_every == 0 or step == total):
                path = os.path.join(cfg.out, f"recon_{step:06d}.png")
                write_or_warn(reconstruction_figure, path, online, target, pred, mask, cfg.patch_size)
    print0(f"done: {step} steps; checkpoint {ckpt_path}")
    if cfg.eval and rank == 0:
        evals["after"] = evaluate_encoder(raw_model, cfg, device, step)
        write_or_warn(atomic_write_text, os.path.join(cfg.out, "eval.json"), json.dumps(evals, indent=1))
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
    """Every bad flag value as one line naming the fix, before anything runs."""
    grid = cfg.img_size // cfg.patch_size
    if cfg.model not in VIT:
        fail(f"unknown --model {cfg.model}; choose from {', '.join(VIT)}")
    if cfg.img_size % cfg.patch_size:
        fail(f"--img-size {cfg.img_size} is not divisible by --patch-size {cfg.patch_size}; "
             f"use e.g. --img-size {grid * cfg.patch_size}")
    if cfg.mask_block < 1 or grid % cfg.mask_block:
        fail(f"--mask-block {cfg.mask_block} must divide the {grid}x{grid} patch grid; use 1 or a "
             f"divisor of {grid}")
    if not 0 <= cfg.mask < 1 or int((grid // cfg.mask_block) ** 2 * (1 - cfg.mask)) < 1:
        fail(f"--mask {cfg.mask} must be in [0, 1) and leave at least one visible block")
    if cfg.shift < 0 or cfg.img_size + cfg.shift >= cfg.crop_size + 1:
        fail(f"--crop-size {cfg.crop_size} too small for --img-size {cfg.img_size} + --shift "
             f"{cfg.shift}; need crop >= img + shift (official: 224 + 31 < 256)")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        fail(f"--crop-scale {cfg.crop_scale[0]} {cfg.crop_scale[1]}: need 0 < min <= max <= 1")
    for name in ("decoder", "feat-decoder"):
        dim, heads = (getattr(cfg, f"{name.replace('-', '_')}_{k}") for k in ("dim", "heads"))
        if dim % heads:
            fail(f"--{name}-dim {dim} is not divisible by --{name}-heads {heads}")
    if cfg.temperature <= 0 or not 0 <= cfg.momentum <= 1 or not 0 <= cfg.momentum_end <= 1:
        fail("--temperature must be > 0 and --momentum, --momentum-end in [0, 1]")
    if cfg.batch_size < 2:
        fail(f"--batch-size {cfg.batch_size}: InfoNCE and BatchNorm need at least 2 images per GPU")
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        fail(f"--dtype {cfg.dtype}: choose auto, bf16, fp16 or fp32")
    if cfg.device not in ("auto", "cuda", "cpu"):
        fail(f"--device {cfg.device}: choose auto, cuda or cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")


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


def write_grid(path, grid):
    """grid (rows, cols, 3, S, S) uint8 -> one PNG, written atomically."""
    b, c, _, S, _ = grid.shape
    img = grid.permute(0, 3, 1, 4, 2).reshape(b * S, c * S, 3).numpy()  # (rows·S, cols·S, 3)
    if not cv2.imwrite(path + ".tmp.png", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR)):
        with suppress(OSError):
            os.remove(path + ".tmp.png")
        raise OSError(f"cv2.imwrite failed on {path}.tmp.png")
    os.replace(path + ".tmp.png", path)


@torch.no_grad()
def reconstruction_figure(path, online, target, pred, mask, p, rows=4):
    """Columns: online view | its visible blocks | reconstruction (visible patches pasted back) |
    target view. online, target (B, 3, S, S) normalized; pred (B, N, P) in normalized-pixel units,
    de-normalized with the true patch statistics for display (as MAE's demo)."""
    online, pred, mask = online[:rows].float().cpu(), pred[:rows].float().cpu(), mask[:rows].cpu()
    g = online.shape[-1] // p
    x = patchify(online, p)  # (b, N, P)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    m = mask[..., None]  # (b, N, 1)
    masked = unpatchify(x * (1 - m), p, g, g)
    recon = unpatchify((pred * (var + 1e-6) ** 0.5 + mean) * m + x * (1 - m), p, g, g)
    grid = torch.stack([online, masked, recon, target[:rows].float().cpu()], 1)  # (b, 4, 3, S, S)
    std, mu = torch.tensor(STD).view(3, 1, 1), torch.tensor(MEAN).view(3, 1, 1)
    write_grid(path, (grid * std + mu).clamp(0, 1).mul(255).byte())


def show_views(cfg, samples, rows=6):
    """<out>/views.png: the crop with the online (green) and target (red) windows | online view |
    shifted view before colour | target view. Pixel shifting keeps the two views almost aligned."""
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
        views = [F.pad(v[k], (0, C - S, 0, C - S)) for k in ("online", "shifted", "target")]
        tiles.append(torch.stack([torch.from_numpy(big).permute(2, 0, 1), *views]))
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "views.png")
    write_grid(path, torch.stack(tiles))
    print(f"wrote {path}: crop {C}px, online (green) and target (red) windows | online | shifted | "
          f"target")


def synthetic_batch(cfg, batch, device):
    """online, target (batch, 3, S, S) normal noise; mask noise (batch, G) uniform."""
    S, G = cfg.img_size, (cfg.img_size // cfg.patch_size // cfg.mask_block) ** 2
    return (torch.randn(batch, 3, S, S, device=device), torch.randn(batch, 3, S, S, device=device),
            torch.rand(batch, G, device=device))


def bench_loss(model, cfg, online, target, noise):
    return cmae_losses(online, *model(online, target, noise), cfg)[0]


def train_flops(model, cfg, device, batch):
    """FLOPs of forward (online + target) + backward of one step of `batch` images, counted once by
    FlopCounterMode on 2 images (attention through the math kernel so that its matmuls count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fc:
            bench_loss(model, cfg, *synthetic_batch(cfg, 2, device)).backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(bn, strict=False)  # counting must not move the BN running statistics
    return fc.get_total_flops() / 2 * batch


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


def bench(cfg, model, device, ctx, dtype, steps=5):
    """Times whole training steps on random input as main() runs them (autocast, the fp16 scaler,
    fused AdamW, EMA; compiled with --compile): one line with the FLOP rate against this device's
    matmul rate in the step's precision. The first two steps (and any compiling) only warm up."""
    groups = param_groups(model, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    batch = synthetic_batch(cfg, cfg.batch_size, device)
    flops = train_flops(model, cfg, device, cfg.batch_size)
    step_model = torch.compile(model) if cfg.compile else model
    times = []
    for _ in range(steps + 2):
        sync(device)
        t = time.perf_counter()
        with ctx:
            loss = bench_loss(step_model, cfg, *batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema_update(model.target_parameters(), model.online_parameters(), cfg.momentum)
        sync(device)
        times.append(time.perf_counter() - t)
    dt, (peak, n), B = statistics.median(times[2:]), matmul_rate(device, dtype), cfg.batch_size
    print(f"bench | {cfg.model}/{cfg.patch_size} {cfg.img_size}px | pixel decoder "
          f"{cfg.decoder_depth}x{cfg.decoder_dim}x{cfg.decoder_heads}, feature decoder "
          f"{cfg.feat_decoder_depth}x{cfg.feat_decoder_dim}x{cfg.feat_decoder_heads} | mask "
          f"{cfg.mask} block {cfg.mask_block} | {dtype}, {'compiled' if cfg.compile else 'eager'} | "
          f"batch {B} | {dt * 1e3:.1f} ms/step (median of {steps}) | {B / dt:.1f} img/s | "
          f"{flop_rate(flops / dt)} = {100 * flops / dt / peak:.0f}% of {dtype} matmul "
          f"{flop_rate(peak)} (median {n}^3 on {device.type}) | {flops / 1e9:.1f} GFLOP/step",
          flush=True)


if __name__ == "__main__":
    main()
