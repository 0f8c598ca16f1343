"""
MSN: Masked Siamese Networks, in one file, with the label-efficient evaluation that is the paper's point.
Assran, Caron, Misra, Bojanowski, Bordes, Vincent, Joulin, Rabbat, Ballas. "Masked Siamese Networks for
Label-Efficient Learning", ECCV 2022, arXiv:2204.07141. Official code: github.com/facebookresearch/msn.

Each image gives one target view (224 px, whole) and several anchor views: one 224-px view with 15 % of its
patches dropped, and 10 small "focal" crops (96 px). The anchors go through the ViT being trained; the target goes
through an exponential moving average (EMA) of it. Both embeddings are compared with 1024 learned prototypes
(cosine similarity, softmax); each anchor's soft assignment must match its image's sharpened target assignment,
while the mean assignment over the batch is kept spread out (ME-MAX). No pixels are reconstructed: the "denoising"
of the masked view happens at the level of the representation.

    python msn.py                                        # toy demo on a 2-core CPU (~1 min): k-NN before and after
    python msn.py --data imagenet/                       # one GPU (or CPU), official ViT-S/16 defaults
    torchrun --nproc_per_node=8 msn.py --data imagenet/ --batch-size 128   # DDP, 1024 images per step
    python msn.py --eval --ckpt out/msn/checkpoint.pt    # k-NN and 1/2/5-shot logistic regression on --data's val/
    python msn.py --eval --ckpt random                   # the untrained network, for comparison
    python msn.py --bench --batch-size 8                 # throughput of one ViT-S/16 training step, no data needed

--eval also reads checkpoints of siammae.py and cmae.py (same encoder names), so the three methods can be compared on
the same images with the same protocol.

Measured on 2 idle CPU cores (no GPU), 2026-11-23: one ViT-S/16 multi-crop step (batch 8) 3.83 s = 169 GFLOP/s =
88 % of the fp32 matmul rate. Commands and more in README.md "Results".

Sections: Config | ViT | Masking | Model | Losses | Data | Schedules | Checkpointing | Evaluation | Benchmark |
Train loop (main). The paper's text is cited as (§n); "official code" means facebookresearch/msn at its release.
Where the paper text and the code differ, this file follows the code and says so.
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

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn  # collectives with autograd (backward = all-reduce of the grads)
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP


# -----------------------------------------------------------------------------
# Config: every field is a CLI flag (--focal-views for focal_views). Defaults are the official ViT-S/16 config
# (configs/pretrain/msn_vits16.yaml); the toy preset below is what `python msn.py` runs.

@dataclasses.dataclass
class Config:
    data: str = ""                 # ImageFolder root with train/ (and val/ for --eval); empty = toy images + toy preset
    out: str = "out/msn"           # checkpoint.pt, log.jsonl and eval.json go here
    preset: str = ""               # "toy": small, fast settings for a CPU demo (applied before the flags you pass)
    # model (official: deit_small = ViT-S/16, head 2048-2048-256 with BatchNorm, no prediction head)
    model: str = "vit_small"       # vit_micro | vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 16
    img_size: int = 224            # target and masked-anchor crop side ("rand_size")
    focal_size: int = 96           # focal crop side; the pos-embed is interpolated to its grid (14x14 -> 6x6)
    focal_views: int = 10          # focal anchors per image (official 10); 0 = the masked 224 anchor only
    patch_drop: float = -1.0       # fraction of the anchor's patches dropped; < 0 = per model (PATCH_DROP below)
    hidden_dim: int = 2048         # projection head Linear(D,h)-BN-GELU-Linear(h,h)-BN-GELU-Linear(h,out)
    output_dim: int = 256
    num_proto: int = 1024          # K prototypes, learned, shared by anchors and targets (official 1024)
    tau: float = 0.1               # softmax temperature of the cosine similarity to the prototypes (§3, Eq. 1)
    sharpen: float = 0.25          # target sharpening temperature T (official start = final = 0.25: a constant)
    no_sinkhorn: bool = False      # official: Sinkhorn (3 iterations) on the targets; this flag turns it off
    memax_weight: float = 1.0      # λ of the mean-entropy-maximisation regulariser (§3, Eq. 2)
    ent_weight: float = 0.0        # weight of the per-sample entropy term (official: computed, weight 0)
    # views (official data_manager.make_transforms; colour strength 0.5 -> jitter 0.4, 0.4, 0.4, 0.1)
    crop_scale: tuple = (0.3, 1.0)     # RandomResizedCrop scale of the target and masked-anchor views
    focal_scale: tuple = (0.05, 0.3)   # RandomResizedCrop scale of the focal views
    color_jitter: float = 0.5          # strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p 0.8
    # optimisation (official: AdamW, lr NOT scaled with the batch; every schedule spans 1.25x the run)
    batch_size: int = 64           # images per GPU per step; official 1024 = 16 GPUs x 64 (use --accum on fewer)
    epochs: int = 800              # official ViT-S/16
    max_steps: int = 0             # if > 0: train this many optimizer steps instead; the schedules span them
    lr: float = 1e-3               # peak lr after warm-up (official "lr", the same at any batch size)
    start_lr: float = 2e-4         # warm-up starts here (official)
    final_lr: float = 1e-6         # the cosine heads here; with the 1.25x horizon the run stops before reaching it
    blr: float = 0.0               # if > 0: lr = blr x batch / 256 (MAE rule, for the shared flags); MSN does not scale
    warmup_epochs: float = 15      # official
    weight_decay: float = 0.04     # cosine INCREASE to --final-weight-decay (official); none on biases, norms, protos
    final_weight_decay: float = 0.4
    momentum: float = 0.996        # EMA momentum of the target network, linear ramp to --final-momentum (official)
    final_momentum: float = 1.0
    horizon: float = 1.25          # official: lr, wd and momentum schedules are laid out over 1.25x the run's steps
    clip_grad: float = 3.0         # max grad norm of encoder + head (official; the prototypes are not clipped)
    accum: int = 1                 # gradient accumulation micro-steps per optimizer step
    # evaluation (label-efficient: k-NN and few-shot logistic regression on frozen features)
    eval: bool = False             # evaluate --ckpt on --data's train/ and val/ and exit
    ckpt: str = ""                 # checkpoint of msn.py, siammae.py or cmae.py, or "random" (untrained --model)
    knn_k: int = 20                # neighbours (fewer if the train split is smaller)
    knn_temp: float = 0.07         # vote weight exp(cos / t), DINO's weighted k-NN
    draws: int = 5                 # random draws of the labelled images per few-shot setting
    lambd: float = 0.0025          # L2 penalty of the logistic regression, as logistic_eval.py's README command
    final_eval: bool = False       # also evaluate before and after training (the toy preset turns it on)
    # machine
    workers: int = 8               # DataLoader processes per GPU (12 augmented views per image is CPU work)
    device: str = "auto"           # auto | cuda | cpu
    dtype: str = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False          # torch.compile the model (CUDA: faster after a minute of compiling)
    seed: int = 0
    resume: bool = False           # continue from <out>/checkpoint.pt
    bench: bool = False            # time a few training steps on synthetic input and exit
    # logging
    log_every: int = 20            # steps between log lines (and log.jsonl records)
    ckpt_every: int = 500          # steps between checkpoints (one more at the end)


PRESETS = {  # `python msn.py`: a real demo on a 2-core CPU (toy scenes, ~1 minute), k-NN printed before and after
    # momentum 0.9 (-> 1): the EMA target is the network MSN evaluates, and at the official 0.996 it averages over
    # ~1/(1 - m) = 250 steps, twice this whole 120-step run, so it would end close to its initialisation (measured:
    # k-NN 78 -> 75 with 0.996, 78 -> 96 with 0.9). 0.996 fits the official ~1M steps; the ramp to 1 is kept.
    "toy": dict(model="vit_tiny", patch_size=16, img_size=64, focal_size=32, focal_views=4, hidden_dim=512,
                output_dim=128, num_proto=64, batch_size=30, epochs=20, warmup_epochs=2, momentum=0.9, workers=2,
                log_every=10, ckpt_every=100, final_eval=True),
}

VIT = {  # width / depth / heads (REFERENCE §0: timm sizes); encoder params at 224 px, patch 16
    "vit_micro": dict(dim=64, depth=2, heads=2),      # 0.1M: tests and smoke runs only, not a paper size
    "vit_tiny": dict(dim=192, depth=12, heads=3),     # 5.5M
    "vit_small": dict(dim=384, depth=12, heads=6),    # 21.7M
    "vit_base": dict(dim=768, depth=12, heads=12),    # 85.8M
    "vit_large": dict(dim=1024, depth=24, heads=16),  # 303M
}

# Masking ratio per model. ViT-S/16 0.15 is the released config; ViT-B/4 uses 0.7 (config posted by the authors in
# facebookresearch/msn issue #5). ViT-B/16 and ViT-L/16 follow the paper's appendix as we read it (0.3) -- uncertain,
# hence a flag. ViT-T/16 has no official value: ViT-S/16's.
PATCH_DROP = {"vit_micro": 0.15, "vit_tiny": 0.15, "vit_small": 0.15, "vit_base": 0.3, "vit_large": 0.3}


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
    cfg.crop_scale, cfg.focal_scale = tuple(cfg.crop_scale), tuple(cfg.focal_scale)
    if cfg.patch_drop < 0 and cfg.model in PATCH_DROP:
        cfg.patch_drop = PATCH_DROP[cfg.model]
    check_config(cfg)
    return cfg


def check_config(cfg):
    if cfg.model not in VIT:
        fail(f"unknown --model {cfg.model}; choose from {', '.join(VIT)}")
    for name in ("img_size", "focal_size"):
        if getattr(cfg, name) % cfg.patch_size or getattr(cfg, name) < cfg.patch_size:
            size = getattr(cfg, name)
            fail(f"--{name.replace('_', '-')} {size} is not divisible by --patch-size {cfg.patch_size}; "
                 f"use e.g. {max(1, size // cfg.patch_size) * cfg.patch_size}")
    if not 0 <= cfg.patch_drop < 1:
        fail(f"--patch-drop {cfg.patch_drop} must be in [0, 1): it is the fraction of the anchor's patches dropped")
    if cfg.num_proto < 2 or cfg.tau <= 0 or cfg.sharpen <= 0:
        fail("--num-proto must be >= 2 and --tau, --sharpen > 0")
    if cfg.batch_size < 2 and not cfg.eval:
        fail(f"--batch-size {cfg.batch_size}: the projection head's BatchNorm needs at least 2 images per GPU")
    if cfg.focal_views < 0 or cfg.accum < 1:
        fail("--focal-views must be >= 0 and --accum >= 1")
    if not (0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1 and 0 < cfg.focal_scale[0] <= cfg.focal_scale[1] <= 1):
        fail("--crop-scale and --focal-scale take MIN MAX with 0 < MIN <= MAX <= 1 (area fractions)")
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32") or cfg.device not in ("auto", "cuda", "cpu"):
        fail("--dtype takes auto|bf16|fp16|fp32 and --device auto|cuda|cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    if cfg.eval and not cfg.ckpt:
        fail("--eval needs --ckpt PATH (a checkpoint.pt of msn.py, siammae.py or cmae.py) or --ckpt random")


# -----------------------------------------------------------------------------
# ViT (timm / DeiT parameter names, so the encoder loads as a plain ViT in propagate.py, timm, DINO tools).
# Shapes: B batch, V views, N patches per view, Nv kept patches, D width, H heads, Dh = D / H,
#         K prototypes, E embedding (head output) width, C classes, M anchor views per image.
# MSN's ViT differs from MAE's in two places (official src/deit.py): the position embedding is LEARNED
# (trunc-normal std 0.02, not sin-cos), and it is resized bicubically when a view has another grid (focal crops).

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
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The encoder. embed() makes patch tokens (token dropping happens between the two calls); encode() runs the
    blocks. Initialised as the official DeiT: trunc-normal(0.02) Linears, pos-embed and cls token; LayerNorm 1 / 0;
    patch-embed conv Kaiming-normal (fan-in)."""

    def __init__(self, img_size, patch_size, dim, depth, heads):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))  # learned (official), cls slot first
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        nn.init.kaiming_normal_(self.patch_embed.proj.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.patch_embed.proj.bias)

    def patch_pos_embed(self, grid):
        """Position embedding of the patches for a grid x grid view: (1, grid², D). Another grid than the training
        one (focal crops: 14x14 -> 6x6 at patch 16) gets the table resized bicubically (official interpolate_pos_
        encoding; it passes scale_factor = grid/14, equal to size=(grid, grid) here because both are exact)."""
        pos = self.pos_embed[:, 1:]  # (1, N, D)
        if grid == self.grid:
            return pos
        D = pos.shape[-1]
        pos = pos.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)  # (1, D, grid, grid)
        return pos.permute(0, 2, 3, 1).reshape(1, grid * grid, D)  # (1, grid², D), row-major like the patches

    def embed(self, imgs):
        """(B, 3, S, S) -> (B, N, D) patch tokens + position, no cls. Position is added BEFORE dropping tokens."""
        B, C, Himg, Wimg = imgs.shape
        p = self.patch_size
        assert Himg == Wimg and Himg % p == 0, f"expected a square input divisible by patch {p}, got {Himg}x{Wimg}"
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D), row-major
        return x + self.patch_pos_embed(Himg // p)

    def encode(self, x, final_norm=True):
        """(B, Nv, D) kept tokens -> (B, 1 + Nv, D): cls (+ its own position slot) prepended, blocks, final LN.
        final_norm=False gives the last block's raw output (MSN's evaluation features)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if final_norm else x

    def forward(self, imgs):
        """Plain ViT on a whole image (no dropping): (B, 3, S, S) -> (B, 1 + N, D)."""
        return self.encode(self.embed(imgs))


def init_weights(m):
    """Official MSN init (src/deit.py and msn_train.init_model): trunc-normal(std 0.02) Linear weights, zero biases,
    LayerNorm 1 / 0. BatchNorm keeps torch's 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# Masking (§3 "Patchify and mask"; official forward_features: token DROPPING, no mask tokens)

def num_kept(n_patches, ratio):
    """Tokens kept out of N: floor(N·(1 − ratio)) as the official code (196 -> 166 at 0.15); the cls token is extra."""
    return int(math.floor(n_patches * (1 - ratio)))


def random_masking(noise, ratio):
    """Random token dropping from uniform noise (B, N): each sample keeps its num_kept(N, ratio) tokens with the
    SMALLEST noise (MAE's idiom). Returns ids_keep (B, Nv) and mask (B, N) float, 1 = dropped, 0 = kept.
    The official code draws ONE permutation for the whole local batch (torch.randperm in forward_features); we draw
    one per sample, from noise made by the data loader, so the result does not depend on how the batch is split over
    GPUs (1 process and 2 processes give the same training) nor on the global RNG (exact resume). Per sample the
    distribution of kept sets is the same uniform one."""
    B, N = noise.shape
    len_keep = num_kept(N, ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
    mask = torch.ones(B, N, device=noise.device)
    mask.scatter_(1, ids_shuffle[:, :len_keep], 0.0)
    return ids_shuffle[:, :len_keep], mask


def gather_tokens(x, ids):
    """x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


# -----------------------------------------------------------------------------
# Model: anchor encoder + head, prototypes, and the target network (EMA of encoder + head) in one module, so one
# state_dict holds all of it: encoder.*, head.*, prototypes, target_encoder.*, target_head.* (propagate.py and
# --eval read target_encoder.* from MSN checkpoints).

class BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics span all DDP ranks. The official code converts the head to SyncBatchNorm
    when world > 1; torch's SyncBatchNorm needs a GPU, this one also runs under gloo on CPU. Same parameters and
    buffers as nn.BatchNorm1d; with one process it IS nn.BatchNorm1d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x = x.float()
        stats = dist_nn.all_reduce(torch.stack([x.sum(0), (x * x).sum(0)]))  # (2, h): Σx, Σx² over all ranks;
        n = x.shape[0] * dist.get_world_size()  # backward sums the grads over ranks, as the true gradient needs
        mean, var = stats[0] / n, stats[1] / n - (stats[0] / n) ** 2  # biased variance normalizes (as BN)
        with torch.no_grad():  # running statistics use the unbiased variance (as nn.BatchNorm1d)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class ProjectionHead(nn.Module):
    """Official msn_train.init_model with use_bn: Linear(D,h)-BN-GELU-Linear(h,h)-BN-GELU-Linear(h,E), on the
    final-LayerNorm'd cls token. Names fc1/bn1/fc2/bn2/fc3 as the official `fc` Sequential."""

    def __init__(self, dim, hidden, out):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(dim, hidden), BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), BatchNorm1d(hidden)
        self.fc3 = nn.Linear(hidden, out)

    def forward(self, x):
        x = F.gelu(self.bn1(self.fc1(x)))
        x = F.gelu(self.bn2(self.fc2(x)))
        return self.fc3(x)


class MSN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v = VIT[cfg.model]
        self.cfg = cfg
        self.encoder = ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"])
        self.head = ProjectionHead(v["dim"], cfg.hidden_dim, cfg.output_dim)
        self.head.apply(init_weights)
        bound = cfg.output_dim ** -0.5  # official: U(±1/√E), learned, no weight decay, not EMA'd
        self.prototypes = nn.Parameter(torch.empty(cfg.num_proto, cfg.output_dim).uniform_(-bound, bound))
        # The target network starts as an exact copy and then follows the EMA; it never gets gradients.
        self.target_encoder = ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"])
        self.target_head = ProjectionHead(v["dim"], cfg.hidden_dim, cfg.output_dim)
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_head.load_state_dict(self.head.state_dict())
        for p in self.target_parameters():
            p.requires_grad_(False)

    def online_parameters(self):
        """What the EMA follows and what grad clipping covers: encoder + head (official `encoder` incl. its fc)."""
        return list(self.encoder.parameters()) + list(self.head.parameters())

    def target_parameters(self):
        return list(self.target_encoder.parameters()) + list(self.target_head.parameters())

    def anchor_embeddings(self, anchor, focal, noise):
        """anchor (B, 3, S, S) with its drop noise (B, N); focal (B, V, 3, s, s) -> (M·B, E), M = 1 + V, view-major
        (all images' view 0, then all images' view 1, ...). One encoder batch per resolution, as the official
        forward; the head's BatchNorm therefore sees each resolution as its own batch, as in the official code."""
        ids_keep, _ = random_masking(noise, self.cfg.patch_drop)
        x = gather_tokens(self.encoder.embed(anchor), ids_keep)  # (B, N, D) -> (B, Nv, D)
        z = [self.head(self.encoder.encode(x)[:, 0])]  # (B, E)
        if focal.shape[1]:
            f = focal.transpose(0, 1).flatten(0, 1)  # (B, V, 3, s, s) -> (V·B, 3, s, s), view-major like the targets
            z.append(self.head(self.encoder(f)[:, 0]))  # (V·B, E)
        return torch.cat(z)  # (M·B, E)

    @torch.no_grad()
    def target_embeddings(self, target):
        """target (B, 3, S, S) unmasked -> (B, E) through the EMA network. It stays in train mode (BatchNorm uses
        batch statistics), as the official target_encoder which is never put in eval mode."""
        return self.target_head(self.target_encoder(target)[:, 0])

    def forward(self, target, anchor, focal, noise):
        """Returns the loss and its terms (a dict of detached scalars + the targets' prototype assignments)."""
        z = self.anchor_embeddings(anchor, focal, noise)  # (M·B, E)
        h = self.target_embeddings(target)  # (B, E)
        with torch.autocast(z.device.type, enabled=False):  # official: representations converted to fp32 first
            return msn_loss(z.float(), h.float(), self.prototypes.float(), self.cfg.tau, self.cfg.sharpen,
                            self.cfg.memax_weight, self.cfg.ent_weight, sinkhorn_iters=0 if self.cfg.no_sinkhorn else 3)


@torch.no_grad()
def ema_update(online, target, m):
    """θ̄ ← m·θ̄ + (1 − m)·θ for each parameter pair (DINO's three lines). Buffers (BatchNorm running statistics)
    are not averaged: each network keeps its own, as the official code."""
    for p, t in zip(online, target):
        t.mul_(m).add_(p.detach(), alpha=1 - m)


# -----------------------------------------------------------------------------
# Losses (§3 "Similarity metric and predictions", "Training objective"; official src/losses.py)

def predictions(z, prototypes, tau):
    """p = softmax( ẑ · q̂ᵀ / τ ), §3 Eq. (1): cosine similarity of the L2-normalized embedding ẑ to each
    L2-normalized prototype q̂. BOTH sides are normalized (official snn()). z (n, E), prototypes (K, E) -> (n, K)."""
    return F.softmax(F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).T / tau, dim=-1)  # (n, E) x (E, K)


def sharpen(p, T):
    """ρ(p)_k = p_k^(1/T) / Σ_j p_j^(1/T) (§3 "target sharpening"); T = 1 is the identity, T < 1 peaks p."""
    p = p ** (1.0 / T)
    return p / p.sum(dim=-1, keepdim=True)


@torch.no_grad()
def sinkhorn(Q, iters=3):
    """Sinkhorn-Knopp balancing of the targets (official distributed_sinkhorn, 3 iterations; the paper's text does
    not mention it, the released config turns it on). Q (B, K) -> (B, K): each row still sums to 1, and each column
    (prototype) is pushed towards the uniform share B_total / K. Sums run over all ranks."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    Q = Q.clone()
    B, K = Q.shape[0] * world, Q.shape[1]

    def all_sum(x):
        if world > 1:
            dist.all_reduce(x)
        return x
    Q /= all_sum(Q.sum())  # total mass 1
    for _ in range(iters):
        Q /= all_sum(Q.sum(dim=0, keepdim=True))  # (1, K): each prototype gets mass 1/K ...
        Q /= K
        Q /= Q.sum(dim=1, keepdim=True)  # (B, 1): ... then each sample mass 1/B
        Q /= B
    return Q * B  # rows sum to 1: an assignment per sample


def cross_entropy(targets, log_p):
    """H(t, p) = −Σ_k t_k log p_k per row."""
    return -(targets * log_p).sum(dim=-1)


def mean_prediction(probs):
    """p̄ = mean of the anchor predictions over the batch, across all ranks too (official AllReduce: average in the
    forward, gradient passed through). Here an autograd all-reduce sums the gradient over ranks; since every rank
    computes the same ME-MAX term, that equals the official pass-through, and DDP's averaging then gives the true
    gradient of the global p̄."""
    p_mean = probs.mean(dim=0)  # (K,)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        p_mean = dist_nn.all_reduce(p_mean) / dist.get_world_size()
    return p_mean


def memax(p_mean):
    """ME-MAX regulariser: Σ_k p̄_k log p̄_k + log K = log K − H(p̄) >= 0; 0 for a uniform p̄, log K for a one-hot p̄."""
    return torch.special.xlogy(p_mean, p_mean).sum() + math.log(p_mean.shape[-1])


def msn_loss(anchor_z, target_z, prototypes, tau=0.1, T=0.25, memax_weight=1.0, ent_weight=0.0, sinkhorn_iters=3):
    """MSN objective, Assran et al. 2022, §3 Eq. (2):  (1/MB) Σ_i Σ_m H(ρ(p⁺_i), p_i,m) − λ H(p̄)
    implemented as the official code: + λ log K (a constant that makes the term >= 0), Sinkhorn on the targets,
    and an optional per-sample entropy term (weight 0 in the released config).
    anchor_z (M·B, E) view-major, target_z (B, E), prototypes (K, E). Gradients reach the anchors and the
    prototypes through the anchor predictions only; the targets are computed under no_grad.
    Returns (loss, stats): stats holds detached ce, memax, ent_mean = H(p̄), ent, and assign (B,) = argmax of the
    targets (to count the prototypes in use)."""
    M = anchor_z.shape[0] // target_z.shape[0]
    logits = F.normalize(anchor_z, dim=-1) @ F.normalize(prototypes, dim=-1).T / tau  # (M·B, K): Eq. (1) before softmax
    log_p = F.log_softmax(logits, dim=-1)  # log p_i,m
    probs = log_p.exp()
    with torch.no_grad():
        targets = sharpen(predictions(target_z, prototypes.detach(), tau), T)  # ρ(p⁺_i): (B, K)
        if sinkhorn_iters:
            targets = sinkhorn(targets, sinkhorn_iters)
        targets = targets.repeat(M, 1)  # (M·B, K): row m·B + i is image i's target, lined up with the anchors (cat)
    ce = cross_entropy(targets, log_p).mean()  # (1/MB) Σ H(ρ(p⁺_i), p_i,m)
    p_mean = mean_prediction(probs)  # p̄ (K,)
    reg = memax(p_mean)  # log K − H(p̄)
    ent = cross_entropy(probs, log_p).mean()  # mean per-sample entropy H(p_i,m) (official "use_ent", weight 0)
    loss = ce + memax_weight * reg + ent_weight * ent
    stats = dict(ce=ce.detach(), memax=reg.detach(), ent_mean=math.log(p_mean.shape[0]) - reg.detach(),
                 ent=ent.detach(), assign=targets[:target_z.shape[0]].argmax(dim=-1))
    return loss, stats


# -----------------------------------------------------------------------------
# Data: multi-crop views of ImageFolder images (official make_transforms), made with torchvision's transforms.
# All randomness of a sample (every view's crop, flip, colour, blur, and the anchor's drop noise) comes from a seed
# made of (seed, epoch, image index), so the data does not depend on worker count, rank count or resuming.

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
BLUR_KERNEL = 13  # covers ±3σ at the largest σ = 2; the official code blurs with PIL's GaussianBlur(radius = σ)


def view_transform(size, scale, s):
    """One random view (official make_transforms): RandomResizedCrop (torchvision's default bilinear, as official),
    h-flip, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grayscale p 0.2, Gaussian blur σ ∈ [0.1, 2] with p 0.5.
    PIL in, uint8 (3, size, size) out; normalization happens on the device."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(BLUR_KERNEL, sigma=(0.1, 2.0))], p=0.5),
        T.PILToTensor(),
    ])


def image_folder(root, split):
    """torchvision ImageFolder of root/split with a clear error when it is missing or empty."""
    path = os.path.join(root, split)
    if not os.path.isdir(root):
        fail(f"--data {root} does not exist; pass an ImageFolder root with train/ and val/ (e.g. imagenet/)")
    if not os.path.isdir(path):
        fail(f"--data {root} has no {split}/ folder; it must hold {split}/<class>/<image> (ImageFolder layout)")
    try:
        return torchvision.datasets.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no image files in them
        fail(f"{path} holds no images in class folders ({str(e).splitlines()[0][:80]}); use the ImageFolder layout")


class MultiViewImages(torch.utils.data.Dataset):
    """Item (image index, epoch) -> target (3, S, S), anchor (3, S, S), focal (V, 3, s, s) uint8 and the anchor's
    drop noise (N,). The target and the masked anchor are two independent draws of the same transform (official
    rand_views + 1 = 2 "rand" views, view 0 is the target)."""

    def __init__(self, folder, cfg):
        self.samples, self.loader, self.cfg = folder.samples, folder.loader, cfg
        self.rand = view_transform(cfg.img_size, cfg.crop_scale, cfg.color_jitter)
        self.focal = view_transform(cfg.focal_size, cfg.focal_scale, cfg.color_jitter)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        idx, epoch = key
        img = self.loader(self.samples[idx][0])  # PIL RGB
        c = self.cfg
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global torch RNG
            torch.manual_seed(hash((c.seed, epoch, idx)) & 0xFFFF_FFFF)
            target, anchor = self.rand(img), self.rand(img)
            focal = torch.stack([self.focal(img) for _ in range(c.focal_views)]) if c.focal_views else \
                torch.zeros(0, 3, c.focal_size, c.focal_size, dtype=torch.uint8)
            noise = torch.rand((c.img_size // c.patch_size) ** 2)
        return target, anchor, focal, noise


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's split (one seeded permutation per epoch, rank r takes every world-th index), able to start
    mid-epoch after a resume. Yields (image index, epoch) keys."""

    def __init__(self, n, batch_size, seed, rank=0, world=1):
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_batch = 0, 0
        self.batches = n // (world * batch_size)  # drop the ragged end, as drop_last does

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[:self.batches * self.world * self.bs]
        mine = perm[self.rank::self.world][self.start_batch * self.bs:]
        return iter([(int(i), self.epoch) for i in mine])

    def __len__(self):
        return (self.batches - self.start_batch) * self.bs


def normalize(x, device):
    """uint8 (..., 3, S, S) -> normalized float on the device."""
    x = x.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(STD, device=device).view(3, 1, 1)
    return (x - mean) / std


def to_model_input(batch, device):
    target, anchor, focal, noise = batch
    return normalize(target, device), normalize(anchor, device), normalize(focal, device), noise.to(device)


# -----------------------------------------------------------------------------
# Schedules: pure functions of the optimizer step (no generator to replay on resume). Official shapes, all laid out
# over horizon = int(1.25 x total steps), so the run stops at 80 % of each: lr does not reach final_lr, wd stops near
# 0.366, momentum near 0.9992. (The official schedulers are stepped before the update, so its first update uses the
# value one step in; here step 0 uses the start value.)

def lr_at(step, warmup, horizon, start, peak, final):
    """1) linear warm-up start -> peak over `warmup` steps; 2) half-cycle cosine peak -> final over [warmup, horizon]
    (official WarmupCosineSchedule)."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * t))


def cosine_at(step, horizon, start, end):
    """Half-cycle cosine start -> end over `horizon` steps; used for the weight-decay INCREASE 0.04 -> 0.4
    (official CosineWDSchedule)."""
    t = min(1.0, step / horizon)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def linear_at(step, horizon, start, end):
    """Linear ramp start -> end over `horizon` steps; the EMA momentum 0.996 -> 1 (official momentum_scheduler)."""
    return start + (end - start) * min(1.0, step / horizon)


def param_groups(model, weight_decay):
    """Official init_opt: weight decay on >= 2-D weights (incl. cls token and pos-embed), none on biases and norm
    parameters (1-D), and a separate no-decay group for the prototypes. `scheduled` marks the group whose decay the
    cosine schedule sets."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n != "prototypes"]
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    return [dict(params=decay, weight_decay=weight_decay, scheduled=True),
            dict(params=no_decay, weight_decay=0.0, scheduled=False),
            dict(params=[model.prototypes], weight_decay=0.0, scheduled=False)]


# -----------------------------------------------------------------------------
# Checkpointing: one dict with everything to continue exactly; written atomically (temp file + rename)

ARCH_KEYS = ("model", "patch_size", "img_size", "hidden_dim", "output_dim", "num_proto")


def atomic_write_text(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_checkpoint(path, model, optimizer, scaler, step, cfg):
    """model = the whole MSN module: encoder.*, head.*, prototypes, target_encoder.*, target_head.* (the target
    network lives in the same state dict, so no separate key is needed); prototypes again under their own key."""
    state = dict(method="msn", model=model.state_dict(), prototypes=model.prototypes.detach().clone(),
                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                 config=dataclasses.asdict(cfg), source_sha256=SOURCE_SHA,
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
    if state.get("method") != "msn" or diff:
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
# Evaluation: label-efficient classification on frozen features (the paper's point, §5.1).
#
# Protocol (cmae.py implements the same one independently; keep them in step):
#   encoder   msn.py checkpoint -> target_encoder.* (the EMA network, as the official logistic_eval.py loads);
#             siammae.py / cmae.py checkpoint -> encoder.*; "random" -> a freshly initialised --model (seed --seed).
#             Architecture (model, patch_size, img_size) from the checkpoint's config.
#   images    --data's train/ and val/ (ImageFolder); shorter side -> round(S·256/224) bicubic, centre crop S,
#             ImageNet mean/std. No augmentation.
#   features  the cls token output of the LAST BLOCK BEFORE the final LayerNorm (official forward_blocks, as
#             logistic_eval.py), L2-normalized.
#   k-NN      k = min(20, #train), cosine similarity, votes weighted exp(cos / 0.07) (DINO's weighted k-NN), top-1 %.
#   few-shot  n = 1, 2, 5 train images per class, 5 seeded draws each; multinomial logistic regression without bias
#             on the L2-normalized features, minimising mean CE + (λ/n_train)/2 · ‖W‖², λ = 0.0025: cyanure's
#             objective with the lambd / len(embs) scaling of logistic_eval.py and the λ of its README command
#             (the official also subtracts each feature vector's own mean before normalizing; we do not, so the
#             protocol stays "L2-normalized features" across our three methods). Full-batch L-BFGS in float64.
#             Top-1 % on the whole val split, mean ± std over the draws.

SHOTS = (1, 2, 5)


def eval_transform(img_size):
    return T.Compose([T.Resize(round(img_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(MEAN, STD)])


@torch.inference_mode()
def extract_features(vit, folder, device, batch_size=64, workers=0):
    """(n, D) L2-normalized cls features before the final LayerNorm, and the labels (n,)."""
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, num_workers=workers)
    feats, labels = [], []
    vit.eval()
    for imgs, y in loader:
        h = vit.encode(vit.embed(imgs.to(device)), final_norm=False)[:, 0]  # (b, D): cls of the last block, pre-LN
        feats.append(F.normalize(h.float(), dim=-1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train_x, train_y, val_x, val_y, num_classes, k=20, temp=0.07):
    """Weighted k-NN (DINO): each of the k most cosine-similar train features votes for its class with weight
    exp(cos / temp); top-1 accuracy in %."""
    k = min(k, train_x.shape[0])
    sim = val_x @ train_x.T  # (n_val, D) x (D, n_train) -> (n_val, n_train)
    top_sim, top_idx = sim.topk(k, dim=1)  # (n_val, k)
    votes = torch.zeros(val_x.shape[0], num_classes).scatter_add_(1, train_y[top_idx], (top_sim / temp).exp())
    return 100.0 * (votes.argmax(dim=1) == val_y).float().mean().item()


def fit_logistic(x, y, num_classes, lambd, max_iter=200):
    """Multinomial logistic regression, no intercept: W = argmin (1/n) Σ_i CE(W x_i, y_i) + (λ/n)/2 ‖W‖²
    (cyanure 'multiclass-logistic', penalty l2, lambd / n as logistic_eval.py). Full-batch L-BFGS, float64."""
    x, n = x.double(), x.shape[0]
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.T, y) + 0.5 * (lambd / n) * W.pow(2).sum()  # (n, D) x (D, C) -> (n, C)
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach()


def few_shot_top1(train_x, train_y, val_x, val_y, num_classes, shots, draws, lambd, seed):
    """For each draw: n random train images per class (seeded by (seed, n, draw)), fit, top-1 % on all of val."""
    accs, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: on a busy 2-core CPU one thread fits 25x faster (measured: 0.1 vs 2.7 s)
    try:
        for d in range(draws):
            g = torch.Generator().manual_seed(hash((seed, shots, d)) & 0xFFFF_FFFF)
            pick = torch.cat([idx[torch.randperm(len(idx), generator=g)[:shots]]
                              for idx in (torch.nonzero(train_y == c).flatten() for c in range(num_classes))])
            W = fit_logistic(train_x[pick], train_y[pick], num_classes, lambd)
            accs.append(100.0 * ((val_x.double() @ W.T).argmax(dim=1) == val_y).float().mean().item())
    finally:
        torch.set_num_threads(threads)
    return statistics.mean(accs), statistics.pstdev(accs), accs


def load_eval_encoder(cfg):
    """The encoder to evaluate and a description: from an msn/siammae/cmae checkpoint, or a random one."""
    if cfg.ckpt == "random":
        torch.manual_seed(cfg.seed)  # the same init the MSN encoder gets at step 0 (it is built first)
        v = VIT[cfg.model]
        return ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"]), f"random {cfg.model}", cfg
    if not os.path.isfile(cfg.ckpt):
        fail(f"--ckpt {cfg.ckpt} does not exist; pass a checkpoint.pt of msn.py, siammae.py or cmae.py, or random")
    try:
        state = torch.load(cfg.ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"--ckpt {cfg.ckpt} cannot be read as a torch checkpoint ({type(e).__name__}); pass a checkpoint.pt")
    state = state if isinstance(state, dict) else {}
    method, conf = state.get("method"), state.get("config") or {}
    prefix = "target_encoder." if method == "msn" else "encoder."  # MSN evaluates its EMA network (official)
    weights = {k[len(prefix):]: v for k, v in (state.get("model") or {}).items() if k.startswith(prefix)}
    if method not in ("msn", "siammae", "cmae") or not weights or conf.get("model") not in VIT:
        fail(f"--ckpt {cfg.ckpt} is not a checkpoint of msn.py, siammae.py or cmae.py (method {method!r})")
    cfg = dataclasses.replace(cfg, model=conf["model"], patch_size=conf["patch_size"], img_size=conf["img_size"])
    v = VIT[cfg.model]
    vit = ViT(cfg.img_size, cfg.patch_size, v["dim"], v["depth"], v["heads"])
    vit.load_state_dict(weights, strict=True)
    return vit, f"{method} {prefix[:-1]} step {state.get('step')}", cfg


def evaluate(vit, cfg, device, desc, print0=print, write=True):
    """Runs the protocol above on --data (toy images by default); prints one table, writes <out>/eval.json."""
    root = cfg.data or os.path.join(toy_root(), "images")
    train, val = image_folder(root, "train"), image_folder(root, "val")
    if train.classes != val.classes:
        fail(f"{root}/train and {root}/val have different class folders; they must list the same classes")
    C = len(train.classes)
    counts = torch.bincount(torch.tensor(train.targets), minlength=C)
    if counts.min().item() < max(SHOTS):
        fail(f"{root}/train has a class with {counts.min().item()} images; few-shot needs >= {max(SHOTS)} per class")
    t0 = time.perf_counter()
    train.transform = val.transform = eval_transform(cfg.img_size)
    vit = vit.to(device)
    tx, ty = extract_features(vit, train, device, workers=min(cfg.workers, 4))
    vx, vy = extract_features(vit, val, device, workers=min(cfg.workers, 4))
    res = dict(ckpt=cfg.ckpt, encoder=desc, model=cfg.model, patch_size=cfg.patch_size, img_size=cfg.img_size,
               data=root, n_train=len(train), n_val=len(val), classes=C,
               knn_top1=knn_top1(tx, ty, vx, vy, C, cfg.knn_k, cfg.knn_temp))
    for n in SHOTS:
        mean, std, accs = few_shot_top1(tx, ty, vx, vy, C, n, cfg.draws, cfg.lambd, cfg.seed)
        res[f"{n}shot_mean"], res[f"{n}shot_std"], res[f"{n}shot_draws"] = mean, std, accs
    print0(f"eval | {desc} | {cfg.model}/{cfg.patch_size} {cfg.img_size}px | {root}: {len(train)} train / {len(val)} "
           f"val images, {C} classes | {time.perf_counter() - t0:.1f}s\n"
           f"  k-NN top-1 | 1-shot       | 2-shot       | 5-shot\n"
           f"  {res['knn_top1']:10.1f} | " + " | ".join(f"{res[f'{n}shot_mean']:5.1f} ± {res[f'{n}shot_std']:4.1f}"
                                                      for n in SHOTS), flush=True)
    if write:
        os.makedirs(cfg.out, exist_ok=True)
        atomic_write_text(os.path.join(cfg.out, "eval.json"), json.dumps(res, indent=1))
    return res


def toy_root():
    import toydata
    return toydata.ensure_toy_data()


# -----------------------------------------------------------------------------
# Benchmark helpers: FLOPs of one training step, measured matmul rate of this machine

def synthetic_batch(cfg, B, device):
    S, s, N = cfg.img_size, cfg.focal_size, (cfg.img_size // cfg.patch_size) ** 2
    return (torch.randn(B, 3, S, S, device=device), torch.randn(B, 3, S, S, device=device),
            torch.randn(B, cfg.focal_views, 3, s, s, device=device), torch.rand(B, N, device=device))


def train_flops_per_image(model, cfg, device):
    """FLOPs of forward + backward (and the target's forward) for one image with all its views, counted by torch's
    FlopCounterMode on a real step of 2 images (attention through the math kernel so its matmuls are counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(*synthetic_batch(cfg, 2, device))[0].backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state, strict=False)  # leave BatchNorm running statistics as they were
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
    ddp = int(os.environ.get("RANK", -1)) != -1 and not cfg.eval
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
    root = cfg.data or os.path.join(toy_root(), "images")
    folder = image_folder(root, "train")
    sampler = EpochSampler(len(folder), cfg.batch_size, cfg.seed, rank, world)
    if sampler.batches == 0:
        fail(f"{len(folder)} images are fewer than one step needs ({world} x {cfg.batch_size}); lower --batch-size")
    loader = torch.utils.data.DataLoader(MultiViewImages(folder, cfg), batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if cfg.workers else None, persistent_workers=cfg.workers > 0)
    print0(f"data {root}/train: {len(folder)} images, {len(folder.classes)} classes (labels unused), "
           f"{sampler.batches} steps per epoch of {world} x {cfg.batch_size} images")
    return loader, sampler


def bench(cfg, model, device, ctx, dtype, steps=5):
    """Times training steps (forward, backward, AdamW, EMA) on synthetic input; one summary line."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, fused=True)
    batch = synthetic_batch(cfg, cfg.batch_size, device)
    flops = train_flops_per_image(model, cfg, device) * cfg.batch_size
    times = []
    for i in range(steps + 2):  # the first two steps warm up allocators and caches
        sync(device)
        t = time.perf_counter()
        with ctx:
            loss = model(*batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(model.online_parameters(), model.target_parameters(), 0.996)
        sync(device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[2:])
    peak = matmul_rate(device, torch.float32 if dtype == "fp32" else torch.bfloat16)
    print(f"bench | {cfg.model}/{cfg.patch_size} | views 1+1 x {cfg.img_size}px (drop {cfg.patch_drop}) + "
          f"{cfg.focal_views} x {cfg.focal_size}px | batch {cfg.batch_size} | {dt * 1e3:.0f} ms/step (median of {steps}) "
          f"| {cfg.batch_size / dt:.2f} images/s | {flops / dt / 1e9:.1f} GFLOP/s = {100 * flops / dt / peak:.0f}% of "
          f"{dtype} matmul {peak / 1e9:.1f} GFLOP/s (median 2048^3 on {device.type}, {torch.get_num_threads()} threads) "
          f"| {flops / 1e9:.1f} GFLOP/step")


def main(argv=None):
    cfg = parse_config(argv)
    device, ctx, dtype, rank, world, print0 = setup_device(cfg)
    if cfg.eval:
        vit, desc, ecfg = load_eval_encoder(cfg)
        return evaluate(vit, ecfg, device, desc)
    torch.manual_seed(cfg.seed)  # same init on every rank; the data has its own seeds
    model = MSN(cfg).to(device)
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())
    print0(f"MSN {cfg.model}/{cfg.patch_size} encoder {n_enc / 1e6:.2f}M params | head {cfg.hidden_dim}-"
           f"{cfg.hidden_dim}-{cfg.output_dim} {n_head / 1e6:.2f}M | {cfg.num_proto} prototypes | target = EMA copy")
    if cfg.bench:
        return bench(cfg, model, device, ctx, dtype)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not cfg.resume:
        fail(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
    if cfg.resume and not os.path.exists(ckpt_path):
        fail(f"--resume but there is no checkpoint at {ckpt_path}; drop --resume or point --out at the run's folder")
    loader, sampler = make_loader(cfg, rank, world, device, print0)

    # optimizer and schedules (official init_opt: AdamW with torch's default betas)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=0.0, fused=True)  # fused: 3x faster than foreach on CPU too
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    eff_batch = cfg.batch_size * cfg.accum * world
    scale = cfg.blr * eff_batch / 256 / cfg.lr if cfg.blr > 0 else 1.0  # MSN: 1 (lr is not batch-scaled)
    peak_lr, start_lr, final_lr = cfg.lr * scale, cfg.start_lr * scale, cfg.final_lr * scale
    steps_per_epoch = sampler.batches // cfg.accum
    if steps_per_epoch == 0:
        fail(f"--accum {cfg.accum} exceeds the {sampler.batches} batches of an epoch; lower --accum or --batch-size")
    total = cfg.max_steps or round(cfg.epochs * steps_per_epoch)
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    horizon = int(cfg.horizon * total)
    print0(f"effective batch {eff_batch} images ({world} x {cfg.batch_size} x accum {cfg.accum}) | lr {start_lr:.2e} -> "
           f"{peak_lr:.2e} -> {final_lr:.2e} ({'blr-scaled' if cfg.blr > 0 else 'not batch-scaled, as MSN'}) | "
           f"{total} steps, {warmup} warm-up, schedules over {horizon} | wd {cfg.weight_decay} -> "
           f"{cfg.final_weight_decay} on {sum(p.numel() for p in groups[0]['params']) / 1e6:.2f}M params, off on "
           f"{sum(p.numel() for p in groups[1]['params']) / 1e3:.1f}K + prototypes | patch drop {cfg.patch_drop}: "
           f"{num_kept((cfg.img_size // cfg.patch_size) ** 2, cfg.patch_drop)} of {(cfg.img_size // cfg.patch_size) ** 2}"
           f" tokens kept")
    step = load_checkpoint(ckpt_path, model, optimizer, scaler, cfg) if cfg.resume else 0
    if cfg.resume:
        print0(f"resumed from {ckpt_path} at step {step}")
    print0("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    if cfg.final_eval and rank == 0 and step == 0:
        evaluate(model.target_encoder, cfg, device, "untrained (step 0)", print0, write=False)
    flops_per_image = train_flops_per_image(model, cfg, device)  # before DDP, so its backward is not all-reduced
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    stop = {"requested": False}  # Ctrl-C: finish the step, checkpoint, exit (a second Ctrl-C kills)
    def request_stop(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, request_stop)

    K = cfg.num_proto
    t_last, imgs_since, sums, n_acc, last_ckpt = time.perf_counter(), 0, torch.zeros(5), 0, "none yet"
    model.train()
    while step < total:
        sampler.epoch, first = divmod(step, steps_per_epoch)  # resume mid-epoch: same order, same samples
        sampler.start_batch = first * cfg.accum
        batches = iter(loader)
        for _ in range(min(steps_per_epoch - first, total - step)):
            # 1) schedules for this step: pure functions of the step (official shapes, 1.25x horizon)
            lr = lr_at(step, warmup, horizon, start_lr, peak_lr, final_lr)
            wd = cosine_at(step, horizon, cfg.weight_decay, cfg.final_weight_decay)
            m = linear_at(step, horizon, cfg.momentum, cfg.final_momentum)
            for g in optimizer.param_groups:
                g["lr"] = lr  # official: one lr for all groups, the prototypes' too
                if g["scheduled"]:
                    g["weight_decay"] = wd
            # 2) forward / backward with accumulation
            t_data, terms, usage = 0.0, torch.zeros(4, device=device), torch.zeros(K, device=device)
            for micro in range(cfg.accum):
                t0 = time.perf_counter()
                target, anchor, focal, noise = to_model_input(next(batches), device)
                t_data += time.perf_counter() - t0
                sync_grads = micro == cfg.accum - 1 or world == 1
                with (nullcontext() if sync_grads else model.no_sync()), ctx:
                    loss, st = model(target, anchor, focal, noise)
                scaler.scale(loss / cfg.accum).backward()
                terms += torch.stack([loss.detach(), st["ce"], st["memax"], st["ent_mean"]]) / cfg.accum
                usage += torch.bincount(st["assign"], minlength=K)
            # 3) clip (encoder + head, not the prototypes: official) and optimizer step
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.online_parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            # 4) EMA of the target network (encoder + head)
            ema_update(raw_model.online_parameters(), raw_model.target_parameters(), m)
            step += 1
            imgs_since += eff_batch
            # 5) NaN guard, Ctrl-C and statistics, agreed across ranks so that no rank waits for another
            flags = torch.cat([terms, torch.tensor([float(stop["requested"])], device=device), usage])
            if world > 1:
                dist.all_reduce(flags)
            flags = flags.cpu()
            if not math.isfinite(flags[0].item()):
                print0(f"error: loss is {flags[0].item()} at step {step}; lower --lr or use --dtype fp32 "
                       f"(last good checkpoint: {last_ckpt})", file=sys.stderr)
                raise SystemExit(1)
            sums, n_acc = sums + torch.cat([flags[:4] / world, (flags[5:] > 0).sum().view(1)]), n_acc + 1
            # 6) log
            if step % cfg.log_every == 0 or step == total:
                sync(device)
                dt = time.perf_counter() - t_last
                ms, rate = 1e3 * dt / (imgs_since / eff_batch), imgs_since / dt
                loss_v, ce, reg, ent_mean, protos = (sums / n_acc).tolist()  # means over the interval and the ranks
                eta = (total - step) * ms / 1e3 / 3600
                print0(f"step {step:06d}/{total} ({100 * step / total:.1f}%) | loss {loss_v:.4f} (ce {ce:.4f}, me-max "
                       f"{reg:.4f}) | H(p̄) {ent_mean:.3f}/{math.log(K):.3f} | protos {protos:.0f}/{K} | lr {lr:.2e} | "
                       f"wd {wd:.3f} | m {m:.5f} | {ms:.0f} ms/step (data {1e3 * t_data:.0f}) | {rate:.1f} img/s | "
                       f"{flops_per_image * rate / 1e9:.1f} GFLOP/s | eta {eta:.2f}h", flush=True)
                if rank == 0:
                    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(dict(step=step, epoch=step / steps_per_epoch, loss=loss_v, ce=ce,
                                                memax=reg, ent_mean=ent_mean, protos_in_use=protos, lr=lr, wd=wd,
                                                momentum=m, ms_per_step=ms, img_per_s=rate)) + "\n")
                t_last, imgs_since, sums, n_acc = time.perf_counter(), 0, torch.zeros(5), 0
            # 7) checkpoints
            if step % cfg.ckpt_every == 0 or step == total or flags[4].item() > 0:
                if rank == 0:
                    save_checkpoint(ckpt_path, raw_model, optimizer, scaler, step, cfg)
                last_ckpt = f"{ckpt_path} at step {step}"
            if flags[4].item() > 0:
                print0(f"interrupted: checkpoint saved at step {step}; continue with --resume")
                raise SystemExit(130)
    print0(f"done: {step} steps; checkpoint {ckpt_path}")
    if cfg.final_eval and rank == 0:
        evaluate(raw_model.target_encoder, cfg, device, f"msn target_encoder step {step}", print0)
        raw_model.train()
    if world > 1:
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
