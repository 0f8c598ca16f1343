"""
Label propagation with a frozen ViT on the three benchmarks of SiamMAE's Table 1: DAVIS-2017 object masks (J&F,
scored exactly as the official toolkit scores it), JHMDB pose keypoints (PCK) and VIP human parts (mIoU).

The protocol is DINO's `eval_video_segmentation.py` (Caron et al. 2021, arXiv:2104.14294), which the SiamMAE paper
(Gupta et al. 2023, arXiv:2305.14344, Table 4b) and the other ViT self-supervised papers report: the first-frame
annotation is carried through the video by k-nearest-neighbour matching of patch features, with a FIFO queue of past
predictions as extra context. The DAVIS metric is `davis2017-evaluation` (J region similarity, F boundary measure, their
Mean / Recall / Decay), re-implemented with numpy + OpenCV so that it prints the same numbers to the last decimal.
JHMDB and VIP go through the same propagation; what they label and how they are scored follows the CRW line
(ajabri/videowalk `code/data/jhmdb.py`, `code/eval/eval_pck.py`, `code/eval/eval_vip.py`; Liusifei/UVC; xvjiarui/VFS):
15 joints as Gaussian heatmaps, PCK relative to the person's box; 20 part classes, mIoU over the annotated frames.

    python propagate.py --ckpt random                        # toy DAVIS (generated once), untrained ViT-S/16
    python propagate.py --ckpt pixels                        # toy DAVIS, raw colour patches as features
    python propagate.py --ckpt out/siammae/checkpoint.pt --davis DAVIS/   # DAVIS-2017 val, SiamMAE Table 4b
    python propagate.py --ckpt dino_deitsmall16_pretrain.pth --davis DAVIS/ --protocol dino   # DINO's own run
    python propagate.py --task jhmdb --ckpt ... --jhmdb JHMDB/   # split-1 test videos, PCK@0.1 / 0.2 (needs scipy)
    python propagate.py --task vip --ckpt ... --vip VIP_Fine/    # the 50 val videos, mIoU over 20 classes
    python propagate.py --eval-only --results DIR --davis DAVIS/   # score any DAVIS results folder, no model
    python propagate.py --bench                              # timings without data

DAVIS results land in OUT/<seq>/<frame>.png (indexed, DAVIS palette, original size: what the toolkit reads) and
OUT/global_results-<set>.csv, OUT/per-sequence_results-<set>.csv (the toolkit's columns and format); JHMDB in
OUT/<class>/<video>.csv (predicted keypoints, pixels) with OUT/pck.csv and OUT/per-video_pck.csv; VIP in
OUT/<video>/<frame>.png with OUT/miou.csv and OUT/per-video_miou.csv. Without a data root each task runs on its toy set.
`--ckpt` takes a checkpoint of siammae.py / msn.py / cmae.py, or any plain ViT in timm / DINO / MAE naming (the
architecture is read off the tensor shapes), or one of the two baselines `random` and `pixels`.

Checked against the originals (scratch copies, not part of this repo), 2026-11-23 on a 2-core CPU: with a random
ViT-T/16 saved as a DINO checkpoint, DINO's eval_video_segmentation.py (run on CPU) and `--protocol dino` write 60 of
60 toy-DAVIS PNGs bit-identical at 480p, and davis2017-evaluation (scikit-image) gives the same J&F (0.884) and
byte-identical CSVs. (At other sizes a near-tied top-k choice can flip with the summation order, as on two GPUs.)
Speed on 2 idle cores (`python propagate.py --bench`): propagation 0.22 s/frame at 480p (grid 30x52, queue 20,
radius 20, top-k 7; DINO's label_propagation ~0.7 s plus 5.7 s per video to build its mask, ours 0.01 s); the whole
run = ViT-S/16 forward (0.73 s/frame) + 0.16 s/frame; J and F of one 480x854 object-frame 1.1 ms (toolkit 3.5-7.6 ms).
"""
import argparse
import csv
import dataclasses
import glob
import inspect
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (--short-side for short_side); defaults = SiamMAE Table 4b on DAVIS

@dataclass
class Config:
    task: str = "davis"  # davis (object masks, J&F) | jhmdb (15 pose keypoints, PCK) | vip (20 human parts, mIoU)
    ckpt: str = ""  # checkpoint path, or `random` (untrained ViT of --model) or `pixels` (raw RGB patches)
    davis: str = ""  # DAVIS-2017 root (JPEGImages/, Annotations/, ImageSets/); empty = toy DAVIS from toydata.py
    set: str = "val"  # which ImageSets/2017/<set>.txt to run; the published tables use val (30 videos, 59 objects)
    jhmdb: str = ""  # JHMDB root (Rename_Images/, joint_positions/, splits/); empty = toy JHMDB from toydata.py
    jhmdb_split: str = ""  # dir of <class>_test_split1.txt ("<v>.avi 2" = test) or list of <class>/<v>; empty: splits/
    vip: str = ""  # VIP_Fine root (Images/, Annotations/Category_ids/, lists/); empty = toy VIP from toydata.py
    vip_list: str = ""  # videos, one name a line; empty = <vip>/lists/val_videos.txt (the 50 val videos)
    out: str = ""  # results folder; empty = out/<task>/<ckpt name>-<protocol>
    eval_only: bool = False  # only score an existing results folder (--results) against --davis
    results: str = ""  # the results folder for --eval-only: <results>/<seq>/<frame>.png
    protocol: str = "siammae"  # knob preset: siammae (Table 4b, per task) | dino (eval_video_segmentation.py, DAVIS)
    topk: int = 7  # labels come from the k most similar source patches (SiamMAE Table 4b: 7; DINO script: 5)
    queue: int = 20  # past predicted frames kept as context besides frame 0 (SiamMAE: 20; DINO: 7)
    radius: int = 20  # square window |Δrow|,|Δcol| <= r on the patch grid; 0 = whole frame (SiamMAE 20; DINO 12)
    temperature: float = 0.1  # affinity exp(<f_t, f_s> / τ) (DINO's 0.1; SiamMAE does not state it)
    sigma: float = 0.5  # JHMDB: σ of each joint's Gaussian heatmap, in feature cells (CRW / UVC: 0.5)
    keypoint_topk: int = 3  # JHMDB: keypoint = value-weighted mean of its heatmap's top k cells (CRW: 3; 1 = argmax)
    short_side: int = 480  # frames resized so the short side is this (DINO: 480, the "480p" of DAVIS)
    size_multiple: int = 64  # the long side is floored to a multiple of this (DINO: 64, so 854 -> 832)
    model: str = "vit_small"  # architecture of `random`; for a checkpoint it is read from the shapes
    patch_size: int = 0  # 0 = from the checkpoint (random / pixels: 16); set it to check a checkpoint
    heads: int = 0  # 0 = from the width (192:3, 384:6, 768:12, 1024:16); needed for other widths
    checkpoint_key: str = ""  # sub-dict of a plain checkpoint; empty = teacher, target_encoder, model, state_dict
    seed: int = 0  # seeds the `random` encoder
    batch: int = 8  # frames per forward pass (features are batched over frames; memory grows with it)
    precision: str = "bf16"  # bf16 autocast for the forward pass on CUDA (CPU: fp32); fp32 = what DINO's script ran
    device: str = "auto"  # auto = cuda if available else cpu
    overlay: bool = False  # also write OUT/overlays/<video>.png (strip) and .mp4: masks blended, JHMDB skeletons drawn
    bench: bool = False  # time propagation, the ViT-S/16 forward pass and the metric at 480p, without data


PROTOCOLS = {  # (--task, --protocol) presets, applied before explicit flags
    ("davis", "siammae"): dict(topk=7, queue=20, radius=20, temperature=0.1),  # SiamMAE Table 4b (DAVIS row)
    # DINO's script defaults; its features are fp32 (no autocast), so fp32 here makes the run the same computation
    ("davis", "dino"): dict(topk=5, queue=7, radius=12, temperature=0.1, precision="fp32"),
    # SiamMAE Table 4b (JHMDB row). Frame size is not stated; the CRW line feeds 320 x 320 (its --cropSize), which
    # squashes JHMDB's 320 x 240; short side 320 keeps the aspect ratio (x16, not x64: 427 -> 416, not 384)
    ("jhmdb", "siammae"): dict(topk=7, queue=20, radius=20, temperature=0.1, short_side=320, size_multiple=16),
    # SiamMAE Table 4b (VIP row). Frame size is not stated; UVC's VIP command resizes to 560 x 560 (--scale_size)
    ("vip", "siammae"): dict(topk=10, queue=20, radius=8, temperature=0.1, short_side=560, size_multiple=64),
}
TOY = {  # no data root: the toy set's frames stay at their native size, no upscaling
    "davis": dict(short_side=160, size_multiple=16),  # toy DAVIS frames are 160 px high
    "jhmdb": dict(short_side=240, size_multiple=16),  # toy JHMDB frames are 320 x 240, as JHMDB's
    "vip": dict(short_side=240, size_multiple=16),  # toy VIP frames are 320 x 240
}


def parse_config(argv):
    """Builds the argparse parser from Config's fields; precedence: defaults < --protocol preset < toy < flags."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    # the help text of a flag is the comment beside its field above: one place to say what it is and why to change it
    notes = dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        flag, note = "--" + f.name.replace("_", "-"), notes.get(f.name, "").replace("%", "%%")
        if f.type is bool or f.type == "bool":
            ap.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=note)
        else:
            ap.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=f"{note} [{f.default!r}]")
    given = vars(ap.parse_args(argv))
    cfg = Config()
    task, protocol = given.get("task", cfg.task), given.get("protocol", cfg.protocol)
    if task not in TOY:
        die(f"unknown --task {task}; use one of {', '.join(TOY)}")
    if (task, protocol) not in PROTOCOLS:
        die(f"no --protocol {protocol} for --task {task}; use one of {', '.join(p for t, p in PROTOCOLS if t == task)}")
    preset = dict(PROTOCOLS[task, protocol])
    if not given.get(task) and not given.get("bench"):  # no --davis / --jhmdb / --vip: the toy set of the task
        preset.update(TOY[task])
    for k, v in preset.items():
        setattr(cfg, k, v)
    for k, v in given.items():
        setattr(cfg, k, v)
    return cfg, preset, given


def die(msg):
    """User-facing errors: one line that names the fix, exit code 2 (argparse's code for bad usage)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# ViT (timm / DINO / MAE parameter names, so every public ViT loads with strict=True)
# B batch, N patches per frame, D width, H heads, Dh = D / H, h x w patch grid, p patch size

VIT = {  # width / depth / heads; the heads of a checkpoint are looked up here by its width
    "vit_tiny": dict(dim=192, depth=12, heads=3),  # 5.5M params
    "vit_small": dict(dim=384, depth=12, heads=6),  # 21.7M params
    "vit_base": dict(dim=768, depth=12, heads=12),  # 85.8M params
    "vit_large": dict(dim=1024, depth=24, heads=16),  # 303M params
}
HEADS_BY_WIDTH = {v["dim"]: v["heads"] for v in VIT.values()}


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # qkv bias on, as in MAE / DINO / timm
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √Dh) v: (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, nn.GELU's default, as timm / DINO / MAE


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))  # pre-norm residuals
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim, p):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=p, stride=p)


class ViT(nn.Module):
    """Plain ViT encoder; `features` returns the last block's tokens after the final LayerNorm, cls dropped."""

    def __init__(self, dim, depth, heads, patch_size, grid, hidden=None):
        super().__init__()
        self.patch_size, self.grid = patch_size, grid  # grid = side of the square token grid it was trained on
        self.patch_embed = PatchEmbed(dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden or 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_embed(self, h, w, Himg, Wimg):
        """REFERENCE §4.2, DINO `interpolate_pos_encoding`: bicubic resize of the trained g x g table by the scale
        factor ((h + 0.1)/g, (w + 0.1)/g). A scale factor, not a target size: PyTorch maps output pixels through
        the given factor, and `size=` would change the features measurably. The +0.1 guards the floor of the output
        size against float error (DINO issue #8). DINO returns the table untouched when the grid already matches
        and the image is square; so do we (interpolating by ~1.007 would not be the identity)."""
        g, D = self.grid, self.pos_embed.shape[-1]
        if h * w == g * g and Himg == Wimg:
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        table = F.interpolate(table, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")  # (1, D, h, w)
        assert table.shape[-2:] == (h, w), f"pos-embed interpolation gave {tuple(table.shape[-2:])}, wanted {(h, w)}"
        table = table.permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, N, D), row-major like the patch tokens
        return torch.cat([self.pos_embed[:, :1], table], dim=1)  # cls slot unchanged: (1, 1 + N, D)

    def features(self, x):
        """x (B, 3, Himg, Wimg) normalized RGB -> (B, h, w, D) patch features (REFERENCE §4.3)."""
        B, _, Himg, Wimg = x.shape
        h, w = Himg // self.patch_size, Wimg // self.patch_size  # the conv drops a remainder, as in DINO
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_embed(h, w, Himg, Wimg)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, 1:]  # last block after the final LayerNorm, cls dropped: (B, N, D)
        return x.reshape(B, h, w, -1)  # (B, h, w, D)


class PixelFeatures(nn.Module):
    """The `pixels` baseline: each p x p patch's normalized RGB values, flattened, are its feature (p²·3 dims)."""

    def __init__(self, patch_size):
        super().__init__()
        self.patch_size = patch_size

    def features(self, x):
        B, C, Himg, Wimg = x.shape
        p = self.patch_size
        h, w = Himg // p, Wimg // p
        x = x[:, :, :h * p, :w * p].reshape(B, C, h, p, w, p)  # (B, 3, h, p, w, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h, w, p * p * C)  # (B, h, w, P), channel fastest as patchify


def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D sin-cos table (REFERENCE §0), float64 then float32: (1, 1 + grid², dim), cls row zeros."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # ω_k = 10000^(-k / (D/4))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    ox, oy = np.outer(xs.reshape(-1), omega), np.outer(ys.reshape(-1), omega)  # (N, D/4) each
    table = np.concatenate([np.sin(ox), np.cos(ox), np.sin(oy), np.cos(oy)], axis=1)  # column (x) half first
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table])[None].astype(np.float32))


def random_vit(name, patch_size, seed):
    """The `random` baseline: our encoder at step 0 (MAE init: xavier Linear / patch conv, sin-cos pos-embed)."""
    torch.manual_seed(seed)
    model = ViT(**VIT[name], patch_size=patch_size, grid=224 // patch_size)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: xavier on the flattened (out, in·p·p) view
    nn.init.normal_(model.cls_token, std=0.02)
    model.pos_embed.data.copy_(sincos_pos_embed(model.pos_embed.shape[-1], model.grid))
    return model


# -----------------------------------------------------------------------------
# Loading checkpoints: ours (method + encoder. prefix), timm / DINO / MAE / MSN naming; shapes give the architecture

VIT_KEYS = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def load_state(path, key):
    """Any supported checkpoint -> (plain ViT state dict, description)."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found; pass a file, `random` or `pixels`")
    try:  # DINO / MAE full checkpoints pickle an argparse.Namespace; allow exactly that class, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"cannot read {path} as a torch checkpoint ({type(e).__name__}); pass a .pt/.pth state dict")
    if not isinstance(obj, dict):
        die(f"{path} holds a {type(obj).__name__}, not a state dict; pass a ViT checkpoint")
    if "method" in obj and isinstance(obj.get("model"), dict):  # ours: siammae.py / msn.py / cmae.py
        prefix = "target_encoder." if obj["method"] == "msn" else "encoder."  # MSN evaluates the EMA target
        sd = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
        if not sd:
            die(f"{path}: a {obj['method']} checkpoint without {prefix}* weights; pass a checkpoint of our trainers")
        return sd, f"{obj['method']} checkpoint, {prefix[:-1]}, step {obj.get('step', '?')}"
    keys = [key] if key else ["teacher", "target_encoder", "model", "state_dict"]
    for k in keys:
        if isinstance(obj.get(k), dict):
            obj, where = obj[k], f"['{k}']"
            break
    else:
        if key:
            die(f"{path} has no '{key}' entry (it has: {', '.join(map(str, list(obj)[:6]))}); fix --checkpoint-key")
        where = ""
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        for pre in ("module.", "backbone."):  # DDP and DINO's multi-crop wrapper prefixes
            k = k[len(pre):] if k.startswith(pre) else k
        sd[k] = v
    return sd, f"plain ViT state dict{where}"


def build_encoder(cfg):
    """--ckpt -> (encoder module with .features and .patch_size, one-line description)."""
    if cfg.ckpt == "pixels":
        p = cfg.patch_size or 16
        return PixelFeatures(p), f"pixels baseline, {p}x{p} patches, {p * p * 3}-d features"
    if cfg.ckpt == "random":
        if cfg.model not in VIT:
            die(f"unknown --model {cfg.model}; use one of {', '.join(VIT)}")
        p = cfg.patch_size or 16
        model = random_vit(cfg.model, p, cfg.seed)
        return model, f"random {cfg.model}/{p} (MAE init, seed {cfg.seed})"
    if not cfg.ckpt:
        die("no --ckpt; pass a checkpoint path, `random` or `pixels` (or --eval-only --results DIR)")
    sd, what = load_state(cfg.ckpt, cfg.checkpoint_key)
    kept = {k: v for k, v in sd.items() if k.startswith(VIT_KEYS)}
    dropped = sorted({k.split(".")[0] for k in sd if k not in kept})  # heads, decoders, mask tokens, prototypes
    if "patch_embed.proj.weight" not in kept or "pos_embed" not in kept:
        die(f"{cfg.ckpt} is not a ViT (no patch_embed.proj.weight / pos_embed; keys start with "
            f"{', '.join(sorted({k.split('.')[0] for k in sd})[:6])}); pass a ViT checkpoint")
    w = kept["patch_embed.proj.weight"]  # (D, 3, p, p)
    D, p = w.shape[0], w.shape[-1]
    depth = len({k.split(".")[1] for k in kept if k.startswith("blocks.")})
    n = kept["pos_embed"].shape[1] - 1
    g = math.isqrt(n)
    heads = cfg.heads or HEADS_BY_WIDTH.get(D)
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != p or g * g != n or depth == 0:
        die(f"{cfg.ckpt}: shapes match no ViT (patch_embed {tuple(w.shape)}, {n} position slots, {depth} blocks); "
            f"pass a square-grid RGB ViT")
    if heads is None:
        die(f"{cfg.ckpt}: width {D} matches no known ViT (192, 384, 768, 1024); pass --heads")
    if cfg.patch_size and cfg.patch_size != p:
        die(f"{cfg.ckpt} has patch size {p}, not --patch-size {cfg.patch_size}; drop the flag or fix the checkpoint")
    hidden = kept["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in kept else 4 * D
    model = ViT(D, depth, heads, p, g, hidden)
    try:
        model.load_state_dict(kept, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        die(f"{cfg.ckpt} does not load into a ViT-{D}/{depth}/{heads}/p{p} ({first}); check --heads / the file")
    name = next((k for k, v in VIT.items() if v == dict(dim=D, depth=depth, heads=heads)), f"vit_{D}d{depth}")
    note = f", ignored {', '.join(dropped)}" if dropped else ""
    return model, f"{what}: {name}/{p}, trained grid {g}x{g}{note}"


# -----------------------------------------------------------------------------
# Frames and labels on disk (REFERENCE §4.1, §4.4, §4.11)

MEAN, STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)  # DINO's script: ImageNet values, 0.228 (sic) for red


def davis_palette():
    """The DAVIS / PASCAL VOC colour map: bits of the id spread over the high bits of R, G, B (768 bytes)."""
    ids = np.arange(256)
    pal = np.zeros((256, 3), np.uint8)
    for j in range(8):  # bit 3j+c of the id goes to bit 7-j of channel c
        for c in range(3):
            pal[:, c] |= (((ids >> (3 * j + c)) & 1) << (7 - j)).astype(np.uint8)
    return pal


PALETTE = davis_palette()


def save_indexed_png(path, labels):
    """Mode-P PNG with the DAVIS palette, written under a temp name then renamed: never half-written."""
    im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
    im.putpalette(PALETTE.reshape(-1).tolist())
    tmp = path + ".tmp"
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def protocol_size(H, W, short, multiple):
    """REFERENCE §4.1, DINO `read_frame`: short side -> `short`, long side -> floor to a multiple of `multiple`.
    (For square frames DINO's label reader swaps the two sides; DAVIS has none, we use the frame rule for both.)"""
    if H > W:
        return int(((short * H) / W) // multiple * multiple), short
    return short, int(((short * W) / H) // multiple * multiple)


def read_frame(path, size):
    """-> (3, th, tw) float32 tensor normalized as DINO does, and the original BGR frame (for overlays)."""
    bgr = cv2.imread(path)
    if bgr is None:
        die(f"cannot read frame {path}; re-extract JPEGImages")
    img = cv2.resize(bgr, (size[1], size[0]))  # bilinear on uint8, cv2's default, as DINO
    x = torch.from_numpy(np.ascontiguousarray(img.astype(np.float32)[:, :, ::-1] / 255.0).transpose(2, 0, 1))
    for c in range(3):  # (x - mean) / std per channel, in DINO's order of operations
        x[c].sub_(MEAN[c]).div_(STD[c])
    return x, bgr


def first_label(path, grid):
    """REFERENCE §4.4: original annotation, and its one-hot on the patch grid (C = max id + 1 after the resize)."""
    ann = read_index_png(path, "first-frame annotation")
    h, w = grid
    small = np.array(Image.fromarray(ann).resize((w, h), Image.NEAREST))  # PIL nearest, straight to the grid
    # 255 (void) in a first frame would become a 256th class in DINO's script; it is "not an object": background
    small = torch.from_numpy(np.where(small == 255, 0, small).astype(np.int64))
    return ann, F.one_hot(small, int(small.max()) + 1).float()  # (h, w, C)


def list_sequences(root, subset):
    """Checks the DAVIS layout up front (nothing is written before this passes) -> [(seq, [frame paths])]."""
    for sub in ("JPEGImages", "Annotations", "ImageSets"):
        if not os.path.isdir(os.path.join(root, sub)):
            die(f"{root} has no {sub}/ folder; pass the DAVIS-2017 root with --davis")
    listing = os.path.join(root, "ImageSets", "2017", f"{subset}.txt")
    if not os.path.isfile(listing):
        die(f"{listing} not found; pass an existing --set (train, val) or fix --davis")
    seqs = [s.strip() for s in open(listing) if s.strip()]
    out = []
    for seq in seqs:
        frames = sorted(glob.glob(os.path.join(root, "JPEGImages", "480p", seq, "*.jpg")))
        if not frames:
            die(f"no frames in {root}/JPEGImages/480p/{seq}/; fix the folder or ImageSets/2017/{subset}.txt")
        ann0 = os.path.join(root, "Annotations", "480p", seq, os.path.basename(frames[0])[:-4] + ".png")
        if not os.path.isfile(ann0):
            die(f"sequence {seq} has no first-frame annotation {ann0}; semi-supervised propagation starts from it")
        out.append((seq, frames))
    return out


# -----------------------------------------------------------------------------
# Propagation (REFERENCE §4.5-§4.10)
# S context frames (frame 0 + the queue), Tq target patches of one band, M candidate sources of that band, C classes.
# The context is stored column-major, (w, S, h, ·): a band of columns of ALL context frames is then one contiguous
# block, so its affinities are one matrix product and its top-k one call, with no copies.

def neighbourhood_bands(h, w, r, device, band=4):
    """REFERENCE §4.7 built once per grid size with tensor ops: source (p, q) may feed target (i, j) iff |p - i| <= r
    and |q - j| <= r (DINO's square window; r = 0 means no restriction, as in DINO's `if size > 0`).
    The targets are split into bands of `band` columns; a band's sources are its columns ± r, so the affinity is never
    computed where the window forbids it (a third less work at 30x52, r = 20). Returns [(c0, c1, s0, s1, forbidden)]:
    targets = columns [c0, c1), sources = columns [s0, s1), forbidden (Tq, s1 - s0, 1, h) bool, broadcast over S."""
    if r == 0 or r >= w - 1:  # every band would need every column: one band, no saving to be had
        band = w
    bands = []
    for c0 in range(0, w, band):
        c1 = min(w, c0 + band)
        s0, s1 = (0, w) if r == 0 else (max(0, c0 - r), min(w, c1 + r))
        tc, tr = torch.meshgrid(torch.arange(c0, c1), torch.arange(h), indexing="ij")  # target (column, row)
        tc, tr = tc.reshape(-1, 1, 1, 1), tr.reshape(-1, 1, 1, 1)  # (Tq, 1, 1, 1), Tq = (c1 - c0)·h
        sc, sr = torch.arange(s0, s1).view(1, -1, 1, 1), torch.arange(h).view(1, 1, 1, -1)  # source column, row
        forbidden = ((tc - sc).abs() > r) | ((tr - sr).abs() > r)  # (Tq, s1 - s0, 1, h)
        bands.append((c0, c1, s0, s1, (forbidden & (r > 0)).to(device)))
    return bands


def topk_affinity(logits, k, temperature):
    """REFERENCE §4.6 + §4.8: A = exp(<f_t, f_s> / τ); per target, entries strictly below the k-th largest are zeroed
    (ties with it are kept, as DINO's `aff[aff < tk_val_min] = 0` keeps them), the rest divided by their sum. The top-k
    runs over all context frames jointly, since they share the source axis. exp is increasing, so ranking the logits
    ranks A; only the kept entries are exponentiated, shifted by the row max (the same normalized weights, without
    overflow at small τ). logits (Tq, M), -inf outside the window -> weights, source ids: (Tq, n), n = k bar ties."""
    v, ids = logits.topk(min(k + 1, logits.shape[1]), dim=1)  # one extra, to see a tie at the k-th: (Tq, k + 1)
    kth = v[:, :k][:, -1:]  # k-th largest logit per target (the last one if fewer exist): (Tq, 1)
    if v.shape[1] > k and (v[:, k:] == kth).any():  # a tie at the threshold: widen to every entry >= it
        n = int((logits >= kth.clamp(min=torch.finfo(logits.dtype).min)).sum(dim=1).max())  # -inf counts nothing
        v, ids = logits.topk(n, dim=1)
    weights = torch.exp((v - v[:, :1]) / temperature)  # A up to a per-target factor that the normalization cancels
    weights = weights * (v >= kth)  # zero what is strictly below the k-th largest
    return weights / weights.sum(dim=1, keepdim=True), ids


def propagate_step(target, ctx_feats, ctx_labels, bands, k, temperature):
    """Soft label of one target frame from its context (REFERENCE §4.6-§4.9): Σ_s weight(t, s) · label(s).
    target (w, h, D) and ctx_feats (w, S, h, D) L2-normalized; ctx_labels (w, S, h, C) -> soft label (w, h, C)."""
    w, S, h, D = ctx_feats.shape
    C = ctx_labels.shape[-1]
    out = target.new_empty(w, h, C)
    for c0, c1, s0, s1, forbidden in bands:
        q = target[c0:c1].reshape(-1, D)  # this band's targets: (Tq, D)
        keys = ctx_feats[s0:s1].reshape(-1, D)  # their candidate sources, all context frames: (M, D)
        logits = q @ keys.T  # (Tq, D) x (D, M) -> (Tq, M): cosine similarities
        logits.view(len(q), s1 - s0, S, h).masked_fill_(forbidden, float("-inf"))  # §4.7 neighbourhood
        weights, ids = topk_affinity(logits, k, temperature)  # (Tq, n) each
        src = ctx_labels[s0:s1].reshape(-1, C)[ids]  # labels of the kept sources: (Tq, n, C)
        out[c0:c1] = (weights.unsqueeze(-1) * src).sum(1).view(c1 - c0, h, C)  # §4.9
    return out


def labels_to_pixels(soft, patch_size, size):
    """REFERENCE §4.10 (DINO `norm_mask`, argmax, resize): soft (C, h, w) -> uint8 ids (H, W) at the original size."""
    up = F.interpolate(soft[None], scale_factor=patch_size, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]  # (C, h·p, w·p)
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)  # (C, 1, 1)
    # min-max per channel where its max > 0; a constant positive channel gives 0/0 = NaN there exactly as in DINO's
    # loop, and torch.max, as DINO calls it, returns the NaN's index
    up = torch.where(hi > 0, (up - lo) / (hi - lo), up)
    ids = torch.max(up, dim=0).indices.to(torch.uint8).cpu().numpy()  # (h·p, w·p)
    return np.array(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))  # PIL nearest, as DINO


def blend(bgr, ids, alpha=0.5):
    """Overlay picture: object pixels mixed half-half with their palette colour, as the toolkit's overlay helper."""
    colour = PALETTE[ids][:, :, ::-1].astype(np.float32)  # RGB palette -> BGR like the frame
    out = bgr.astype(np.float32)
    fg = ids > 0
    out[fg] = alpha * out[fg] + (1 - alpha) * colour[fg]
    out = out.round().astype(np.uint8)
    for k in np.unique(ids[fg]):  # outlines in the object's colour: where a mask leaks or shrinks is what to look at
        contours = cv2.findContours((ids == k).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)[0]
        cv2.drawContours(out, contours, -1, PALETTE[k][::-1].tolist(), 1)
    return out


class Overlay:
    """--overlay pictures of one sequence: every frame's picture into <dir>/<seq>.mp4, six of them side by side in
    <dir>/<seq>.png (240 px high), so a person can see where the propagation fails."""

    def __init__(self, folder, seq, n_frames, H, W):
        self.png = os.path.join(folder, seq + ".png")
        os.makedirs(os.path.dirname(self.png), exist_ok=True)  # JHMDB names are <class>/<video>
        self.video = cv2.VideoWriter(os.path.join(folder, seq + ".mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
        self.at = set(np.linspace(0, n_frames - 1, min(6, n_frames)).round().astype(int).tolist())
        self.strip, self.size = [], (round(W * 240 / H), 240)

    def add(self, t, pic):
        self.video.write(pic)
        if t in self.at:
            self.strip.append(cv2.resize(pic, self.size, interpolation=cv2.INTER_AREA))

    def close(self):
        self.video.release()
        cv2.imwrite(self.png[:-4] + ".tmp.png", np.concatenate(self.strip, axis=1))
        os.replace(self.png[:-4] + ".tmp.png", self.png)


def frame_geometry(path, cfg, patch_size):
    """A video's sizes, read off its first frame: original (H, W), protocol size (th, tw) and patch grid (h, w)."""
    first = cv2.imread(path)
    if first is None:
        die(f"cannot read frame {path}; re-extract the video's frames")
    H, W = first.shape[:2]
    size = protocol_size(H, W, cfg.short_side, cfg.size_multiple)  # (th, tw) fed to the encoder
    return (H, W), size, (size[0] // patch_size, size[1] // patch_size)


def propagate_frames(encoder, frames, first, size, cfg, device, amp):
    """REFERENCE §4.3-§4.9 for one video, the loop all three tasks share: the task gives frame 0's label `first`
    (h, w, C) on the patch grid (DAVIS / VIP one-hot masks, JHMDB joint heatmaps) and gets back, frame by frame,
    (t, original BGR frame, soft label (C, h, w)), with None as frame 0's soft label (its label is the given one).
    Streamed in chunks of --batch frames: memory holds the 1 + queue context frames and one chunk, whatever the video
    length."""
    h, w = size[0] // encoder.patch_size, size[1] // encoder.patch_size
    bands = neighbourhood_bands(h, w, cfg.radius, device)
    ctx_feats = ctx_labels = None  # (w, 1 + queue, h, ·): slot 0 = frame 0, slots 1.. a ring of the last predictions
    for start in range(0, len(frames), cfg.batch):
        chunk = frames[start:start + cfg.batch]
        pairs = [read_frame(f, size) for f in chunk]
        if start == 0:
            H, W = pairs[0][1].shape[:2]  # every frame must have the first one's size
        for f, (_, bgr) in zip(chunk, pairs):
            if bgr.shape[:2] != (H, W):
                die(f"{f} is {bgr.shape[1]}x{bgr.shape[0]}, the video's first frame {W}x{H}; fix the frames")
        x = torch.stack([t for t, _ in pairs]).to(device)  # (B, 3, th, tw)
        with amp:
            feats = encoder.features(x).float()  # (B, h, w, D)
        feats = F.normalize(feats, dim=-1).transpose(1, 2)  # unit length (§4.3), transposed: (B, w, h, D)
        for b in range(len(chunk)):
            t = start + b
            if t == 0:
                S = 1 + cfg.queue
                ctx_feats = feats.new_zeros(w, S, h, feats.shape[-1])
                ctx_labels = feats.new_zeros(w, S, h, first.shape[-1])
                ctx_feats[:, 0], ctx_labels[:, 0] = feats[0], first.transpose(0, 1).to(device)
                soft = None
            else:
                n_ctx = 1 + min(t - 1, cfg.queue)  # frame 0 + the predictions so far, at most `queue` of them (§4.5)
                soft = propagate_step(feats[b].contiguous(), ctx_feats[:, :n_ctx], ctx_labels[:, :n_ctx], bands,
                                      cfg.topk, cfg.temperature)  # (w, h, C)
                if cfg.queue > 0:  # the soft label (before argmax) joins the context, evicts the oldest (§4.5, §4.9)
                    slot = 1 + (t - 1) % cfg.queue  # the order of context frames does not matter: top-k is over a set
                    ctx_feats[:, slot], ctx_labels[:, slot] = feats[b], soft
                soft = soft.permute(2, 1, 0)  # (C, h, w)
            yield t, pairs[b][1], soft


def frame_name(path):
    return os.path.splitext(os.path.basename(path))[0]


def propagate_sequence(encoder, frames, ann_path, seq_dir, cfg, device, amp, overlay_dir=None):
    """DAVIS and VIP: the first annotation's one-hot propagated, each soft label turned into ids (§4.10); writes
    <seq_dir>/<frame>.png for every frame (frame 0 = the given annotation, §4.11); returns the patch grid."""
    (H, W), size, grid = frame_geometry(frames[0], cfg, encoder.patch_size)
    ann, onehot = first_label(ann_path, grid)  # original annotation, (h, w, C)
    os.makedirs(seq_dir, exist_ok=True)
    overlay = Overlay(overlay_dir, os.path.basename(seq_dir), len(frames), H, W) if overlay_dir else None
    for t, bgr, soft in propagate_frames(encoder, frames, onehot, size, cfg, device, amp):
        ids = ann if soft is None else labels_to_pixels(soft, encoder.patch_size, (H, W))  # (H, W) uint8
        save_indexed_png(os.path.join(seq_dir, frame_name(frames[t]) + ".png"), ids)
        if overlay:
            overlay.add(t, blend(bgr, np.where(ids == 255, 0, ids)))
    if overlay:
        overlay.close()
    return grid


# -----------------------------------------------------------------------------
# Metrics: davis2017-evaluation, semi-supervised task (REFERENCE §5), numpy + OpenCV instead of scikit-image

def jaccard(pred, gt):
    """Region similarity J = |S ∩ G| / |S ∪ G| (toolkit `db_eval_iou`); 1 when both masks are empty."""
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def boundary_map(mask):
    """Toolkit `_seg2bmap`: a pixel is boundary iff it differs from its right, lower or lower-right neighbour
    (outside the image = 0); the last row compares only right, the last column only lower, and the bottom-right
    pixel is never boundary. mask (H, W) bool -> (H, W) bool."""
    e, s, se = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]  # right, lower, lower-right
    b = (mask ^ e) | (mask ^ s) | (mask ^ se)
    b[-1, :] = mask[-1, :] ^ e[-1, :]
    b[:, -1] = mask[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(r):
    """skimage.morphology.disk(r): the (2r+1)² grid points with x² + y² <= r², as a uint8 kernel for cv2."""
    x = np.arange(-r, r + 1)
    return ((x[None, :] ** 2 + x[:, None] ** 2) <= r * r).astype(np.uint8)


def boundary_tolerance(H, W, bound_th=0.008):
    """Toolkit: the match tolerance is ceil(bound_th · image diagonal) pixels (8 at 480x854)."""
    return int(math.ceil(bound_th * math.hypot(H, W)))


def dilate(bmap, r):
    """Binary dilation by disk(r) (toolkit: cv2.dilate with skimage's disk), computed on the bounding box of the
    boundary grown by r only: outside it the result is 0 anyway, and boundaries are thin."""
    out = np.zeros(bmap.shape, np.uint8)
    rows, cols = np.flatnonzero(bmap.any(1)), np.flatnonzero(bmap.any(0))
    if rows.size:
        r0, r1 = max(rows[0] - r, 0), min(rows[-1] + r + 1, bmap.shape[0])
        c0, c1 = max(cols[0] - r, 0), min(cols[-1] + r + 1, bmap.shape[1])
        out[r0:r1, c0:c1] = cv2.dilate(bmap[r0:r1, c0:c1].view(np.uint8), disk(r))
    return out.view(bool)


def f_measure(pred, gt, bound_th=0.008):
    """Boundary F-measure F = 2PR / (P + R) (toolkit `f_measure`): P = predicted boundary pixels within the tolerance
    of the GT boundary / predicted boundary pixels, R = GT boundary pixels within the tolerance of the predicted one
    / GT boundary pixels. No predicted boundary: P 1, R 0 (if GT has one); none in GT: P 0, R 1; neither: 1."""
    r = boundary_tolerance(*gt.shape, bound_th)
    bp, bg = boundary_map(pred), boundary_map(gt)
    n_p, n_g = np.count_nonzero(bp), np.count_nonzero(bg)
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        precision, recall = (1.0, 0.0) if n_p == 0 else (0.0, 1.0)
    else:
        precision = np.count_nonzero(bp & dilate(bg, r)) / float(n_p)
        recall = np.count_nonzero(bg & dilate(bp, r)) / float(n_g)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def db_statistics(values):
    """Toolkit `db_statistics` over one object's per-frame values: Mean; Recall = fraction of frames > 0.5 (strict);
    Decay = mean of the first of 4 bins minus mean of the last, bins v[ids[i] : ids[i+1] + 1] with
    ids = round(linspace(1, n, 5) + 1e-10) - 1 (neighbouring bins share a frame)."""
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():  # no scored frame (a 2-frame video) gives NaN, silently, as in the toolkit
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean, recall = np.nanmean(values), np.nanmean(values > 0.5)
        # the toolkit casts ids to uint8 (wrapping beyond 256 frames; DAVIS videos are shorter): kept, same output
        ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.uint8)
        bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
        return mean, recall, np.nanmean(bins[0]) - np.nanmean(bins[3])


def read_index_png(path, what):
    try:
        arr = np.array(Image.open(path))
    except OSError:
        die(f"{what} {path} is missing or unreadable; every evaluated frame needs <seq>/<frame>.png")
    if arr.ndim != 2:
        die(f"{what} {path} is not an indexed (mode P / L) PNG; save object ids, not colours")
    return arr


def evaluate_sequence(root, results, seq):
    """Per-frame J and F of every object of one sequence -> (J, F) arrays (K objects, frames 1 .. n-2)."""
    gt_paths = sorted(glob.glob(os.path.join(root, "Annotations", "480p", seq, "*.png")))
    if not gt_paths:
        die(f"no annotations in {root}/Annotations/480p/{seq}/; evaluation needs the ground truth of every frame")
    first = read_index_png(gt_paths[0], "annotation")
    K = int(np.where(first == 255, 0, first).max())  # objects = ids 1..K of the first GT frame, void (255) -> 0
    J, Fm = np.zeros((K, len(gt_paths[1:-1]))), np.zeros((K, len(gt_paths[1:-1])))
    for i, gpath in enumerate(gt_paths[1:-1]):  # the first and the last frame are not scored
        gt = read_index_png(gpath, "annotation")
        gt = np.where(gt == 255, 0, gt)  # void pixels count as background in the semi-supervised task
        res = read_index_png(os.path.join(results, seq, os.path.basename(gpath)), "result")
        if res.shape != gt.shape:
            die(f"result {results}/{seq}/{os.path.basename(gpath)} is {res.shape[1]}x{res.shape[0]}, the annotation "
                f"{gt.shape[1]}x{gt.shape[0]}; save results at the original resolution")
        if res.max() > K:
            die(f"result {results}/{seq}/{os.path.basename(gpath)} has id {res.max()} but {seq} has {K} objects; "
                f"results may only use the first frame's ids")
        for k in range(1, K + 1):
            J[k - 1, i] = jaccard(res == k, gt == k)
            Fm[k - 1, i] = f_measure(res == k, gt == k)
    return J, Fm


COLUMNS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]


def object_rows(seq, J, Fm):
    """One row per object, named <seq>_<k> as the toolkit names them: (name, JM, JR, JD, FM, FR, FD)."""
    return [(f"{seq}_{k + 1}", *db_statistics(J[k]), *db_statistics(Fm[k])) for k in range(J.shape[0])]


def global_results(rows):
    """Global = plain mean over all objects of all sequences; J&F-Mean = (J-Mean + F-Mean) / 2 (REFERENCE §5)."""
    cols = [np.mean([r[i] for r in rows]) for i in range(1, 7)]  # JM JR JD FM FR FD
    return [(cols[0] + cols[3]) / 2.0] + cols


def fmt(v):
    """pandas' to_csv(float_format="%.3f") as the toolkit writes it: NaN becomes an empty field."""
    return "" if v != v else "%.3f" % v


def write_csvs(folder, subset, rows):
    """global_results-<set>.csv and per-sequence_results-<set>.csv, the toolkit's columns; temp + rename each."""
    tables = {f"global_results-{subset}.csv": [COLUMNS, [fmt(v) for v in global_results(rows)]],
              f"per-sequence_results-{subset}.csv": [["Sequence", "J-Mean", "F-Mean"]] +
              [[r[0], fmt(r[1]), fmt(r[4])] for r in rows]}
    for name, table in tables.items():
        write_csv(os.path.join(folder, name), table)
    return [os.path.join(folder, n) for n in tables]


def write_csv(path, table):
    """Rows of fields to `path`, written under a temp name then renamed: a CSV is never half-written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(table)
    os.replace(path + ".tmp", path)


def format_table(rows):
    g = global_results(rows)
    return " ".join(f"{c:>9}" for c in COLUMNS) + "\n" + " ".join(f"{fmt(v):>9}" for v in g)


def evaluate_folder(root, results, seqs, subset):
    """--eval-only: score every sequence of the set in `results`, write the two CSVs there, print the table."""
    if not os.path.isdir(results):
        die(f"results folder {results} not found; pass --results DIR holding <seq>/<frame>.png")
    rows, t0 = [], time.time()
    for i, (seq, _) in enumerate(seqs):
        rows += object_rows(seq, *evaluate_sequence(root, results, seq))
        print(f"[{i + 1}/{len(seqs)}] {seq}: J&F so far {global_results(rows)[0]:.3f}", flush=True)
    for path in write_csvs(results, subset, rows):
        print(f"wrote {path}")
    print(f"--- global results for {subset} ({len(rows)} objects, {time.time() - t0:.1f} s) ---")
    print(format_table(rows))
    return rows


# -----------------------------------------------------------------------------
# JHMDB: 15 pose keypoints propagated as heatmaps, scored by PCK (REFERENCE §6). Sources of the protocol, the CRW line:
# ajabri/videowalk code/data/jhmdb.py (heatmaps) + code/utils/test_utils.py `process_pose` (decoding) +
# code/eval/eval_pck.py (PCK), the same eval_pck.py in Liusifei/UVC (branch jhmdb), xvjiarui/VFS jhmdb_dataset.py.
# J joints, T frames, N scored frames

JOINTS = ("neck", "belly", "head", "right_shoulder", "left_shoulder", "right_hip", "left_hip", "right_elbow",
          "left_elbow", "right_knee", "left_knee", "right_wrist", "left_wrist", "right_ankle", "left_ankle")  # JHMDB
BONES = ((0, 1), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 3), (8, 4), (9, 5), (10, 6), (11, 7), (12, 8), (13, 9),
         (14, 10))  # (joint, parent): the skeleton CRW's `vis_pose` draws
PCK_ALPHAS = (0.1, 0.2)  # SiamMAE Table 1 reports PCK@0.1 and PCK@0.2 (CRW's script prints 0.1 .. 0.5)


def read_joint_positions(path):
    """JHMDB joint_positions.mat -> (T, J, 2) float64 keypoints (x, y) in 0-based pixels. Its field `pos_img` is
    2 x 15 x T in MATLAB's 1-based pixels; CRW, UVC and VFS all subtract 1 (VFS: "magic -1")."""
    try:  # the one use of scipy in this repo: JHMDB ships its joints as MATLAB files (README, requirements.txt)
        from scipy.io import loadmat
    except ImportError:
        die("reading JHMDB's joint_positions.mat needs scipy (scipy.io.loadmat): pip install scipy")
    try:
        pos = loadmat(path).get("pos_img")
    except Exception as e:  # scipy raises ValueError, TypeError, OSError ... on what is not a MATLAB file
        die(f"cannot read {path} as a MATLAB file ({type(e).__name__}); re-extract joint_positions/")
    if (pos is None or not np.issubdtype(pos.dtype, np.number) or pos.ndim != 3 or pos.shape[:2] != (2, len(JOINTS))
            or pos.shape[2] == 0 or not np.isfinite(pos).all()):
        die(f"{path} has no finite pos_img of shape 2 x {len(JOINTS)} x frames; re-extract joint_positions/")
    return pos.transpose(2, 1, 0).astype(np.float64) - 1  # (2, J, T) -> (T, J, 2)


def jhmdb_videos(split):
    """The videos to run, as <class>/<video>: from a folder of JHMDB's split files (<class>_test_split1.txt, one line
    "<video>.avi 1|2" a video, 2 = test: 268 videos in split 1), or from a list file, one video a line given as
    <class>/<video> or as the first field of a CRW / UVC test list (an image folder or a joint_positions.mat)."""
    if os.path.isdir(split):
        files = sorted(glob.glob(os.path.join(split, "*_test_split1.txt")))
        if not files:
            die(f"no <class>_test_split1.txt in {split}; pass JHMDB's split folder or a list file with --jhmdb-split")
        videos = []
        for path in files:
            cls = os.path.basename(path)[:-len("_test_split1.txt")]
            for line in filter(str.strip, open(path)):
                fields = line.split()
                if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                    die(f"{path}: line '{line.strip()}' is not '<video>.avi 1|2'; restore JHMDB's split files")
                if fields[1] == "2":
                    videos.append(f"{cls}/{os.path.splitext(fields[0])[0]}")
        return videos
    if not os.path.isfile(split):
        die(f"JHMDB split {split} not found; pass --jhmdb-split (a folder of split files or a list of <class>/<video>)")
    firsts = [line.split()[0] for line in filter(str.strip, open(split))]
    folders = [os.path.dirname(f) if f.endswith(".mat") else f for f in firsts]  # .../<class>/<video>[/x.mat]
    return ["/".join(f.rstrip("/").split("/")[-2:]) for f in folders]


def list_jhmdb(root, split):
    """Checks the JHMDB layout and reads every video's joints up front (nothing is written before this passes)
    -> [(<class>/<video>, [frame paths], joints (T, J, 2))]."""
    for sub in ("Rename_Images", "joint_positions"):
        if not os.path.isdir(os.path.join(root, sub)):
            die(f"{root} has no {sub}/ folder; pass the JHMDB root with --jhmdb")
    split = split or os.path.join(root, "splits")
    out = []
    for video in jhmdb_videos(split):
        frames = sorted(glob.glob(os.path.join(root, "Rename_Images", video, "*.png")))
        if not frames:
            die(f"no frames in {root}/Rename_Images/{video}/; fix the folder or the split list {split}")
        mat = os.path.join(root, "joint_positions", video, "joint_positions.mat")
        if not os.path.isfile(mat):
            die(f"video {video} has no {mat}; keypoint propagation starts from its first frame's joints")
        out.append((video, frames, read_joint_positions(mat)))
    if not out:
        die(f"{split} lists no test video; pass JHMDB's split folder or a list file with --jhmdb-split")
    return out


def cell_scale(frame_hw, size, patch_size):
    """Patch cells per original pixel along (x, y): the grid tiles the resized frame, p resized pixels a cell. Pixel
    and cell centres map onto each other, u = (x + 0.5) · scale − 0.5 (CRW maps x to x / stride, onto cell corners)."""
    (H, W), (th, tw) = frame_hw, size
    return np.array([tw / (patch_size * W), th / (patch_size * H)])


def keypoint_heatmaps(xy, frame_hw, size, patch_size, sigma):
    """The label JHMDB propagates (CRW `JhmdbSet`, sigma 0.5 cells): keypoints (J, 2) in pixels -> (h, w, J)
    Gaussians exp(−d² / 2σ²), d in cells from the keypoint (CRW rounds the centre to a cell), cut to 0 beyond 3σ along
    either axis (CRW's (6σ + 1)² window), so a joint outside the frame gives an empty map. No background channel: each
    joint is propagated on its own (CRW's extra background channel only serves its pictures)."""
    h, w = size[0] // patch_size, size[1] // patch_size
    uv = torch.from_numpy((xy + 0.5) * cell_scale(frame_hw, size, patch_size) - 0.5).float()  # (J, 2) column, row
    du = torch.arange(w).view(1, w, 1) - uv[:, 0]  # (1, w, J)
    dv = torch.arange(h).view(h, 1, 1) - uv[:, 1]  # (h, 1, J)
    gauss = torch.exp(-(du ** 2 + dv ** 2) / (2 * sigma ** 2))  # (h, w, J)
    return gauss * ((du.abs() <= 3 * sigma) & (dv.abs() <= 3 * sigma))


def heatmap_keypoints(soft, k, frame_hw, size, patch_size):
    """Propagated heatmaps (J, h, w) -> keypoints (J, 2) in original pixels: each map's k highest cells averaged with
    their values as weights (CRW `process_pose`, k = 3; k = 1 is the argmax). An all-zero map gives NaN (CRW: -1,
    and the joint is left out of the person box and of the score)."""
    J, h, w = soft.shape
    vals, ids = soft.reshape(J, h * w).topk(min(k, h * w), dim=1)  # (J, k)
    weights = vals / vals.sum(dim=1, keepdim=True)  # 0 / 0 = NaN for an empty map
    cells = torch.stack([ids % w, ids // w], dim=-1).to(soft.dtype)  # (column, row) of each: (J, k, 2)
    uv = (weights.unsqueeze(-1) * cells).sum(dim=1).double().cpu().numpy()  # (J, 2)
    return (uv + 0.5) / cell_scale(frame_hw, size, patch_size) - 0.5


def draw_skeleton(bgr, xy):
    """--overlay picture of a JHMDB frame: bones as lines, joints as dots, each in its joint's palette colour."""
    pic, found = bgr.copy(), np.isfinite(xy).all(axis=1)
    pts = [tuple(p) for p in np.where(found[:, None], xy, 0).round().astype(int).tolist()]
    for j, parent in BONES:
        if found[j] and found[parent]:
            cv2.line(pic, pts[j], pts[parent], PALETTE[j + 1][::-1].tolist(), 2, cv2.LINE_AA)
    for j in np.flatnonzero(found):
        cv2.circle(pic, pts[j], 3, PALETTE[j + 1][::-1].tolist(), -1, cv2.LINE_AA)
    return pic


def propagate_keypoints(encoder, frames, joints, cfg, device, amp, overlay_dir=None, name=""):
    """JHMDB, one video: the first frame's joints as heatmaps through the shared loop, each soft heatmap back to
    keypoints -> (T, J, 2) pixels. Frame 1's are the given ones (NaN where its heatmap is empty: nothing to carry)."""
    (H, W), size, _ = frame_geometry(frames[0], cfg, encoder.patch_size)
    heat = keypoint_heatmaps(joints[0], (H, W), size, encoder.patch_size, cfg.sigma)  # (h, w, J)
    pred = np.full((len(frames), len(JOINTS), 2), np.nan)
    overlay = Overlay(overlay_dir, name, len(frames), H, W) if overlay_dir else None
    for t, bgr, soft in propagate_frames(encoder, frames, heat, size, cfg, device, amp):
        if soft is None:
            pred[0] = np.where(heat.sum(dim=(0, 1)).numpy()[:, None] > 0, joints[0], np.nan)
        else:
            pred[t] = heatmap_keypoints(soft, cfg.keypoint_topk, (H, W), size, encoder.patch_size)
        if overlay:
            overlay.add(t, draw_skeleton(bgr, pred[t]))
    if overlay:
        overlay.close()
    return pred


def normalized_distances(pred, gt):
    """CRW `eval_pck.py`: each keypoint's distance to the ground truth over the person's size in that frame, 0.6 × the
    diagonal of the box around the frame's ground-truth joints (CRW, UVC and VFS alike; CRW's max(box h, w) is
    commented out). Joints without a prediction (NaN) stay out of the box and the score, as CRW's `jnt_visible`; a box
    of size 0 (one joint left) scores nothing (CRW would divide by 0). pred, gt (N, J, 2) -> (N, J), NaN = unscored."""
    found = np.isfinite(pred).all(axis=-1)  # (N, J)
    lo = np.where(found[..., None], gt, np.inf).min(axis=1)  # (N, 2)
    hi = np.where(found[..., None], gt, -np.inf).max(axis=1)
    person = 0.6 * np.linalg.norm(hi - lo, axis=-1)[:, None]  # (N, 1); NaN where no joint is found
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(found & (person > 0), np.linalg.norm(pred - gt, axis=-1) / person, np.nan)


def pck(dist, alpha):
    """PCK@α in %: per joint, the share of its scored frames with normalized distance <= α (CRW: `<=`); the mean is
    over the joints' values (CRW `computePCK`; the pooled count is commented out there). dist (N, J) -> (J,), mean."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # a joint never scored is NaN, skipped by the mean
        per_joint = 100.0 * (dist <= alpha).sum(axis=0) / np.isfinite(dist).sum(axis=0)
        return per_joint, np.nanmean(per_joint)


def write_keypoints(path, frames, pred):
    """<out>/<class>/<video>.csv: a row per frame, x and y of each joint in original 0-based pixels; empty = lost."""
    header = ["frame"] + [f"{j}_{c}" for j in JOINTS for c in "xy"]
    write_csv(path, [header] + [[frame_name(f)] + [fmt(v) for v in xy.reshape(-1)] for f, xy in zip(frames, pred)])


def run_jhmdb(videos, encoder, out, cfg, device, amp, overlay_dir):
    """Propagates and scores every video: frames 2.. against their ground truth (frame 1 is given: CRW and UVC skip
    k == 0). Writes <class>/<video>.csv, pck.csv (per joint and mean) and per-video_pck.csv, in %; returns the means."""
    dists, rows, t_all = [], [], time.time()
    for i, (name, frames, joints) in enumerate(videos):
        t0 = time.time()
        with torch.inference_mode():
            pred = propagate_keypoints(encoder, frames, joints, cfg, device, amp, overlay_dir, name)
        write_keypoints(os.path.join(out, name + ".csv"), frames, pred)
        n = min(len(frames), len(joints))  # frames beyond the ground truth's are not scored (VFS truncates so)
        dists.append(normalized_distances(pred[1:n], joints[1:n]))
        rows.append([name] + [pck(dists[-1], a)[1] for a in PCK_ALPHAS])
        so_far = [pck(np.concatenate(dists), a)[1] for a in PCK_ALPHAS]
        print(f"[{i + 1}/{len(videos)}] {name}: {len(frames)} frames | {len(frames) / (time.time() - t0):.1f} frames/s"
              f" | PCK@0.1 {rows[-1][1]:.1f}, @0.2 {rows[-1][2]:.1f} | so far {so_far[0]:.1f}, {so_far[1]:.1f}",
              flush=True)
    dist = np.concatenate(dists)  # (N, J): every scored frame of every video
    table = {a: pck(dist, a) for a in PCK_ALPHAS}
    header = [f"PCK@{a} (%)" for a in PCK_ALPHAS]
    write_csv(os.path.join(out, "pck.csv"), [["joint"] + header] +
              [[j] + [fmt(table[a][0][k]) for a in PCK_ALPHAS] for k, j in enumerate(JOINTS)] +
              [["mean"] + [fmt(table[a][1]) for a in PCK_ALPHAS]])
    write_csv(os.path.join(out, "per-video_pck.csv"), [["video"] + header] + [[r[0], *map(fmt, r[1:])] for r in rows])
    print(f"propagated {len(videos)} videos in {time.time() - t_all:.1f} s; wrote {out}/pck.csv, per-video_pck.csv")
    print(f"--- PCK (%) over {len(dist)} frames of {len(videos)} videos ---")
    print(f"{'joint':>15} " + " ".join(f"{h:>12}" for h in header))
    for k, j in enumerate(JOINTS):
        print(f"{j:>15} " + " ".join(f"{fmt(table[a][0][k]):>12}" for a in PCK_ALPHAS))
    print(f"{'mean':>15} " + " ".join(f"{fmt(table[a][1]):>12}" for a in PCK_ALPHAS))
    return {f"PCK@{a}": table[a][1] for a in PCK_ALPHAS} | {"per_joint": {a: table[a][0] for a in PCK_ALPHAS}}


# -----------------------------------------------------------------------------
# VIP: 20 human-part classes propagated like DAVIS masks, scored by mIoU (REFERENCE §6). Sources: ajabri/videowalk
# code/eval/eval_vip.py (= UVC eval_vip.py, from TimeCycle), UVC test_mask_vip.py (layout, list), xvjiarui/VFS
# vip_dataset.py; HCPLab-SYSU/ATEN issue #3: only the annotated frames are scored.

VIP_CLASSES = ("background", "hat", "hair", "sun-glasses", "upper-clothes", "dress", "coat", "socks", "pants", "gloves",
               "scarf", "skirt", "torso-skin", "face", "right-arm", "left-arm", "right-leg", "left-leg", "right-shoe",
               "left-shoe")  # ids 0..19 as in CRW's eval_vip.py; 255 = not labelled


def vip_annotation(root, video, frame):
    return os.path.join(root, "Annotations", "Category_ids", video, frame_name(frame) + ".png")


def list_vip(root, listing):
    """Checks the VIP layout up front -> [(video, [frame paths])]: Images/<video>/*.jpg, and each video's first frame
    annotated in Annotations/Category_ids/<video>/ with ids below 20."""
    for sub in ("Images", os.path.join("Annotations", "Category_ids")):
        if not os.path.isdir(os.path.join(root, sub)):
            die(f"{root} has no {sub}/ folder; pass the VIP_Fine root with --vip")
    listing = listing or os.path.join(root, "lists", "val_videos.txt")
    if not os.path.isfile(listing):
        die(f"video list {listing} not found; pass --vip-list or fix --vip")
    out = []
    for line in filter(str.strip, open(listing)):
        video = line.strip().split("/")[-1]  # UVC takes the name after the last "/"
        frames = sorted(glob.glob(os.path.join(root, "Images", video, "*.jpg")))
        if not frames:
            die(f"no frames in {root}/Images/{video}/; fix the folder or the list {listing}")
        ann0 = vip_annotation(root, video, frames[0])
        if not os.path.isfile(ann0):
            die(f"video {video} has no first-frame annotation {ann0}; part propagation starts from it")
        ids = read_index_png(ann0, "first-frame annotation")
        if ids[ids != 255].max(initial=0) >= len(VIP_CLASSES):
            die(f"{ann0} has id {ids[ids != 255].max()}; VIP has {len(VIP_CLASSES)} classes (0-19, 255 = unlabelled)")
        out.append((video, frames))
    return out


def confusion(gt, pred, n):
    """n x n pixel counts, rows = ground-truth class, columns = predicted class (CRW eval_vip.py `fast_hist`);
    ground-truth ids outside 0..n-1 (255, unlabelled) are not counted."""
    k = gt < n
    return np.bincount(n * gt[k].astype(np.int64) + pred[k], minlength=n * n).reshape(n, n)


def mean_iou(hist):
    """IoU_c = TP / (GT_c + predicted_c − TP) from a confusion matrix (CRW eval_vip.py `show_result`: one matrix over
    all scored pixels of all videos); a class in neither is 0/0 = NaN and left out of the mean. -> (n,), mean."""
    tp = np.diag(hist).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # an empty matrix: mean of nothing = NaN
        iou = tp / (hist.sum(axis=0) + hist.sum(axis=1) - tp)
        return iou, np.nanmean(iou)


def vip_confusion(root, results, video, frames):
    """One video's confusion matrix over its annotated frames, the first included (its result is the given
    annotation: CRW, UVC and VFS score every annotated frame they write) -> (hist, frames scored)."""
    n = len(VIP_CLASSES)
    hist, scored = np.zeros((n, n), np.int64), 0
    for f in frames:
        gpath = vip_annotation(root, video, f)
        if not os.path.isfile(gpath):  # VIP labels only some frames (ATEN issue #3: only those are evaluated)
            continue
        gt = read_index_png(gpath, "annotation")
        res = read_index_png(os.path.join(results, video, frame_name(f) + ".png"), "result")
        if res.shape != gt.shape:
            die(f"{gpath} is {gt.shape[1]}x{gt.shape[0]} but its frame {res.shape[1]}x{res.shape[0]}; fix the data")
        hist, scored = hist + confusion(gt, res, n), scored + 1
    return hist, scored


def run_vip(root, videos, encoder, out, cfg, device, amp, overlay_dir):
    """Propagates every video like DAVIS (OUT/<video>/<frame>.png) and scores its annotated frames; writes miou.csv
    (per class and mean) and per-video_miou.csv, in %; returns the mean and the per-class IoU."""
    total, rows, t_all = 0, [], time.time()
    for i, (video, frames) in enumerate(videos):
        t0 = time.time()
        with torch.inference_mode():
            h, w = propagate_sequence(encoder, frames, vip_annotation(root, video, frames[0]),
                                      os.path.join(out, video), cfg, device, amp, overlay_dir)
        hist, scored = vip_confusion(root, out, video, frames)
        total = total + hist
        rows.append([video, 100 * mean_iou(hist)[1]])
        print(f"[{i + 1}/{len(videos)}] {video}: {len(frames)} frames, grid {h}x{w} | "
              f"{len(frames) / (time.time() - t0):.1f} frames/s | {scored} annotated | mIoU {rows[-1][1]:.1f} | "
              f"so far {100 * mean_iou(total)[1]:.1f}", flush=True)
    iou, miou = mean_iou(total)
    per_class = [[c, fmt(100 * v)] for c, v in zip(VIP_CLASSES, iou)]
    write_csv(os.path.join(out, "miou.csv"), [["class", "IoU (%)"]] + per_class + [["mean", fmt(100 * miou)]])
    write_csv(os.path.join(out, "per-video_miou.csv"), [["video", "mIoU (%)"]] + [[r[0], fmt(r[1])] for r in rows])
    print(f"propagated {len(videos)} videos in {time.time() - t_all:.1f} s; wrote {out}/miou.csv, per-video_miou.csv")
    print(f"--- IoU (%) per class, {len(videos)} videos ---")
    print(" ".join(f"{c}: {fmt(100 * v) or '-'}" for c, v in zip(VIP_CLASSES, iou)))
    print(f"mIoU {100 * miou:.2f}")
    return {"mIoU": 100 * miou, "IoU": 100 * iou}


# -----------------------------------------------------------------------------
# Benchmark (--bench): the three costs of a run, at DAVIS 480p, without data

def timed(fn, sync, repeat):
    fn()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(cfg, device, amp):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    h, w, D, S = 30, 52, 384, 1 + cfg.queue  # the ViT-S/16 grid of a 480x832 frame; frame 0 + a full queue
    feats = F.normalize(torch.randn(w, S, h, D, generator=g), dim=-1).to(device)
    labels = torch.softmax(4 * torch.randn(w, S, h, 3, generator=g), dim=-1).to(device)  # 2 objects + background
    target = F.normalize(torch.randn(w, h, D, generator=g), dim=-1).to(device)
    bands = neighbourhood_bands(h, w, cfg.radius, device)
    with torch.inference_mode():
        t_prop = timed(lambda: propagate_step(target, feats, labels, bands, cfg.topk, cfg.temperature), sync, 5)
        soft = propagate_step(target, feats, labels, bands, cfg.topk, cfg.temperature).permute(2, 1, 0)
        t_pix = timed(lambda: labels_to_pixels(soft, 16, (480, 854)), sync, 5)
    print(f"propagation (features given), grid {h}x{w}, {S} context frames, radius {cfg.radius}, top-k {cfg.topk}: "
          f"{t_prop:.3f} s/frame; + back to pixels (upsample, argmax, resize) {t_pix * 1000:.0f} ms/frame")

    model = random_vit("vit_small", 16, 0).to(device).eval()
    B = max(1, min(cfg.batch, 4 if device.type == "cpu" else 32))
    x = torch.randn(B, 3, 480, 832, generator=g).to(device)
    with torch.inference_mode(), amp:
        t_vit = timed(lambda: model.features(x), sync, 2 if device.type == "cpu" else 5) / B
    print(f"ViT-S/16 forward, 480x832, batch {B}: {t_vit:.3f} s/frame")

    # the whole run on a synthetic 480x854 video: reading, forward, propagation, PNG writing and scoring per frame
    T, rng = cfg.queue + 4, np.random.default_rng(0)  # long enough for the queue to fill
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for sub in ("JPEGImages", "Annotations", "out"):
            os.makedirs(os.path.join(tmp, sub, "480p", "synthetic"))
        for t in range(T):  # a square drifting over a noise background
            img, lab = rng.integers(0, 256, (480, 854, 3), dtype=np.uint8), np.zeros((480, 854), np.uint8)
            img[100:300, 200 + 8 * t:400 + 8 * t], lab[100:300, 200 + 8 * t:400 + 8 * t] = 128, 1  # grey square
            paths.append(os.path.join(tmp, "JPEGImages", "480p", "synthetic", f"{t:05d}.jpg"))
            cv2.imwrite(paths[-1], img)
            save_indexed_png(os.path.join(tmp, "Annotations", "480p", "synthetic", f"{t:05d}.png"), lab)
        t0 = time.perf_counter()
        with torch.inference_mode():
            propagate_sequence(model, paths, paths[0].replace("JPEGImages", "Annotations")[:-4] + ".png",
                               os.path.join(tmp, "out", "synthetic"), cfg, device, amp)
        t_run = (time.perf_counter() - t0) / T
        t0 = time.perf_counter()
        evaluate_sequence(tmp, os.path.join(tmp, "out"), "synthetic")
        t_eval = (time.perf_counter() - t0) / T
    print(f"whole run, {T}-frame 480x854 video, ViT-S/16: {t_run:.3f} s/frame = forward + {t_run - t_vit:.3f} s; "
          f"+ scoring {t_eval * 1000:.0f} ms/frame")

    yy, xx = np.mgrid[0:480, 0:854]
    gt = (yy - 240) ** 2 / 120 ** 2 + (xx - 400) ** 2 / 200 ** 2 < 1  # an ellipse and a shifted, wobblier one
    pred = (yy - 250) ** 2 / 110 ** 2 + (xx - 420 + 15 * np.sin(yy / 9)) ** 2 / 210 ** 2 < 1
    t_metric = timed(lambda: (jaccard(pred, gt), f_measure(pred, gt)), lambda: None, 20)
    print(f"J and F of one 480x854 object-frame: {t_metric * 1000:.1f} ms "
          f"(J {jaccard(pred, gt):.3f}, F {f_measure(pred, gt):.3f})")
    return dict(propagation_s=t_prop, pixels_s=t_pix, vit_s=t_vit, run_s=t_run, metric_ms=t_metric * 1000)


# -----------------------------------------------------------------------------
# main: check inputs (nothing written before), build the encoder, propagate and score video by video

def run_davis(root, seqs, encoder, out, cfg, device, amp, overlay_dir):
    """Propagates every sequence, scores it from the PNGs just written (the numbers --eval-only would give) and writes
    the toolkit's two CSVs; returns the per-object rows (None for a set without full ground truth)."""
    rows, scored, t_all, n_all = [], True, time.time(), 0
    for i, (seq, frames) in enumerate(seqs):
        ann0 = os.path.join(root, "Annotations", "480p", seq, frame_name(frames[0]) + ".png")
        t0 = time.time()
        with torch.inference_mode():
            h, w = propagate_sequence(encoder, frames, ann0, os.path.join(out, seq), cfg, device, amp, overlay_dir)
        dt, n_all = time.time() - t0, n_all + len(frames)
        line = f"[{i + 1}/{len(seqs)}] {seq}: {len(frames)} frames, grid {h}x{w} | {len(frames) / dt:.1f} frames/s"
        n_gt = len(glob.glob(os.path.join(root, "Annotations", "480p", seq, "*.png")))
        if n_gt == len(frames) and scored:
            seq_rows = object_rows(seq, *evaluate_sequence(root, out, seq))
            rows += seq_rows
            line += f" | J&F {global_results(seq_rows)[0]:.3f} | so far {global_results(rows)[0]:.3f}"
        else:
            scored = False
            line += " | no ground truth beyond frame 0: not scored"
        print(line, flush=True)
    print(f"propagated {n_all} frames in {time.time() - t_all:.1f} s into {out}")
    if not scored or not rows:
        print("no scores: the set has no full ground truth (submit the results folder to the DAVIS server)")
        return None
    for path in write_csvs(out, cfg.set, rows):
        print(f"wrote {path}")
    print(f"--- global results for {cfg.set} ({len(rows)} objects) ---")
    print(format_table(rows))
    return rows


TOY_FOLDERS = {"davis": "DAVIS", "jhmdb": "JHMDB", "vip": "VIP"}  # toydata.py's folder of each task's toy set


def data_root(cfg):
    """--davis / --jhmdb / --vip, or the task's toy set (toydata.py is imported only then: this file stands alone)."""
    root = getattr(cfg, cfg.task)
    if not root:
        import toydata
        root = os.path.join(toydata.ensure_toy_data(), TOY_FOLDERS[cfg.task])
        print(f"no --{cfg.task}: toy {TOY_FOLDERS[cfg.task]} at {root}, toy preset {TOY[cfg.task]} (native frame size)")
    return root


def main(argv=None):
    cfg, preset, given = parse_config(argv)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.precision not in ("bf16", "fp32"):
        die(f"unknown --precision {cfg.precision}; use bf16 or fp32")
    use_bf16 = device.type == "cuda" and cfg.precision == "bf16"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast(device.type, enabled=False)
    # TF32 is left at PyTorch's defaults (off for matmuls): the DINO script ran so, and affinities stay exact fp32
    print(f"device {device} | forward {'bf16 autocast' if use_bf16 else 'fp32'} | torch threads "
          f"{torch.get_num_threads()}", flush=True)
    if cfg.bench:
        return bench(cfg, device, amp)

    if cfg.eval_only and cfg.task != "davis":
        die("--eval-only scores DAVIS results folders; JHMDB and VIP are scored as they are propagated")
    root = data_root(cfg)
    if cfg.eval_only:
        if not cfg.results:
            die("--eval-only needs --results DIR (a folder of <seq>/<frame>.png)")
        seqs = list_sequences(root, cfg.set)
        return evaluate_folder(root, cfg.results, seqs, cfg.set)

    print(f"task {cfg.task}, protocol {cfg.protocol}: top-k {cfg.topk}, queue {cfg.queue}, radius {cfg.radius}, "
          f"temperature {cfg.temperature}, short side {cfg.short_side} (long side floored to x{cfg.size_multiple})"
          + (f", heatmap σ {cfg.sigma} cells, keypoint top-{cfg.keypoint_topk}" if cfg.task == "jhmdb" else ""))
    for k in sorted(given):
        if k in preset and given[k] != preset[k]:
            print(f"overriding {k} = {given[k]} (preset {preset[k]})")
    if cfg.topk < 1 or cfg.queue < 0 or cfg.radius < 0 or cfg.temperature <= 0 or cfg.batch < 1:
        die("--topk and --batch must be >= 1, --queue and --radius >= 0, --temperature > 0")
    if cfg.sigma <= 0 or cfg.keypoint_topk < 1:
        die("--sigma must be > 0 and --keypoint-topk >= 1")
    if cfg.task == "jhmdb":  # each lister checks the data before anything is written
        videos = list_jhmdb(root, cfg.jhmdb_split)
    elif cfg.task == "vip":
        videos = list_vip(root, cfg.vip_list)
    else:
        videos = list_sequences(root, cfg.set)
    encoder, desc = build_encoder(cfg)  # checks the checkpoint before anything is written
    encoder = encoder.to(device).eval()
    n_params = sum(p.numel() for p in encoder.parameters())
    print(f"encoder: {desc} ({n_params / 1e6:.1f}M params) | {len(videos)} videos")
    name = os.path.splitext(os.path.basename(cfg.ckpt))[0]  # out/siammae/checkpoint.pt -> siammae-checkpoint
    if os.path.isfile(cfg.ckpt):
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(cfg.ckpt)))}-{name}"
    out = cfg.out or os.path.join("out", cfg.task, f"{name}-{cfg.protocol}")
    overlay_dir = os.path.join(out, "overlays") if cfg.overlay else None
    os.makedirs(overlay_dir or out, exist_ok=True)
    if cfg.task == "jhmdb":
        return run_jhmdb(videos, encoder, out, cfg, device, amp, overlay_dir)
    if cfg.task == "vip":
        return run_vip(root, videos, encoder, out, cfg, device, amp, overlay_dir)
    return run_davis(root, videos, encoder, out, cfg, device, amp, overlay_dir)


if __name__ == "__main__":
    main()
