"""
DAVIS-2017 semi-supervised label propagation with a frozen ViT, scored exactly as the official toolkit scores it.

The protocol is DINO's `eval_video_segmentation.py` (Caron et al. 2021, arXiv:2104.14294), which the SiamMAE paper
(Gupta et al. 2023, arXiv:2305.14344, Table 4b) and the other ViT self-supervised papers report: the first-frame
annotation is carried through the video by k-nearest-neighbour matching of patch features, with a FIFO queue of past
predictions as extra context. The metric is `davis2017-evaluation` (J region similarity, F boundary measure, their
Mean / Recall / Decay), re-implemented with numpy + OpenCV so that it prints the same numbers to the last decimal.

    python propagate.py --ckpt random                        # toy DAVIS (generated once), untrained ViT-S/16
    python propagate.py --ckpt pixels                        # toy DAVIS, raw colour patches as features
    python propagate.py --ckpt out/ckpt.pt --davis DAVIS/    # DAVIS-2017 val, SiamMAE Table 4b settings
    python propagate.py --ckpt dino_deitsmall16_pretrain.pth --davis DAVIS/ --protocol dino   # DINO's own run
    python propagate.py --eval-only --results DIR --davis DAVIS/   # score any results folder, no model
    python propagate.py --bench                              # timings without data

Results land in OUT/<seq>/<frame>.png (indexed, DAVIS palette, original size: what the toolkit reads) and
OUT/global_results-<set>.csv, OUT/per-sequence_results-<set>.csv (the toolkit's columns and format).
`--ckpt` takes a checkpoint of siammae.py / msn.py / cmae.py, or any plain ViT in timm / DINO / MAE naming (the
architecture is read off the tensor shapes), or one of the two baselines `random` and `pixels`.

Measured (2-core AMD EPYC CPU, torch 2.14, 2025): see the note printed by `--bench`; numbers in the lead's README.
"""
import argparse
import csv
import dataclasses
import glob
import math
import os
import sys
import time
from collections import OrderedDict
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
    ckpt: str = ""  # checkpoint path, or `random` (untrained ViT of --model) or `pixels` (raw RGB patches)
    davis: str = ""  # DAVIS-2017 root (JPEGImages/, Annotations/, ImageSets/); empty = toy DAVIS from toydata.py
    set: str = "val"  # which ImageSets/2017/<set>.txt to run; the published tables use val (30 videos, 59 objects)
    out: str = ""  # results folder; empty = davis_results/<ckpt name>
    eval_only: bool = False  # only score an existing results folder (--results) against --davis
    results: str = ""  # the results folder for --eval-only: <results>/<seq>/<frame>.png
    protocol: str = "siammae"  # preset of the knobs below: siammae (Table 4b) | dino (eval_video_segmentation.py)
    topk: int = 7  # labels come from the k most similar source patches (SiamMAE Table 4b: 7; DINO script: 5)
    queue: int = 20  # past predicted frames kept as context besides frame 0 (SiamMAE: 20; DINO: 7)
    radius: int = 20  # square neighbourhood |Δrow|,|Δcol| <= r on the patch grid; 0 = whole frame (SiamMAE 20; DINO 12)
    temperature: float = 0.1  # affinity exp(<f_t, f_s> / τ) (DINO's 0.1; SiamMAE does not state it)
    short_side: int = 480  # frames resized so the short side is this (DINO: 480, the "480p" of DAVIS)
    size_multiple: int = 64  # the long side is floored to a multiple of this (DINO: 64, so 854 -> 832)
    model: str = "vit_small"  # architecture of `random`; for a checkpoint it is read from the shapes
    patch_size: int = 0  # 0 = from the checkpoint (random / pixels: 16); set it to check a checkpoint
    heads: int = 0  # 0 = from the width (192:3, 384:6, 768:12, 1024:16); needed for other widths
    checkpoint_key: str = ""  # sub-dict of a plain checkpoint to use; empty = teacher, target_encoder, model, state_dict
    seed: int = 0  # seeds the `random` encoder
    batch: int = 8  # frames per forward pass (features are batched over frames; memory grows with it)
    precision: str = "bf16"  # forward pass under bf16 autocast on CUDA (fp32 on CPU); fp32 = bit-for-bit DINO script
    device: str = "auto"  # auto = cuda if available else cpu
    overlay: bool = False  # also write OUT/overlays/<seq>.png (strip) and .mp4 with the masks blended in colour
    bench: bool = False  # time propagation, the ViT-S/16 forward pass and the metric at 480p, without data


PROTOCOLS = {  # --protocol presets, applied before explicit flags
    "siammae": dict(topk=7, queue=20, radius=20, temperature=0.1),  # SiamMAE Table 4b (DAVIS row)
    # DINO's script defaults; its features are fp32 (no autocast), so fp32 here makes the run the same computation
    "dino": dict(topk=5, queue=7, radius=12, temperature=0.1, precision="fp32"),
}
TOY = dict(short_side=160, size_multiple=16)  # toy DAVIS frames are 160 px high: keep them native, no upscaling


def parse_config(argv):
    """Builds the argparse parser from Config's fields; precedence: defaults < --protocol preset < toy < flags."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            ap.add_argument(flag, action="store_true", default=argparse.SUPPRESS)
        else:
            ap.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, metavar=f.name.upper())
    given = vars(ap.parse_args(argv))
    cfg = Config()
    protocol = given.get("protocol", cfg.protocol)
    if protocol not in PROTOCOLS:
        die(f"unknown --protocol {protocol}; use one of {', '.join(PROTOCOLS)}")
    preset = dict(PROTOCOLS[protocol])
    if not given.get("davis") and not given.get("bench"):
        preset.update(TOY)
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
    ann = np.array(Image.open(path))
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
