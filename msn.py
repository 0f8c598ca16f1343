"""
MSN: Masked Siamese Networks, in one file.
Assran, Caron, Misra, Bojanowski, Bordes, Vincent, Joulin, Rabbat, Ballas. "Masked Siamese Networks
for Label-Efficient Learning", ECCV 2022, arXiv:2204.07141. Official code: facebookresearch/msn.

Each image gives one target view (224 px, whole) and several anchor views: one 224-px view with 15 %
of its patches dropped, and 10 small "focal" crops (96 px). The anchors go through the ViT being
trained, the target through an exponential moving average (EMA) of it. Both embeddings are compared
with 1024 learned prototypes (cosine similarity, softmax): each anchor's soft assignment must match
its image's sharpened target assignment, while the mean assignment over the batch stays spread out
(ME-MAX). No pixels are reconstructed: the masked view is "denoised" in representation space.

    python msn.py                          # toy demo, 2-core CPU (~1.5 min): k-NN before / after
    python msn.py --data imagenet/         # one GPU (or CPU), official ViT-S/16 defaults
    torchrun --nproc_per_node=8 msn.py --data imagenet/ --batch-size 128   # 1024 images per step
    python msn.py --data imagenet/ --eval  # + evaluate.py's k-NN and few-shot, before and after
    python evaluate.py --ckpt out/msn/checkpoint.pt   # the label-efficient evaluation, any time
    python msn.py --bench --batch-size 8   # throughput of a ViT-S/16 training step, no data needed

Measured on 2 idle CPU cores (no GPU), 2026-11-23: one ViT-S/16 multi-crop step (batch 8) 3.83 s =
169 GFLOP/s = 88 % of the fp32 matmul rate. Commands and more in README.md "Results".

Sections: Config | ViT | Masking | Model | Loss | Data | Schedule | Checkpoint | Train loop (main) |
Plumbing. "Official" is facebookresearch/msn at its release; where the paper text and that code
differ, this file follows the code and says so.
"""
import argparse
import copy
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
from collections import OrderedDict
from contextlib import nullcontext, suppress

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP


# -----------------------------------------------------------------------------
# Config (official configs/pretrain/msn_vits16.yaml; the toy preset is what `python msn.py` runs)
# Every field is a flag (--focal-views for focal_views); its comment is the flag's --help.

@dataclasses.dataclass
class Config:
    data: str = ""               # ImageFolder root: train/ (and val/ for --eval); empty = the toy
                                 # images and the toy preset
    out: str = "out/msn"         # checkpoint.pt, log.jsonl and eval.json go here
    preset: str = ""             # "toy": small, fast settings for a CPU demo (before your flags)
    # model (official: deit_small = ViT-S/16, head 2048-2048-256 with BatchNorm, no predictor)
    model: str = "vit_small"     # vit_micro | vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 16         # ViT patch side in pixels
    img_size: int = 224          # side of the target and masked-anchor crops (official rand_size)
    focal_size: int = 96         # focal crop side; the pos-embed is resized to its grid (14² -> 6²)
    focal_views: int = 10        # focal anchors per image (official 10); 0 = the masked one only
    patch_drop: float = -1.0     # fraction of the masked anchor's patches dropped; < 0 = --model's
                                 # official value (PATCH_DROP)
    hidden_dim: int = 2048       # head Linear(D,h)-BN-GELU-Linear(h,h)-BN-GELU-Linear(h,E)
    output_dim: int = 256        # E: the head's output width = the prototypes' width
    num_proto: int = 1024        # K learned prototypes, shared by anchors and targets
    tau: float = 0.1             # temperature of the softmax over cosine similarities to prototypes
    sharpen: float = 0.25        # target sharpening temperature T (official start = final = 0.25)
    sinkhorn: bool = True        # Sinkhorn-Knopp balancing (3 iterations) of the targets (official)
    memax_weight: float = 1.0    # λ of the mean-entropy-maximisation (ME-MAX) regulariser
    ent_weight: float = 0.0      # weight of the per-sample entropy term (official: computed, 0)
    # views (official make_transforms; colour strength 0.5 -> jitter 0.4, 0.4, 0.4, 0.1)
    crop_scale: tuple = (0.3, 1.0)     # RandomResizedCrop scale of the target and masked anchor
    focal_scale: tuple = (0.05, 0.3)   # RandomResizedCrop scale of the focal views
    color_jitter: float = 0.5          # strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p 0.8
    # optimisation (official init_opt: AdamW, lr NOT batch-scaled; the schedules span 1.25x the run)
    batch_size: int = 64         # images per GPU per step (official 16 GPUs x 64; fewer: --accum)
    epochs: int = 800            # passes over train/ (official ViT-S/16)
    max_steps: int = 0           # if > 0: this many optimizer steps instead; schedules span them
    lr: float = 1e-3             # peak lr after warm-up (official, the same at any batch size)
    start_lr: float = 2e-4       # warm-up starts here (official)
    final_lr: float = 1e-6       # the cosine heads here (not reached: the 1.25x horizon)
    warmup_epochs: float = 15    # linear lr warm-up (official)
    weight_decay: float = 0.04   # cosine INCREASE to --final-weight-decay (official); none on
                                 # biases, norms and prototypes
    final_weight_decay: float = 0.4  # where the weight-decay cosine heads (official)
    momentum: float = 0.996      # EMA momentum of the target network, linear to --final-momentum
    final_momentum: float = 1.0  # where the momentum ramp heads (official)
    horizon: float = 1.25        # official: the schedules are laid out over 1.25x the run's steps
    clip_grad: float = 3.0       # max grad norm of encoder + head (official; not the prototypes)
    accum: int = 1               # gradient accumulation micro-steps per optimizer step
    eval: bool = False           # evaluate.py's k-NN and few-shot on --data's val/, before and
                                 # after training (under torchrun: after only); the toy preset: on
    # machine
    workers: int = 8             # DataLoader processes per GPU (12 augmented views an image)
    device: str = "auto"         # auto | cuda | cpu
    dtype: str = "auto"          # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False        # torch.compile the model (CUDA: faster after a minute)
    seed: int = 0                # seed of the initial weights, the data order and every view
    resume: bool = False         # continue from <out>/checkpoint.pt
    bench: bool = False          # time a few training steps on synthetic input and exit
    log_every: int = 20          # steps between log lines (and log.jsonl records)
    ckpt_every: int = 500        # steps between checkpoints (one more at the end)


PRESETS = {  # `python msn.py`: a demo on a 2-core CPU (toy scenes, ~1.5 min), k-NN before / after
    # momentum 0.9 (-> 1): MSN evaluates the EMA target, and at the official 0.996 it averages over
    # ~1/(1 - m) = 250 steps, twice this 120-step run, so it would end near its initialisation
    # (measured: k-NN 78 -> 75 with 0.996, 78 -> 96 with 0.9). 0.996 fits the official ~1M steps.
    "toy": dict(model="vit_tiny", patch_size=16, img_size=64, focal_size=32, focal_views=4,
                hidden_dim=512, output_dim=128, num_proto=64, batch_size=30, epochs=20,
                warmup_epochs=2, momentum=0.9, workers=2, log_every=10, ckpt_every=100, eval=True),
}

VIT = {  # width / depth / heads: the timm / DeiT sizes; encoder params at 224 px, patch 16
    "vit_micro": dict(dim=64, depth=2, heads=2),      # 0.1M: tests and smoke runs, not a paper size
    "vit_tiny": dict(dim=192, depth=12, heads=3),     # 5.5M
    "vit_small": dict(dim=384, depth=12, heads=6),    # 21.7M
    "vit_base": dict(dim=768, depth=12, heads=12),    # 85.8M
    "vit_large": dict(dim=1024, depth=24, heads=16),  # 303M
}

# Masking ratio per model: ViT-S/16 0.15 is the released config; ViT-B/4 0.7 (config posted by the
# authors in facebookresearch/msn issue #5); ViT-B/16 and ViT-L/16 0.3 as we read the paper's
# appendix (uncertain, hence a flag); ViT-T/16 has no official value: ViT-S/16's.
PATCH_DROP = dict(vit_micro=0.15, vit_tiny=0.15, vit_small=0.15, vit_base=0.3, vit_large=0.3)


# -----------------------------------------------------------------------------
# ViT (official src/deit.py, with timm / DeiT parameter names, so it loads as a plain ViT elsewhere)
# Unlike MAE's, its position embedding is LEARNED (trunc-normal 0.02, not sin-cos), and resized
# bicubically for a view with another grid (the focal crops).
# Shapes: B batch, V focal views, M = 1 + V anchor views per image, N patches per view, Nv kept
#         patches, D width, H heads, Dh = D / H, E embedding (head output) width, K prototypes.

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
        x = F.scaled_dot_product_attention(q, k, v)  # QKᵀ (B, H, N, N), x (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(m):
    """Official init (src/deit.py, msn_train.init_model): trunc-normal(0.02) Linear weights, zero
    biases, LayerNorm 1 / 0. BatchNorm keeps torch's 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """The encoder: embed() makes patch tokens, encode() runs the blocks; tokens are dropped between
    the two. Official DeiT init: init_weights, trunc-normal(0.02) pos-embed and cls token, the
    patch-embed conv Kaiming-normal (fan-in)."""

    def __init__(self, img_size, patch_size, dim, depth, heads):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))  # cls slot first
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        nn.init.kaiming_normal_(self.patch_embed.proj.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.patch_embed.proj.bias)

    def patch_pos_embed(self, grid):
        """(1, grid², D) patch position embedding of a grid x grid view. Another grid than the
        training one gets the table resized bicubically (official interpolate_pos_encoding, whose
        scale_factor = grid / 14 equals size=(grid, grid) here: both are exact)."""
        pos = self.pos_embed[:, 1:]  # (1, N, D)
        if grid == self.grid:
            return pos
        D = pos.shape[-1]
        pos = pos.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid * grid, D)  # (1, grid², D), row-major

    def embed(self, imgs):
        """(B, 3, S, S) -> (B, N, D) patch tokens + position (added BEFORE dropping), no cls."""
        B, C, Himg, Wimg = imgs.shape
        p = self.patch_size
        assert Himg == Wimg and Himg % p == 0, f"need square inputs divisible by {p}: {Himg}x{Wimg}"
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        return x + self.patch_pos_embed(Himg // p)

    def encode(self, x):
        """(B, Nv, D) kept tokens -> (B, 1 + Nv, D): cls (+ position) first, blocks, final LN."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, imgs):
        """Plain ViT on whole images: (B, 3, S, S) -> (B, 1 + N, D)."""
        return self.encode(self.embed(imgs))


# -----------------------------------------------------------------------------
# Masking (paper, "Patchify and Mask"; official forward_features: token DROPPING, no mask tokens)

def num_kept(n_patches, ratio):
    """Tokens kept of N: floor(N·(1 − ratio)), as official (196 -> 166 at 0.15); cls is extra."""
    return int(math.floor(n_patches * (1 - ratio)))


def random_masking(noise, ratio):
    """Token dropping from uniform noise (B, N): each sample keeps its num_kept(N, ratio) tokens
    of SMALLEST noise (MAE's idiom) -> ids_keep (B, Nv), mask (B, N) float, 1 = dropped, 0 = kept.
    The official code draws ONE permutation for the local batch (torch.randperm); we draw one per
    sample from noise the data loader makes, so the result depends neither on the split over GPUs
    nor on the global RNG (exact resume). Per sample, the distribution is the same uniform one."""
    B, N = noise.shape
    len_keep = num_kept(N, ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
    mask = torch.ones(B, N, device=noise.device)
    mask.scatter_(1, ids_shuffle[:, :len_keep], 0.0)
    return ids_shuffle[:, :len_keep], mask


def gather_tokens(x, ids):
    """x (B, N, D), ids (B, Nv) -> (B, Nv, D)."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


# -----------------------------------------------------------------------------
# Model (official msn_train.py init_model and target_encoder)
# One module holds it all, so one state_dict does: encoder.*, head.*, prototypes, target_encoder.*,
# target_head.* (propagate.py and evaluate.py read target_encoder.* from MSN checkpoints).

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


def projection_head(dim, hidden, out):
    """Official init_model with use_bn (its `fc` Sequential, its names), on the final-LN'd cls."""
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(dim, hidden), bn1=GlobalBatchNorm1d(hidden), gelu1=nn.GELU(),
        fc2=nn.Linear(hidden, hidden), bn2=GlobalBatchNorm1d(hidden), gelu2=nn.GELU(),
        fc3=nn.Linear(hidden, out)))


class MSN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v = VIT[cfg.model]
        self.cfg = cfg
        self.encoder = ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"])
        self.head = projection_head(v["dim"], cfg.hidden_dim, cfg.output_dim)
        self.head.apply(init_weights)
        bound = cfg.output_dim ** -0.5  # official: U(±1/√E), learned, no weight decay, not EMA'd
        protos = torch.empty(cfg.num_proto, cfg.output_dim).uniform_(-bound, bound)  # (K, E)
        self.prototypes = nn.Parameter(protos)
        # the target network starts as an exact copy (official copy.deepcopy), then follows the EMA
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_head = copy.deepcopy(self.head)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def online_parameters(self):
        """What the EMA follows and grad clipping covers: encoder + head (official `encoder`)."""
        return list(self.encoder.parameters()) + list(self.head.parameters())

    def target_parameters(self):
        return list(self.target_encoder.parameters()) + list(self.target_head.parameters())

    def forward(self, target, anchor, focal, noise):
        """target, anchor (B, 3, S, S), the anchor's drop noise (B, N), focal (B, V, 3, s, s) ->
        anchor embeddings (M·B, E), view-major (every image's view 0, then view 1, ...), target
        embeddings (B, E). One encoder batch per resolution, as official, so the head's BatchNorm
        sees each as its own batch. The target network stays in train mode (batch statistics): the
        official target_encoder is never put in eval mode."""
        ids_keep, _ = random_masking(noise, self.cfg.patch_drop)
        x = gather_tokens(self.encoder.embed(anchor), ids_keep)  # (B, N, D) -> (B, Nv, D)
        z = [self.head(self.encoder.encode(x)[:, 0])]  # (B, E)
        if focal.shape[1]:
            f = focal.transpose(0, 1).flatten(0, 1)  # (B, V, 3, s, s) -> (V·B, 3, s, s), view-major
            z.append(self.head(self.encoder(f)[:, 0]))  # (V·B, E)
        with torch.no_grad():
            h = self.target_head(self.target_encoder(target)[:, 0])  # (B, E)
        return torch.cat(z), h  # (M·B, E), (B, E)


@torch.no_grad()
def ema_update(target, online, m):
    """θ_target ← m·θ_target + (1 − m)·θ_online for each parameter pair (DINO main_dino.py's update). Buffers
    (BatchNorm running statistics) are not averaged: each network keeps its own, as the official code."""
    for t, o in zip(target, online):
        t.mul_(m).add_((1 - m) * o.detach())


# -----------------------------------------------------------------------------
# Loss (paper, Method: "Similarity Metric and Predictions", the objective; official src/losses.py)
# p = softmax over the K prototypes of cosine similarity / τ. Each anchor's p must match the
# sharpened p⁺ of its image's target, while the mean anchor prediction p̄ stays spread (ME-MAX).

def predictions(z, prototypes, tau):
    """p = softmax(ẑ · q̂ᵀ / τ): the cosine similarity of the L2-normalized embedding ẑ to each
    L2-normalized prototype q̂ (BOTH normalized: official snn()). z (n, E), q (K, E) -> (n, K)."""
    return F.softmax(F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).T / tau, dim=-1)


def sharpen(p, T):
    """ρ(p)_k = p_k^(1/T) / Σ_j p_j^(1/T) (official sharpen): T = 1 is the identity, T < 1 peaks."""
    p = p ** (1.0 / T)
    return p / p.sum(dim=-1, keepdim=True)


@torch.no_grad()
def sinkhorn(Q, iters=3):
    """Sinkhorn-Knopp balancing of the targets (official distributed_sinkhorn, 3 iterations, on in
    the released config). Q (B, K) -> (B, K): rows still sum to 1, columns (prototypes) are pushed
    towards the uniform share B_total / K. Sums span all ranks."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    all_sum = (lambda x: dist.all_reduce(x) or x) if world > 1 else (lambda x: x)  # in place
    Q, B, K = Q.clone(), Q.shape[0] * world, Q.shape[1]
    Q /= all_sum(Q.sum())  # total mass 1
    for _ in range(iters):
        Q /= all_sum(Q.sum(dim=0, keepdim=True))  # (1, K): each prototype gets mass 1/K ...
        Q /= K
        Q /= Q.sum(dim=1, keepdim=True)  # (B, 1): ... then each sample mass 1/B
        Q /= B
    return Q * B  # rows sum to 1: an assignment per sample


def mean_prediction(probs):
    """p̄ = the mean anchor prediction over the batch and all ranks (official AllReduce: average
    forward, gradient passed through). AllReduceSum sums the gradient over the ranks; every rank
    computing the same ME-MAX term, that is the pass-through once DDP averages the gradients."""
    p_mean = probs.mean(dim=0)  # (K,)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        p_mean = AllReduceSum.apply(p_mean) / dist.get_world_size()
    return p_mean


def memax(p_mean):
    """ME-MAX: Σ_k p̄_k log p̄_k + log K = log K − H(p̄) >= 0; 0 for a uniform p̄, log K one-hot."""
    return torch.special.xlogy(p_mean, p_mean).sum() + math.log(p_mean.shape[-1])


def msn_loss(anchor_z, target_z, prototypes, tau=0.1, T=0.25, memax_weight=1.0, ent_weight=0.0,
             sinkhorn_iters=3):
    """The MSN objective (paper, Method):  (1/MB) Σ_i Σ_m H(ρ(p⁺_i), p_i,m) − λ H(p̄),  as the
    official code: + λ log K (a constant: the term is >= 0), Sinkhorn on the targets, and a
    per-sample entropy term (weight 0 in the released config). anchor_z (M·B, E) view-major,
    target_z (B, E), prototypes (K, E); the targets are computed under no_grad. -> (loss, stats):
    the detached ce, memax, ent_mean = H(p̄), and usage (K,): the targets' argmax counts."""
    M = anchor_z.shape[0] // target_z.shape[0]
    logits = F.normalize(anchor_z, dim=-1) @ F.normalize(prototypes, dim=-1).T / tau  # (M·B, K)
    log_p = F.log_softmax(logits, dim=-1)  # log p_i,m: the anchor predictions
    probs = log_p.exp()
    with torch.no_grad():
        targets = sharpen(predictions(target_z, prototypes.detach(), tau), T)  # ρ(p⁺_i): (B, K)
        if sinkhorn_iters:
            targets = sinkhorn(targets, sinkhorn_iters)
        usage = F.one_hot(targets.argmax(dim=-1), targets.shape[1]).sum(dim=0)  # (K,)
        targets = targets.repeat(M, 1)  # (M·B, K): row m·B + i is image i's, as the anchors
    ce = -(targets * log_p).sum(dim=-1).mean()  # (1/MB) Σ H(ρ(p⁺_i), p_i,m)
    p_mean = mean_prediction(probs)  # p̄ (K,)
    reg = memax(p_mean)  # log K − H(p̄)
    loss = ce + memax_weight * reg
    if ent_weight:  # + the mean per-sample entropy H(p_i,m) (official use_ent)
        loss = loss - ent_weight * (probs * log_p).sum(dim=-1).mean()
    ent_mean = math.log(p_mean.shape[0]) - reg.detach()
    return loss, dict(ce=ce.detach(), memax=reg.detach(), ent_mean=ent_mean, usage=usage)


# -----------------------------------------------------------------------------
# Data (official data_manager.make_transforms, with torchvision's transforms)
# All randomness of a sample (each view's crop, flip, colour, blur, the anchor's drop noise) comes
# from a seed made of (seed, epoch, image index): the same data at any worker or rank count, or
# after a resume.

IMG_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
BLUR_KERNEL = 13  # ±3σ at the largest σ = 2; the official code uses PIL's GaussianBlur(radius σ)


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


def read_image_or_next(samples, idx, skipped):
    """The image of samples[idx], or of the next readable sample."""
    for j in range(idx, idx + len(samples)):
        img = read_image(samples[j % len(samples)][0])
        if img is not None:
            return img
        warn_unreadable(samples[j % len(samples)][0], skipped)
    raise RuntimeError(f"none of the {len(samples)} images under --data can be read; check the files")


def view_transform(size, scale, s):
    """One random view (official make_transforms): RandomResizedCrop (bilinear, as official),
    h-flip, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p 0.8, grayscale p 0.2, Gaussian blur σ ∈ [0.1, 2]
    p 0.5. PIL in, uint8 (3, size, size) out; normalization happens on the device."""
    return T.Compose([T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                      T.RandomGrayscale(p=0.2),
                      T.RandomApply([T.GaussianBlur(BLUR_KERNEL, sigma=(0.1, 2.0))], p=0.5),
                      T.PILToTensor()])


class MultiViewImages(torch.utils.data.Dataset):
    """(image index, epoch) -> uint8 target (3, S, S), anchor (3, S, S), focal (V, 3, s, s) and the
    anchor's drop noise (N,). Target and masked anchor are two draws of one transform (official
    rand_views + 1 = 2 "rand" views, view 0 the target)."""

    def __init__(self, samples, cfg):
        self.samples, self.cfg, self.skipped = samples, cfg, set()
        self.rand = view_transform(cfg.img_size, cfg.crop_scale, cfg.color_jitter)
        self.focal = view_transform(cfg.focal_size, cfg.focal_scale, cfg.color_jitter)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        idx, epoch = key
        img, c = read_image_or_next(self.samples, idx, self.skipped), self.cfg  # PIL RGB
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global RNG
            torch.manual_seed(hash((c.seed, epoch, idx)) & 0xFFFF_FFFF)
            target, anchor = self.rand(img), self.rand(img)
            s = c.focal_size
            focal = torch.stack([self.focal(img) for _ in range(c.focal_views)]) if c.focal_views \
                else torch.zeros(0, 3, s, s, dtype=torch.uint8)
            noise = torch.rand((c.img_size // c.patch_size) ** 2)
        return target, anchor, focal, noise


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's split (one seeded permutation per epoch, rank r takes every world-th index), able
    to start mid-epoch after a resume. Yields (image index, epoch) keys."""

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
    """The ImageFolder root: --data, or the toy images (toydata.py makes them on first use)."""
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
    """The multi-view loader of <root>/train, with a clear error when the folder is unusable."""
    root = data_root(cfg)
    path = os.path.join(root, "train")
    samples, classes = list_images(path)
    sampler = EpochSampler(len(samples), cfg.batch_size, cfg.seed, rank, world)
    if sampler.batches == 0:
        fail(f"{len(samples)} images are fewer than one step needs ({world} x {cfg.batch_size}); "
             f"lower --batch-size")
    check_eval_data(cfg, root)
    loader = torch.utils.data.DataLoader(
        MultiViewImages(samples, cfg), batch_size=cfg.batch_size, sampler=sampler,
        num_workers=cfg.workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers else None, persistent_workers=cfg.workers > 0,
        worker_init_fn=ignore_stop_signals)
    print0(f"data {path}: {len(samples)} images, {len(classes)} classes (labels unused), "
           f"{sampler.batches} steps per epoch of {world} x {cfg.batch_size} images")
    return loader, sampler


@functools.cache
def mean_std(device):
    """MEAN and STD as (3, 1, 1) tensors on the device, made once: a copy to the GPU at every step
    would wait for the GPU each time."""
    return tuple(torch.tensor(v, device=device).view(3, 1, 1) for v in (MEAN, STD))


def to_model_input(batch, device):
    """uint8 views from the loader -> normalized float on the device; the noise as it is."""
    mean, std = mean_std(device)
    *views, noise = (x.to(device, non_blocking=True) for x in batch)
    return *((v.float().div_(255) - mean) / std for v in views), noise


# -----------------------------------------------------------------------------
# Schedule (official src/utils.py WarmupCosineSchedule, CosineWDSchedule; msn_train.py's momentum)
# Pure functions of the step, so nothing is replayed on resume, read as the official loop reads its
# schedules: it calls scheduler.step() and wd_scheduler.step() (which count up, then compute) BEFORE
# optimizer.step(), so update i uses lr and wd of step i + 1; it takes next(momentum_scheduler)
# AFTER the update, so the EMA after update i uses momentum i (its sharpening generator, read before
# the loss, gives T_i: 0.25 throughout in the released config). lr and wd span int(1.25 x total) steps,
# the momentum 1.25 x total: the run stops at 80 % of each (wd near 0.366, momentum near 0.9992).

def lr_at(step, warmup, horizon, start, peak, final):
    """1) linear warm-up start -> peak over `warmup` steps; 2) half-cycle cosine peak -> final over
    [warmup, horizon] (official WarmupCosineSchedule)."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * t))


def cosine_at(step, horizon, start, end):
    """Half-cycle cosine start -> end over `horizon` steps: the weight-decay INCREASE 0.04 -> 0.4
    (official CosineWDSchedule)."""
    t = min(1.0, step / horizon)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def linear_at(step, horizon, start, end):
    """Linear ramp start -> end over `horizon` steps: the EMA momentum 0.996 -> 1 (official)."""
    return start + (end - start) * min(1.0, step / horizon)


def param_groups(model, weight_decay):
    """Official init_opt: decay on >= 2-D weights (cls token and pos-embed too), none on biases and
    norms (1-D), a no-decay group for the prototypes; the schedule sets the `scheduled` group's."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n != "prototypes"]
    decay, no_decay = [p for n, p in named if p.ndim >= 2], [p for n, p in named if p.ndim < 2]
    return [dict(params=decay, weight_decay=weight_decay, scheduled=True),
            dict(params=no_decay, weight_decay=0.0, scheduled=False),
            dict(params=[model.prototypes], weight_decay=0.0, scheduled=False)]


# -----------------------------------------------------------------------------
# Checkpoint: one dict with everything to continue exactly. Written to a temp file, flushed to the disk and
# renamed; the one before stays as checkpoint.prev.pt, so a crash, a full disk or a damaged file at any moment
# leaves a good checkpoint to --resume from.

METHOD = "msn"  # written into every checkpoint: --resume refuses one of another program
SOURCE_SHA = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:12]
ARCH_KEYS = ("model", "patch_size", "img_size", "hidden_dim", "output_dim", "num_proto")
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
    """model = the whole MSN module: encoder, head, prototypes and the target network. A write that fails (full
    disk, no permission, read-only) leaves the checkpoints on disk as they were and returns False (every rank
    then stops, exit 1)."""
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

def forward_loss(model, prototypes, batch, cfg, ctx):
    """One micro-batch -> (loss, stats): the embeddings under autocast, the loss in fp32 outside it
    (official msn_train.py "Step 1. convert representations to fp32")."""
    with ctx:
        z, h = model(*batch)  # (M·B, E), (B, E)
    return msn_loss(z.float(), h.float(), prototypes.float(), cfg.tau, cfg.sharpen,
                    cfg.memax_weight, cfg.ent_weight, sinkhorn_iters=3 if cfg.sinkhorn else 0)


def evaluate_encoder(model, cfg, device, step):
    """evaluate.py's k-NN and few-shot top-1 of the EMA target encoder, the one MSN evaluates
    (official logistic_eval.py), on --data's val/. In a forked RNG: the run's random stream stays."""
    import evaluate  # the project's one label-efficient protocol, shared by the three trainers
    desc, heads = f"msn target_encoder {cfg.model}/{cfg.patch_size} step {step}", VIT[cfg.model]["heads"]
    with torch.random.fork_rng(devices=[]):
        return evaluate.evaluate_vit(model.target_encoder.state_dict(), cfg.img_size, data_root(cfg),
                                     device, desc, workers=cfg.workers, seed=cfg.seed, heads=heads)


def main(argv=None):
    cfg = parse_config(argv)
    device, ctx, dtype, rank, world, print0 = setup_device(cfg)
    torch.manual_seed(cfg.seed)  # the same init on every rank; the data has its own seeds
    model = MSN(cfg).to(device)
    n_enc, n_head = (sum(p.numel() for p in m.parameters()) for m in (model.encoder, model.head))
    print0(f"MSN {cfg.model}/{cfg.patch_size} encoder {n_enc / 1e6:.2f}M params | head "
           f"{cfg.hidden_dim}-{cfg.hidden_dim}-{cfg.output_dim} {n_head / 1e6:.2f}M | "
           f"{cfg.num_proto} prototypes | target = EMA copy")
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

    # optimizer and schedules (official init_opt: AdamW, torch's default betas; lr not batch-scaled)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=0.0, fused=True)  # fused: 3x foreach, on CPU too
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    steps_per_epoch = sampler.batches // cfg.accum
    if steps_per_epoch == 0:
        fail(f"--accum {cfg.accum} exceeds the {sampler.batches} batches of an epoch; lower it")
    total = cfg.max_steps or round(cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)  # official int(warmup * ipe), uncapped
    horizon = int(cfg.horizon * total)  # official T_max of the lr and wd schedules
    eff_batch, N = cfg.batch_size * cfg.accum * world, (cfg.img_size // cfg.patch_size) ** 2
    n_decay, n_off = (sum(p.numel() for p in g["params"]) for g in groups[:2])
    print0(f"effective batch {eff_batch} images ({world} x {cfg.batch_size} x accum {cfg.accum}) | "
           f"lr {cfg.start_lr:.2e} -> {cfg.lr:.2e} -> {cfg.final_lr:.2e} | {total} steps, {warmup} "
           f"warm-up, schedules over {horizon} | wd {cfg.weight_decay} -> "
           f"{cfg.final_weight_decay} on {n_decay / 1e6:.2f}M params, off on {n_off / 1e3:.1f}K + "
           f"prototypes | patch drop {cfg.patch_drop}: {num_kept(N, cfg.patch_drop)} of {N} kept")
    step, resumed = load_checkpoint(ckpt_path, model, optimizer, scaler, cfg) if cfg.resume else (0, None)
    if cfg.resume:
        print0(f"resumed from {resumed} at step {step}")
    print0("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    evals = dict(before=None)  # -> <out>/eval.json: evaluate.py's results at step 0 and at the end
    if cfg.eval and world > 1:  # the other ranks would wait for rank 0's evaluation in a collective
        print0("--eval under torchrun: evaluating after training only")
    if cfg.eval and world == 1 and step == 0:
        evals["before"] = evaluate_encoder(model, cfg, device, step)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dist.is_initialized():  # under torchrun, also with one process (the 1-GPU test of NCCL DDP)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        print0(f"DDP: {world} process(es), {dist.get_backend()} all-reduce of the gradients")

    K, stop, last_ckpt = cfg.num_proto, stop_on_signals(), "none yet"
    # sums over the log interval, on the device: loss, ce, me-max, H(p̄); prototype usage (K,)
    interval, usage = torch.zeros(4, device=device), torch.zeros(K, device=device)
    n_steps, t_data, t_last = 0, 0.0, time.perf_counter()
    model.train()
    while step < total:
        sampler.epoch, first = divmod(step, steps_per_epoch)  # resumed mid-epoch: the same order
        sampler.start_batch = first * cfg.accum
        batches = iter(loader)
        for _ in range(min(steps_per_epoch - first, total - step)):
            # 1) schedules, as the official loop steps them: lr and wd one step ahead, momentum not
            lr = lr_at(step + 1, warmup, horizon, cfg.start_lr, cfg.lr, cfg.final_lr)
            wd = cosine_at(step + 1, horizon, cfg.weight_decay, cfg.final_weight_decay)
            m = linear_at(step, cfg.horizon * total, cfg.momentum, cfg.final_momentum)
            for g in optimizer.param_groups:
                g["lr"] = lr  # official: one lr for all groups, the prototypes' too
                if g["scheduled"]:
                    g["weight_decay"] = wd
            # 2) forward / backward with accumulation
            for micro in range(cfg.accum):
                t0 = time.perf_counter()
                batch = to_model_input(next(batches), device)
                t_data += time.perf_counter() - t0
                with nullcontext() if micro == cfg.accum - 1 or world == 1 else model.no_sync():
                    loss, st = forward_loss(model, raw_model.prototypes, batch, cfg, ctx)
                scaler.scale(loss / cfg.accum).backward()
                terms = [loss.detach(), st["ce"], st["memax"], st["ent_mean"]]
                interval += torch.stack(terms) / cfg.accum
                usage += st["usage"]
            # 3) clip (encoder + head, not the prototypes: official) and optimizer step
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.online_parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            # 4) EMA of the target network (encoder + head)
            ema_update(raw_model.target_parameters(), raw_model.online_parameters(), m)
            step, n_steps = step + 1, n_steps + 1
            # 5) only at log and checkpoint steps: read the sums back; check, log, save
            log_now = step % cfg.log_every == 0 or step == total
            save_now = step % cfg.ckpt_every == 0 or step == total
            if not (log_now or save_now or (world == 1 and stop["requested"])):
                continue
            got = [stop["requested"] == s for s in STOP_SIGNALS]  # one-hot: the signal this rank received
            sums = sum_over_ranks([*interval, *usage, *got], device, world)  # 4 + K + 3 floats
            sums, sig = sums[:-len(got)], stop_signal(sums[-len(got):])  # every rank: the same signal, step
            loss_v, ce, reg, ent_mean = (s / (n_steps * world) for s in sums[:4])  # interval means
            save_now = save_now or sig
            problem = None if math.isfinite(loss_v) else f"loss is {loss_v}"
            finite = (p.isfinite().all() for p in raw_model.parameters())
            if save_now and not problem and not torch.stack(list(finite)).all():
                problem = "a parameter is not finite"  # a non-finite model is never saved
            if problem:
                print0(f"error: {problem} at step {step}; lower --lr or use --dtype fp32 (last "
                       f"good checkpoint: {last_ckpt})", file=sys.stderr)
                raise SystemExit(1)
            if log_now:
                sync(device)
                dt = time.perf_counter() - t_last
                ms, rate = 1e3 * dt / n_steps, n_steps * eff_batch / dt
                protos = sum(u > 0 for u in sums[4:])  # prototypes some target picked this interval
                print0(f"step {step:06d}/{total} ({100 * step / total:.1f}%) | loss {loss_v:.4f} "
                       f"(ce {ce:.4f}, me-max {reg:.4f}) | lr {lr:.2e} | wd {wd:.3f} | m {m:.5f} | "
                       f"H(p̄) {ent_mean:.3f}/{math.log(K):.3f} | protos {protos}/{K} | {ms:.0f} "
                       f"ms/step (data {100 * t_data / dt:.0f}%) | {rate:.1f} img/s | eta "
                       f"{(total - step) * ms / 3.6e6:.2f}h", flush=True)
                if rank == 0:
                    write_or_warn(append_line, os.path.join(cfg.out, "log.jsonl"), json.dumps(dict(
                        step=step, epoch=step / steps_per_epoch, loss=loss_v, ce=ce, memax=reg,
                        ent_mean=ent_mean, protos_in_use=protos, lr=lr, wd=wd, momentum=m,
                        ms_per_step=ms, img_per_s=rate)))
                interval.zero_(), usage.zero_()
                n_steps, t_data, t_last = 0, 0.0, time.perf_counter()
            if save_now:
                failed = rank == 0 and not save_checkpoint(ckpt_path, raw_model, optimizer, scaler, step, cfg)
                if world > 1:  # every rank learns whether rank 0 could write, and all stop together
                    failed = sum_over_ranks([failed], device, world)[0] > 0
                if failed:
                    raise SystemExit(1)
                last_ckpt = f"{ckpt_path} at step {step}"
            if sig:
                stop_all(sig, step, world, print0)
    print0(f"done: {step} steps; checkpoint {ckpt_path}")
    if cfg.eval and rank == 0:
        evals["after"] = evaluate_encoder(raw_model, cfg, device, step)
        write_or_warn(atomic_write_text, os.path.join(cfg.out, "eval.json"), json.dumps(evals, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return raw_model


# -----------------------------------------------------------------------------
# Plumbing: command line, device and DDP, benchmark

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
    if cfg.patch_drop < 0 and cfg.model in PATCH_DROP:  # the masking ratio of --model's config
        cfg.patch_drop = PATCH_DROP[cfg.model]
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Flags that cannot work, refused with their fix before anything is built or written."""
    if cfg.model not in VIT:
        fail(f"unknown --model {cfg.model}; choose from {', '.join(VIT)}")
    for name, size in (("img-size", cfg.img_size), ("focal-size", cfg.focal_size)):
        if size % cfg.patch_size or size < cfg.patch_size:
            fail(f"--{name} {size} is not divisible by --patch-size {cfg.patch_size}; use e.g. "
                 f"{max(1, size // cfg.patch_size) * cfg.patch_size}")
    if not 0 <= cfg.patch_drop < 1:
        fail(f"--patch-drop {cfg.patch_drop} must be in [0, 1): a fraction of the anchor's patches")
    if cfg.num_proto < 2 or cfg.tau <= 0 or cfg.sharpen <= 0:
        fail("--num-proto must be >= 2 and --tau, --sharpen > 0")
    if cfg.batch_size < 2:
        fail(f"--batch-size {cfg.batch_size}: the head's BatchNorm needs at least 2 images per GPU")
    if cfg.focal_views < 0 or cfg.accum < 1:
        fail("--focal-views must be >= 0 and --accum >= 1")
    if not all(0 < lo <= hi <= 1 for lo, hi in (cfg.crop_scale, cfg.focal_scale)):
        fail("--crop-scale and --focal-scale take MIN MAX, 0 < MIN <= MAX <= 1 (area fractions)")
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
    matmul rate in the step's precision. The FLOPs of a step are counted once, by FlopCounterMode
    (attention in the math kernel, so that its matmuls count); the first two timed steps (and any
    compiling) only warm up."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    B, V, S, s = cfg.batch_size, cfg.focal_views, cfg.img_size, cfg.focal_size
    N = (S // cfg.patch_size) ** 2
    batch = (torch.randn(B, 3, S, S, device=device), torch.randn(B, 3, S, S, device=device),
             torch.randn(B, V, 3, s, s, device=device), torch.rand(B, N, device=device))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # one step's
        forward_loss(model, model.prototypes, batch, cfg, ctx)[0].backward()
    model.zero_grad(set_to_none=True)
    step_model = torch.compile(model) if cfg.compile else model
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    times = []
    for _ in range(steps + 2):
        sync(device)
        t = time.perf_counter()
        scaler.scale(forward_loss(step_model, model.prototypes, batch, cfg, ctx)[0]).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema_update(model.target_parameters(), model.online_parameters(), 0.996)
        sync(device)
        times.append(time.perf_counter() - t)
    dt, flops = statistics.median(times[2:]), counter.get_total_flops()
    peak, n = matmul_rate(device, dtype)
    print(f"bench | {cfg.model}/{cfg.patch_size} | views 1+1 x {S}px (drop {cfg.patch_drop}) + "
          f"{V} x {s}px | {dtype}, {'compiled' if cfg.compile else 'eager'} | batch {B} | "
          f"{dt * 1e3:.1f} ms/step (median of {steps}) | {B / dt:.1f} images/s | "
          f"{flop_rate(flops / dt)} = {100 * flops / dt / peak:.0f}% of {dtype} matmul "
          f"{flop_rate(peak)} (median {n}^3 on {device.type}) | {flops / 1e9:.1f} GFLOP/step",
          flush=True)


if __name__ == "__main__":
    main()
