"""
Label propagation with a frozen ViT on the three benchmarks of SiamMAE's Table 1: DAVIS-2017 object
masks (J&F), JHMDB pose keypoints (PCK) and VIP human parts (mIoU).

The protocol is DINO's `eval_video_segmentation.py` (Caron et al., ICCV 2021, arXiv:2104.14294),
which SiamMAE (Gupta et al., NeurIPS 2023, arXiv:2305.14344, Table 4b) and the other ViT
self-supervised papers report. Frame 0's annotation is carried through the video patch by patch: a
patch of frame t takes the affinity-weighted mean label of its k most similar patches, inside a
local window, of frame 0 and of the last `queue` predicted frames. DAVIS is scored as
davisvideochallenge/davis2017-evaluation scores it (re-implemented with numpy + OpenCV, the same
numbers to the last decimal). JHMDB and VIP go through the same propagation; what they label and how
they are scored follows CRW (Jabri et al., NeurIPS 2020, ajabri/videowalk; UVC; xvjiarui/VFS).
`--protocol crw` is the other computation in print: CRW's code as alexandre-eymael/CropMAE
(`downstreams/propagation/src/`) runs it for CropMAE (ECCV 2024) and its successors (Protocol, CHOICES).

    python propagate.py --ckpt random                 # toy DAVIS (made once), untrained ViT-S/16
    python propagate.py --ckpt pixels                 # toy DAVIS, raw colour patches as features
    python propagate.py --ckpt out/siammae/checkpoint.pt --davis DAVIS/   # DAVIS-2017 val
    python propagate.py --ckpt dino_deitsmall16_pretrain.pth --davis DAVIS/ --protocol dino
    python propagate.py --ckpt ... --davis DAVIS_480_880/ --protocol crw   # CropMAE's numbers
    python propagate.py --task jhmdb --ckpt ... --jhmdb JHMDB/   # split-1 test, PCK@0.1/0.2 (scipy)
    python propagate.py --task vip --ckpt ... --vip VIP_Fine/    # 50 val videos, mIoU of 20 classes
    python propagate.py --eval-only --results DIR --davis DAVIS/   # score a DAVIS results folder
    python propagate.py --bench                       # timings without data

`--ckpt` takes a checkpoint of siammae.py / msn.py / cmae.py, any plain ViT in timm / DINO / MAE
names (the shapes give the architecture), or a baseline, `random` or `pixels`. Without a data root a
task runs on its toy set. Outputs: DAVIS OUT/<seq>/<frame>.png (indexed, original size: what the
toolkit reads) and the toolkit's global_results-<set>.csv, per-sequence_results-<set>.csv; JHMDB
OUT/<class>/<video>.csv (keypoints), pck.csv, per-video_pck.csv; VIP OUT/<video>/<frame>.png,
miou.csv, per-video_miou.csv; --crw-files: also what CRW's scorers read (OUT/ids/, OUT/<i>.dat).

Checked against the originals (scratch copies, not in this repo), 2026-11-23, 2-core CPU: with a
random ViT-T/16 saved as a DINO checkpoint, DINO's script (on CPU) and `--protocol dino` write 60 of
60 toy-DAVIS PNGs bit-identical at 480p, and davis2017-evaluation gives the same J&F (0.884) and
byte-identical CSVs. (At other sizes a near-tied top-k choice can flip with the summation order.)
2026-12-01: CropMAE's src/test.py + convert_davis.py with the same random ViT-S/16 and `--protocol crw
--batch 5` write 60 of 60 toy-DAVIS PNGs identical at 480x880 (0 pixels differ); toy VIP (ViT-T/16, 880x640)
30 of 30 frames identical; toy JHMDB the same PCK (26.869 / 56.364), 3 of 540 keypoints off by a top-5 tie.
Speed on 2 idle cores (`--bench`): propagation 0.22 s/frame at 480p (grid 30x52, queue 20, radius
20, top-k 7; DINO's label_propagation ~0.7 s, plus 5.7 s per video to build its mask, ours 0.01 s);
the whole run = ViT-S/16 forward (0.73 s/frame) + 0.16 s/frame; J and F of one 480x854 object-frame
1.1 ms (toolkit 3.5-7.6 ms).

Sections: Config, ViT, Checkpoints, Frames and labels on disk, Label propagation, DAVIS metric,
DAVIS, JHMDB, VIP, main, Plumbing (command line, overlays, benchmark).
"""
import argparse
import csv
import dataclasses
import functools
import glob
import inspect
import math
import os
import re
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


# -----------------------------------------------------------------------------
# Config: every field is a flag (--short-side for short_side); defaults = SiamMAE Table 4b, DAVIS

@dataclass
class Config:
    # what to run, on which data
    task: str = "davis"  # davis (object masks, J&F) | jhmdb (15 keypoints, PCK) | vip (parts, mIoU)
    ckpt: str = ""  # a checkpoint, `random` (an untrained --model) or `pixels` (raw RGB patches)
    davis: str = ""  # DAVIS-2017 root (JPEGImages/, Annotations/, ImageSets/); empty = toy DAVIS
    set: str = "val"  # ImageSets/2017/<set>.txt to run; the papers report val (30 videos)
    jhmdb: str = ""  # JHMDB root (Rename_Images/, joint_positions/, splits/); empty = toy JHMDB
    jhmdb_split: str = ""  # folder of <class>_test_split1.txt ("<v>.avi 2" = test) or a list
                           # of <class>/<video>; empty = <jhmdb>/splits/
    vip: str = ""  # VIP_Fine root (Images/, Annotations/Category_ids/, lists/); empty = toy VIP
    vip_list: str = ""  # videos, one a line; empty = <vip>/lists/val_videos.txt (50 val videos)
    out: str = ""  # results folder; empty = out/<task>/<ckpt name>-<protocol>
    eval_only: bool = False  # only score a DAVIS results folder (--results) against --davis
    results: str = ""  # the results folder for --eval-only: <results>/<seq>/<frame>.png
    # the protocol
    protocol: str = "siammae"  # siammae (Table 4b's knobs, DINO's computation) | dino (DINO's
                               # eval_video_segmentation.py, DAVIS only) | crw (CRW's code as
                               # CropMAE runs it: its computation and knobs, see CHOICES)
    topk: int = 7  # labels come from the k most similar source patches (SiamMAE: 7; DINO: 5)
    queue: int = 20  # predicted frames kept as context besides frame 0 (SiamMAE: 20; DINO: 7)
    radius: int = 20  # window |Δrow|, |Δcol| <= r on the patch grid; 0 = whole frame (SiamMAE: 20;
                      # DINO: 12)
    temperature: float = 0.1  # affinity exp(<f_t, f_s> / τ) (DINO: 0.1; SiamMAE does not say)
    sigma: float = 0.5  # JHMDB: σ of each joint's Gaussian heatmap, in patch cells (CRW: 0.5)
    keypoint_topk: int = 3  # JHMDB: keypoint = value-weighted mean of its heatmap's top k cells
                            # (CRW: 3; 1 = argmax)
    short_side: int = 480  # frames resized to this short side (DINO: 480, DAVIS' "480p")
    size_multiple: int = 64  # the long side is floored to a multiple of this (DINO: 64, 854 -> 832)
    frame_size: str = ""  # CRW's --crop_size, instead of --short-side: HxW stretches every frame to
                          # H x W (CRW: 480x880 DAVIS, 320x320 JHMDB); one number L sets the long
                          # side, the short side floored to x64 (CRW: 880 VIP, 320x240 -> 880x640)
    # the encoder
    model: str = "vit_small"  # architecture of `random`; a checkpoint's comes from its shapes
    patch_size: int = 0  # 0 = the checkpoint's (baselines: 16); set it to check a checkpoint
    heads: int = 0  # 0 = from the width (192: 3, 384: 6, 768: 12, 1024: 16); set for other widths
    checkpoint_key: str = ""  # sub-dict of a plain checkpoint; empty = the first of teacher,
                              # target_encoder, model, state_dict
    seed: int = 0  # seeds the `random` encoder
    # the machine
    batch: int = 8  # frames per forward pass (memory grows with it)
    precision: str = "bf16"  # bf16 autocast for the forward pass on CUDA (CPU: fp32) | fp32 (DINO)
    device: str = "auto"  # auto = cuda if available, else cpu
    overlay: bool = False  # also write OUT/overlays/<video>.png (a strip) and .mp4, masks blended
                           # or skeletons drawn: to see where the propagation fails
    explain: bool = False  # also write OUT/explain/<video>.png: for 3 patches of the middle frame,
                           # the top-k sources that labelled them and their weights, on the
                           # context frames (frame 0 and the queue): what propagation looks at
    compare: str = ""  # DAVIS: also run these encoders on the same videos (comma list: random, pixels
                       # -- both with --ckpt's architecture -- or checkpoints): OUT/compare.csv holds each
                       # one's J&F beside --ckpt's, OUT/compare/<video>.png the same query points' best
                       # matches in frame 0 for each, one row per encoder
    crw_files: bool = False  # also write what CRW's scorers read: VIP OUT/ids/<video>/<frame>_mask.png
                             # (grey ids, eval_vip.py), JHMDB OUT/<i>.dat (2, 15, T) in grid cells
                             # and OUT/vallist.txt (eval_pck.py); on with --protocol crw
    crw_pck: bool = False  # JHMDB: eval_pck.py's edge cases: a predicted x < 0 is lost, a frame
                           # with one visible joint (person box 0) scores it as a miss; on with
                           # --protocol crw (a joint never scored: NaN, left out; eval_pck fails)
    bench: bool = False  # time propagation, the ViT-S/16 forward and the metric at 480p, no data


PROTOCOLS = {  # (--task, --protocol) presets, applied before the flags given
    ("davis", "siammae"): dict(topk=7, queue=20, radius=20, temperature=0.1),  # Table 4b, DAVIS
    # DINO's defaults; its features are fp32 (no autocast), so fp32 makes it the same computation
    ("davis", "dino"): dict(topk=5, queue=7, radius=12, temperature=0.1, precision="fp32"),
    # Table 4b, JHMDB. Frame size not stated; CRW feeds 320 x 320 (--cropSize), squashing JHMDB's
    # 320 x 240; short side 320 keeps the aspect (x16, not x64: 427 -> 416, not 384)
    ("jhmdb", "siammae"): dict(topk=7, queue=20, radius=20, temperature=0.1, short_side=320,
                               size_multiple=16),
    # Table 4b, VIP. Frame size not stated; UVC's VIP command resizes to 560 x 560 (--scale_size)
    ("vip", "siammae"): dict(topk=10, queue=20, radius=8, temperature=0.1, short_side=560,
                             size_multiple=64),
    # CropMAE downstreams/propagation/util.py (its defaults per task, = CRW code/test.py's); fp32:
    # its src/test.py has no autocast
    ("davis", "crw"): dict(topk=7, queue=20, radius=20, temperature=0.7, frame_size="480x880",
                           precision="fp32", crw_files=True, crw_pck=True),
    ("jhmdb", "crw"): dict(topk=7, queue=20, radius=20, temperature=0.7, frame_size="320x320",
                           keypoint_topk=5, precision="fp32", crw_files=True, crw_pck=True),
    ("vip", "crw"): dict(topk=10, queue=20, radius=20, temperature=0.7, frame_size="880",
                         precision="fp32", crw_files=True, crw_pck=True),
}


@dataclass(frozen=True)
class Protocol:
    """How a protocol computes, beside its knobs: each field is one documented choice of the official
    code, and the one loop (propagate_frames) reads them. DINO = facebookresearch/dino
    eval_video_segmentation.py; CRW = ajabri/videowalk code/test.py, code/utils/test_utils.py,
    code/data/vos.py, jhmdb.py, as alexandre-eymael/CropMAE downstreams/propagation/src/ runs them."""
    float_resize: bool  # frames: bilinear resize of the /255 float image (CRW vos.py load_image,
                        # resize) or of the uint8 one, /255 after (DINO read_frame)
    std_red: float  # normalisation: red std 0.229 (CRW vos.py) or 0.228 (DINO color_normalize, sic)
    prefill: bool  # context: the queue starts full, --queue copies of frame 0 (CRW: the clip opens
                   # with video_len copies, test_utils.py context_index_bank) or empty (DINO)
    frame0_global: bool  # context: frame 0 has its own slot searched over the whole frame (CRW
                         # --long_mem 0: the mask is added to the short-term entries only) or it is
                         # windowed like the queue (DINO)
    disc: bool  # locality: Euclidean grid distance < r (CRW utils MaskedAttention) or |Δrow| <= r
                # and |Δcol| <= r (DINO restrict_neighborhood)
    softmax: bool  # weighting: softmax of cos / τ over exactly the top k (CRW test_utils.py
                   # mem_efficient_batched_affinity) or exp(cos / τ) normalised over the top k,
                   # ties kept (DINO label_propagation)
    crw_labels: bool  # labels: CRW's (vos.py: nearest to the fed size, bilinear down to the grid;
                      # dump_predictions: bilinear up, no min-max; frame 0 reconstructed; jhmdb.py
                      # heatmaps, process_pose) or DINO's (nearest down, min-max, frame 0 = given)


DINO = Protocol(float_resize=False, std_red=0.228, prefill=False, frame0_global=False, disc=False,
                softmax=False, crw_labels=False)
CRW = Protocol(float_resize=True, std_red=0.229, prefill=True, frame0_global=True, disc=True,
               softmax=True, crw_labels=True)
CHOICES = {"siammae": DINO, "dino": DINO, "crw": CRW}  # --protocol -> its computation
TOY = {  # no data root: the toy set's frames stay at their native size, no upscaling
    "davis": dict(short_side=160, size_multiple=16),  # toy DAVIS frames are 160 px high
    "jhmdb": dict(short_side=240, size_multiple=16),  # toy JHMDB frames are 320 x 240, as JHMDB's
    "vip": dict(short_side=240, size_multiple=16),  # toy VIP frames are 320 x 240
}


# -----------------------------------------------------------------------------
# ViT (timm / DINO / MAE parameter names, so every public ViT loads with strict=True)
# B batch, N = h·w patches per frame (row-major), D width, H heads, Dh = D / H, p patch size

VIT = {  # width / depth / heads (timm's sizes); a checkpoint's heads are looked up by its width
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
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √Dh) v: (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm / DINO / MAE


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

    def forward(self, x):  # (B, 3, Himg, Wimg) -> (B, N, D); the conv drops a remainder, as DINO's
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Plain ViT encoder; `grid` = the side of the square token grid it was trained on."""

    def __init__(self, dim, depth, heads, patch_size, grid, hidden=None):
        super().__init__()
        self.patch_size, self.grid = patch_size, grid
        self.patch_embed = PatchEmbed(dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden or 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_embed(self, h, w, Himg, Wimg):
        """DINO vision_transformer.py `interpolate_pos_encoding`: bicubic resize of the trained
        g x g table by the scale factor ((h + 0.1) / g, (w + 0.1) / g). A factor, not `size=`: PyTorch
        maps output pixels through the factor, and a target size changes the features measurably; the
        +0.1 guards the output size's floor against float error (DINO issue #8). As DINO, the table is
        used as is for the trained grid and a square image (a ~1.007 resize is not the identity)."""
        g, D = self.grid, self.pos_embed.shape[-1]
        if h * w == g * g and Himg == Wimg:
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        table = F.interpolate(table, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
        assert table.shape[-2:] == (h, w), f"pos-embed interpolation gave {tuple(table.shape)}"
        table = table.permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, N, D), row-major
        return torch.cat([self.pos_embed[:, :1], table], dim=1)  # cls slot unchanged: (1, 1 + N, D)

    def blocks_output(self, x):
        """x (B, 3, Himg, Wimg) normalized RGB -> (B, 1 + N, D): the last block's tokens, before the
        final norm."""
        B, _, Himg, Wimg = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        h, w = Himg // self.patch_size, Wimg // self.patch_size
        x = x + self.interpolate_pos_embed(h, w, Himg, Wimg)
        for blk in self.blocks:
            x = blk(x)
        return x

    def features(self, x):
        """-> (B, h, w, D) patch features: the last block after the final LayerNorm, cls dropped (DINO
        `extract_feature`; its vision_transformer.py `get_intermediate_layers(n=1)` applies the norm)."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.norm(self.blocks_output(x))[:, 1:].reshape(x.shape[0], h, w, -1)


class PixelFeatures(nn.Module):
    """The `pixels` baseline: a p x p patch's normalized RGB values, flattened, are its feature."""

    def __init__(self, patch_size):
        super().__init__()
        self.patch_size = patch_size

    def features(self, x):
        B, C, Himg, Wimg = x.shape
        p = self.patch_size
        h, w = Himg // p, Wimg // p
        x = x[:, :, :h * p, :w * p].reshape(B, C, h, p, w, p)  # (B, 3, h, p, w, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h, w, p * p * C)  # channel fastest


def sincos_pos_embed(dim, grid):
    """MAE util/pos_embed.py `get_2d_sincos_pos_embed`, in float64 -> (1, 1 + grid², dim) float32;
    the first half encodes the column (x), the cls row is 0."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # 10000^(-k / (D/4))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                         indexing="ij")
    ox, oy = np.outer(xs.reshape(-1), omega), np.outer(ys.reshape(-1), omega)  # (N, D/4) each
    table = np.concatenate([np.sin(ox), np.cos(ox), np.sin(oy), np.cos(oy)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table])[None].astype(np.float32))


def random_vit(name, patch_size, seed):
    """The `random` baseline: our encoder at step 0 (MAE models_mae.py `initialize_weights`)."""
    torch.manual_seed(seed)
    model = ViT(**VIT[name], patch_size=patch_size, grid=224 // patch_size)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: xavier on the flattened (out, in·p·p)
    nn.init.normal_(model.cls_token, std=0.02)
    model.pos_embed.data.copy_(sincos_pos_embed(model.pos_embed.shape[-1], model.grid))
    return model


# -----------------------------------------------------------------------------
# Checkpoints: ours (method + encoder.), timm / DINO / MAE / MSN names; shapes give the architecture

VIT_KEYS = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def read_state_dict(path, key):
    """A checkpoint file -> (its ViT's state dict, heads or decoders included, description)."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} not found; pass a file, `random` or `pixels`")
    try:  # torch.load does not check the CRC-32 torch.save writes for every record: zipfile does
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # the first record whose bytes do not match their CRC-32
        why = bad and f"record {bad} fails its CRC-32"
    except zipfile.BadZipFile:  # truncated, or a legacy pickle: torch.load judges it below
        why = None
    except Exception as e:  # a zip whose records cannot even be read
        why = f"its records are unreadable, {type(e).__name__}"
    if why:
        fail(f"{path} is corrupted ({why}); copy or download it again")
    try:  # DINO / MAE checkpoints pickle an argparse.Namespace: allow that class, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {path} as a torch checkpoint ({type(e).__name__}); pass a state dict")
    if not isinstance(obj, dict):
        fail(f"{path} holds a {type(obj).__name__}, not a state dict; pass a ViT checkpoint")
    if "method" in obj and isinstance(obj.get("model"), dict):  # siammae.py / msn.py / cmae.py
        prefix = "target_encoder." if obj["method"] == "msn" else "encoder."  # MSN: the EMA target
        sd = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
        if not sd:
            fail(f"{path}: a {obj['method']} checkpoint without {prefix}* weights; pass another")
        return sd, f"{obj['method']} checkpoint, {prefix[:-1]}, step {obj.get('step', '?')}"
    for k in [key] if key else ["teacher", "target_encoder", "model", "state_dict"]:
        if isinstance(obj.get(k), dict):
            obj, where = obj[k], f"['{k}']"
            break
    else:
        if key:
            fail(f"{path} has no '{key}' entry (it has: {', '.join(map(str, list(obj)[:6]))}); "
                 f"fix --checkpoint-key")
        where = ""
    sd = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            for pre in ("module.", "backbone."):  # DDP's and DINO's multi-crop wrapper's prefixes
                k = k[len(pre):] if k.startswith(pre) else k
            sd[k] = v
    return sd, f"plain ViT state dict{where}"


def vit_from_state_dict(sd, heads=0, patch_size=0):
    """A plain ViT (timm / DINO / MAE names) built from the tensor shapes and loaded strict ->
    (ViT, description). Other keys (heads, decoders, mask tokens, prototypes): named, not loaded."""
    kept = {k: v for k, v in sd.items() if k.startswith(VIT_KEYS)}
    dropped = sorted({k.split(".")[0] for k in sd if k not in kept})
    if "patch_embed.proj.weight" not in kept or "pos_embed" not in kept:
        fail(f"the checkpoint is not a ViT (no patch_embed.proj.weight / pos_embed; its keys start "
             f"with {', '.join(sorted({k.split('.')[0] for k in sd})[:6])}); pass a ViT checkpoint")
    w = kept["patch_embed.proj.weight"]  # (D, 3, p, p)
    D, p = w.shape[0], w.shape[-1]
    depth = len({k.split(".")[1] for k in kept if k.startswith("blocks.")})
    n = kept["pos_embed"].shape[1] - 1
    g, heads = math.isqrt(n), heads or HEADS_BY_WIDTH.get(D)
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != p or g * g != n or depth == 0:
        fail(f"the checkpoint's shapes match no ViT (patch_embed {tuple(w.shape)}, {n} position "
             f"slots, {depth} blocks); pass a square-grid RGB ViT")
    if heads is None:
        fail(f"the checkpoint's width {D} matches no known ViT (192, 384, 768, 1024); pass --heads")
    if patch_size and patch_size != p:
        fail(f"the checkpoint has patch size {p}, not --patch-size {patch_size}; drop the flag")
    fc1 = kept.get("blocks.0.mlp.fc1.weight")
    model = ViT(D, depth, heads, p, g, 4 * D if fc1 is None else fc1.shape[0])
    try:
        model.load_state_dict(kept, strict=True)
    except RuntimeError as e:
        fail(f"the checkpoint does not load into a ViT-{D}/{depth}/{heads}/p{p} "
             f"({' '.join(str(e).split())[:300]}); check --heads / the file")
    arch = dict(dim=D, depth=depth, heads=heads)
    name = next((k for k, v in VIT.items() if v == arch), f"vit_{D}d{depth}")
    note = f", ignored {', '.join(dropped)}" if dropped else ""
    return model, f"{name}/{p}, trained grid {g}x{g}{note}"


def load_encoder(ckpt, model="vit_small", patch_size=0, heads=0, checkpoint_key="", seed=0):
    """-> (encoder with .features and .patch_size, description). ckpt: a file, `random` (an
    untrained `model`, seeded) or `pixels` (PixelFeatures); patch_size 0 = the file's (else 16)."""
    if ckpt == "pixels":
        p = patch_size or 16
        return PixelFeatures(p), f"pixels baseline, {p}x{p} patches, {p * p * 3}-d features"
    if ckpt == "random":
        if model not in VIT:
            fail(f"unknown --model {model}; use one of {', '.join(VIT)}")
        p = patch_size or 16
        return random_vit(model, p, seed), f"random {model}/{p} (MAE init, seed {seed})"
    if not ckpt:
        fail("no --ckpt; pass a checkpoint, `random` or `pixels` (or --eval-only --results DIR)")
    sd, what = read_state_dict(ckpt, checkpoint_key)
    vit, desc = vit_from_state_dict(sd, heads, patch_size)
    return vit, f"{what}: {desc}"


# -----------------------------------------------------------------------------
# Frames and labels on disk (DINO eval_video_segmentation.py `read_frame`, `imwrite_indexed`)

MEAN = (0.485, 0.456, 0.406)  # ImageNet's; the std is (Protocol.std_red, 0.224, 0.225)


def davis_palette():
    """The DAVIS / PASCAL VOC colours (davis2017/utils.py `_pascal_color_map`) -> (256, 3) uint8."""
    ids = np.arange(256)
    pal = np.zeros((256, 3), np.uint8)
    for j in range(8):  # bit 3j+c of the id goes to bit 7-j of channel c
        for c in range(3):
            pal[:, c] |= (((ids >> (3 * j + c)) & 1) << (7 - j)).astype(np.uint8)
    return pal


PALETTE = davis_palette()


def save_indexed_png(path, labels):
    """Mode-P PNG with the DAVIS palette, under a temp name then renamed: never half-written."""
    im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
    im.putpalette(PALETTE.reshape(-1).tolist())
    im.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def read_index_png(path, what):
    try:
        arr = np.array(Image.open(path))
    except OSError:
        fail(f"{what} {path} is missing or unreadable; every scored frame needs <seq>/<frame>.png")
    if arr.ndim != 2:
        fail(f"{what} {path} is not an indexed (mode P / L) PNG; save object ids, not colours")
    return arr


def write_csv(path, table):
    """Rows of fields to `path`, under a temp name then renamed: a CSV is never half-written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(table)
    os.replace(path + ".tmp", path)


def fmt(v):
    """pandas' to_csv(float_format="%.3f"), as the toolkit writes: NaN becomes an empty field."""
    return "" if v != v else "%.3f" % v


def frame_name(path):
    return os.path.splitext(os.path.basename(path))[0]


def need_folders(root, subs, flag):
    for sub in subs:
        if not os.path.isdir(os.path.join(root, sub)):
            fail(f"{root} has no {sub}/ folder; pass the dataset's root with {flag}")


def protocol_size(H, W, short, multiple):
    """DINO `read_frame`: short side -> `short`, long side floored to a multiple -> (th, tw).
    (DINO's `read_seg` swaps the sides of a square frame; DAVIS has none: one rule serves both.)"""
    if H > W:
        return int(((short * H) / W) // multiple * multiple), short
    return short, int(((short * W) / H) // multiple * multiple)


def fed_size(H, W, cfg):
    """The size (th, tw) a protocol feeds an H x W frame at: --frame-size as CRW vos.py reads its
    --crop_size (two numbers: stretched; one: the long side, the short side int(short·L/long) floored
    to x64), else DINO's short-side rule."""
    if "x" in cfg.frame_size:
        return tuple(int(v) for v in cfg.frame_size.split("x"))
    if cfg.frame_size:
        L = int(cfg.frame_size)
        return (int(H * L / W) // 64 * 64, L) if W > H else (L, int(W * L / H) // 64 * 64)
    return protocol_size(H, W, cfg.short_side, cfg.size_multiple)


def read_frame(path, size, proto=None):
    """DINO `read_frame` (or CRW vos.py `load_image`, `resize`, `color_normalize` with
    proto.float_resize) -> (3, th, tw) float32, normalized, and the original BGR frame."""
    proto = proto or DINO
    bgr = cv2.imread(path)
    if bgr is None:
        fail(f"cannot read frame {path}; re-extract the video's frames")
    if proto.float_resize:  # CRW: /255 first, then cv2's bilinear on the float image
        x = cv2.resize(bgr.astype(np.float32) / 255.0, (size[1], size[0]))[:, :, ::-1]
    else:  # DINO: cv2's bilinear on uint8, then /255
        x = cv2.resize(bgr, (size[1], size[0])).astype(np.float32)[:, :, ::-1] / 255.0  # RGB
    x = torch.from_numpy(np.ascontiguousarray(x).transpose(2, 0, 1))  # (3, th, tw)
    std = (proto.std_red, 0.224, 0.225)
    for c in range(3):  # (x - mean) / std per channel, in DINO's (and CRW's) order of operations
        x[c].sub_(MEAN[c]).div_(std[c])
    return x, bgr


def frame_geometry(path, cfg, patch_size):
    """A video's sizes, off its first frame: original (H, W), fed (th, tw), patch grid (h, w)."""
    first = cv2.imread(path)
    if first is None:
        fail(f"cannot read frame {path}; re-extract the video's frames")
    H, W = first.shape[:2]
    size = fed_size(H, W, cfg)
    return (H, W), size, (size[0] // patch_size, size[1] // patch_size)


# -----------------------------------------------------------------------------
# Label propagation (DINO eval_video_segmentation.py: label_propagation, eval_video_tracking_davis)
# S context frames, N = h·w patches per frame, C label channels (classes, or JHMDB's joints).
# A protocol is four choices (Protocol's fields), each a named function here, not a line in the loop:
#              DINO (--protocol dino, siammae)          CRW (--protocol crw)
#   context    frame 0 + the last --queue predictions   frame 0 in a global slot + a queue of --queue
#              (Context)                                that starts as copies of frame 0
#   locality   square |Δ| <= --radius, every frame      disc, distance < --radius, the queue only
#              (local_window, neighbourhood_bands)
#   weighting  exp(cos / τ) over the top k, ties kept   softmax(cos / τ) over exactly the top k
#              (topk_affinity)                          (softmax_topk)
#   labels     nearest down; bilinear up, min-max       bilinear down; bilinear up, no min-max
#              (first_label, labels_to_pixels)
# propagate_frames, the loop every task shares, only strings them together.

def label_propagation(target, ctx_feats, ctx_labels, window, k, temperature):
    """The definition (DINO `label_propagation`), dense: the soft label of a target frame.
        A(t, s) = exp(<f_t, f_s> / τ) · window(t, s)    t: a target patch, s: a context frame's
        W(t, s) = A(t, s) / Σ A(t, s') over the s' whose A is >= the k-th largest A(t, ·); else 0
        label(t) = Σ_s W(t, s) · label(s)
    target (N, D), ctx_feats (S, N, D) unit length, ctx_labels (S, N, C), window (N, N) -> (N, C)"""
    S, N, D = ctx_feats.shape
    aff = torch.exp(torch.einsum("td,snd->tsn", target, ctx_feats) / temperature)  # (N, S, N)
    aff = aff * window[:, None, :]  # 0 outside the window (DINO `aff *= mask_neighborhood`)
    aff = aff.reshape(N, S * N)  # all context frames on one source axis: one top-k over them all
    kth = aff.topk(k, dim=1).values[:, -1:]  # k-th largest per target (DINO `tk_val_min`): (N, 1)
    aff = aff * (aff >= kth)  # the rest zeroed, ties kept (DINO `aff[aff < tk_val_min] = 0`)
    weights = aff / aff.sum(dim=1, keepdim=True)  # rows sum to 1 (DINO `aff / torch.sum(aff)`)
    return weights @ ctx_labels.reshape(S * N, -1)  # (N, S·N) x (S·N, C): DINO `torch.mm(segs, aff)`


def outside(di, dj, r, disc):
    """Locality: is a source (di, dj) patches from its target out of reach? DINO
    `restrict_neighborhood`: |di| > r or |dj| > r (a square); CRW `MaskedAttention`: di² + dj² >= r²
    (a disc, strict). r = 0: nothing is (the whole frame, both protocols here)."""
    far = (di ** 2 + dj ** 2 >= r * r) if disc else (di.abs() > r) | (dj.abs() > r)
    return far & (r > 0)


def local_window(h, w, r, disc=False):
    """The sources each target may draw on, cut at the borders -> (N, N) bool [target, source]."""
    i, j = (a.reshape(-1) for a in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    return ~outside(i[:, None] - i, j[:, None] - j, r, disc)


# The same computation, fast. The context is stored column-major, (w, S, h, ·): a band of target
# columns then meets its candidate sources (its columns ± r in every context frame) as one
# contiguous block, so its affinities are one matrix product and its top-k one call, and no affinity
# is computed where the window forbids it.

@functools.lru_cache(maxsize=8)  # built once per grid size (and radius, shape, device), not per video
def neighbourhood_bands(h, w, r, device, band=4, disc=False):
    """local_window in bands of `band` target columns; a band's sources
    are its columns ± r (a third less work at 30x52, r = 20). -> [(c0, c1, s0, s1, forbidden)]:
    targets = columns [c0, c1), sources = columns [s0, s1), forbidden (Tq, s1 - s0, 1, h) bool,
    broadcast over the S context frames."""
    if r == 0 or r >= w - 1:  # every band would need every column: one band, no saving to be had
        band = w
    bands = []
    for c0 in range(0, w, band):
        c1 = min(w, c0 + band)
        s0, s1 = (0, w) if r == 0 else (max(0, c0 - r), min(w, c1 + r))
        tc, tr = torch.meshgrid(torch.arange(c0, c1), torch.arange(h), indexing="ij")  # column, row
        tc, tr = tc.reshape(-1, 1, 1, 1), tr.reshape(-1, 1, 1, 1)  # (Tq, 1, 1, 1), Tq = (c1 - c0)·h
        sc, sr = torch.arange(s0, s1).view(1, -1, 1, 1), torch.arange(h).view(1, 1, 1, -1)
        bands.append((c0, c1, s0, s1, outside(tr - sr, tc - sc, r, disc).to(device)))
    return bands


def topk_affinity(logits, k, temperature):
    """label_propagation's W from the logits <f_t, f_s>: exp is increasing, so ranking the logits
    ranks A; only the kept entries are exponentiated, shifted by the row max (the same weights, no
    overflow at small τ). Ties with the k-th largest are kept, as DINO keeps them. logits (Tq, M),
    -inf outside the window -> weights, source ids: (Tq, n), n = k unless ties."""
    v, ids = logits.topk(min(k + 1, logits.shape[1]), dim=1)  # one extra shows a tie: (Tq, k + 1)
    kth = v[:, :k][:, -1:]  # k-th largest logit per target (the last one if fewer exist): (Tq, 1)
    if v.shape[1] > k and (v[:, k:] == kth).any():  # a tie at the threshold: widen to all >= it
        low = kth.clamp(min=torch.finfo(logits.dtype).min)  # so that -inf counts nothing
        v, ids = logits.topk(int((logits >= low).sum(dim=1).max()), dim=1)
    weights = torch.exp((v - v[:, :1]) / temperature)  # A up to a per-target factor
    weights = weights * (v >= kth)  # zero what is strictly below the k-th largest
    return weights / weights.sum(dim=1, keepdim=True), ids


def softmax_topk(logits, k, temperature):
    """CRW's weighting (test_utils.py `mem_efficient_batched_affinity`): the logits / τ, exactly the
    k largest (torch.topk: a tie at the k-th is cut), softmax over those k. -> (Tq, k) each."""
    v, ids = (logits / temperature).topk(min(k, logits.shape[1]), dim=1)
    return torch.softmax(v, dim=1), ids


def propagate_step(target, ctx_feats, ctx_labels, bands, k, temperature, softmax=False,
                   global_slot=None, record=None):
    """label_propagation, band by band. target (w, h, D) and ctx_feats (w, S, h, D) unit length;
    ctx_labels (w, S, h, C) -> soft label (w, h, C). softmax: CRW's weighting, else DINO's.
    global_slot (feats (N, D), labels (N, C)): a frame searched over all its N patches (CRW's frame
    0), first on the source axis. record: a list that gets each band's (weights, ids), for --explain."""
    w, S, h, D = ctx_feats.shape
    C = ctx_labels.shape[-1]
    out = target.new_empty(w, h, C)
    for c0, c1, s0, s1, forbidden in bands:
        q = target[c0:c1].reshape(-1, D)  # this band's targets: (Tq, D)
        keys = ctx_feats[s0:s1].reshape(-1, D)  # its candidate sources, all frames: (M, D)
        logits = q @ keys.T  # (Tq, D) x (D, M) -> (Tq, M): cosine similarities
        logits.view(len(q), s1 - s0, S, h).masked_fill_(forbidden, float("-inf"))  # the window
        labels = ctx_labels[s0:s1].reshape(-1, C)  # (M, C)
        if global_slot is not None:  # (Tq, N + M) and (N + M, C): frame 0 whole, then the window
            logits = torch.cat([q @ global_slot[0].T, logits], dim=1)
            labels = torch.cat([global_slot[1], labels])
        weights, ids = (softmax_topk if softmax else topk_affinity)(logits, k, temperature)
        out[c0:c1] = (weights.unsqueeze(-1) * labels[ids]).sum(1).view(c1 - c0, h, C)  # Σ W · label
        if record is not None:
            record.append((weights, ids))
    return out


class Context:
    """What a target is matched against: frame 0 with its given label, always, and a FIFO queue of
    the last `queue` predicted frames with their SOFT labels (before the argmax; never ground truth).
    DINO (`eval_video_tracking_davis`): frame 0 is slot 0 of the windowed stack, the queue starts
    empty. CRW (frame0_global, prefill): frame 0 is also `global_slot`, outside the window, and the
    queue starts as `queue` copies of it (its clip opens with video_len copies of frame 0): copies
    of the features already computed, never forwarded again. Stored (w, slots, h, ·) for
    propagate_step; the queue is a ring: the order of the context frames does not matter (the top-k
    runs over a set); `frame_of` says which frame each slot holds (for --explain)."""

    def __init__(self, feats0, label0, queue, prefill=False, frame0_global=False):
        w, h, D = feats0.shape  # frame 0: (w, h, D), (w, h, C)
        self.fixed = 0 if frame0_global else 1  # frame 0's windowed slot (DINO)
        flat = (feats0.reshape(w * h, D), label0.reshape(w * h, -1))  # (N, D), (N, C)
        self.global_slot = flat if frame0_global else None
        self.feats = feats0[:, None].repeat(1, self.fixed + queue, 1, 1)  # (w, slots, h, D)
        self.labels = label0[:, None].repeat(1, self.fixed + queue, 1, 1)  # (w, slots, h, C)
        self.queue, self.pushed = queue, queue if prefill else 0
        self.frame_of = [0] * (self.fixed + queue)

    def frames(self):  # -> (w, S, h, D), (w, S, h, C): frame 0 + the predictions so far, <= queue
        n = self.fixed + min(self.pushed, self.queue)
        return self.feats[:, :n], self.labels[:, :n]

    def push(self, feats, soft, t=0):  # a predicted frame joins, in the oldest one's slot once full
        if self.queue > 0:
            slot = self.fixed + self.pushed % self.queue
            self.feats[:, slot], self.labels[:, slot], self.frame_of[slot] = feats, soft, t
        self.pushed += 1


def propagate_frames(encoder, frames, first, size, cfg, device, amp, explain=None):
    """The loop all tasks share: frame 0's label `first` (h, w, C) on the patch grid (DAVIS / VIP
    one-hot masks, JHMDB joint heatmaps) carried through the video; yields (t, original BGR frame,
    soft label (C, h, w)), for frame 0 its given label. Frames are encoded in chunks of --batch:
    memory holds the context and one chunk, whatever the video's length."""
    proto = CHOICES[cfg.protocol]
    h, w = size[0] // encoder.patch_size, size[1] // encoder.patch_size
    bands = neighbourhood_bands(h, w, cfg.radius, device, disc=proto.disc)
    for start in range(0, len(frames), cfg.batch):
        chunk = frames[start:start + cfg.batch]
        pairs = [read_frame(f, size, proto) for f in chunk]
        if start == 0:
            H, W = pairs[0][1].shape[:2]  # every frame must have the first one's size
        for f, (_, bgr) in zip(chunk, pairs):
            if bgr.shape[:2] != (H, W):
                fail(f"{f} is {bgr.shape[1]}x{bgr.shape[0]}, frame 0 {W}x{H}; fix the frames")
        x = torch.stack([t for t, _ in pairs]).to(device)  # (B, 3, th, tw)
        with amp:
            feats = encoder.features(x).float()  # (B, h, w, D)
        feats = F.normalize(feats, dim=-1).transpose(1, 2)  # unit length (as DINO): (B, w, h, D)
        for b, t in enumerate(range(start, start + len(chunk))):
            if t == 0:
                soft = first.transpose(0, 1).to(device)  # (w, h, C)
                context = Context(feats[0], soft, cfg.queue, proto.prefill, proto.frame0_global)
            else:
                record = [] if explain and t == explain.t else None
                soft = propagate_step(feats[b].contiguous(), *context.frames(), bands, cfg.topk,
                                      cfg.temperature, proto.softmax, context.global_slot,
                                      record)  # (w, h, C)
                if record is not None:
                    explain.draw(pairs[b][1], soft, context, record, bands)
                context.push(feats[b], soft, t)
            if explain:
                explain.keep(t, pairs[b][1])
            yield t, pairs[b][1], soft.permute(2, 1, 0)  # (C, h, w)


def first_label(path, grid, fed=None):
    """The annotation, its one-hot (h, w, C) on the grid and each channel's id (C,). DINO `read_seg`
    (fed None): PIL nearest straight to the grid, C = max id + 1. CRW vos.py (fed = (th, tw)): cv2
    nearest to the fed size, a channel per id present, cv2 bilinear down to the grid (at x16: the
    mean of each patch's 2x2 centre pixels). (CRW orders its channels by BGR colour, the id order
    for DAVIS ids 0-7; the order matters only to an argmax tie.)"""
    ann = read_index_png(path, "first-frame annotation")
    h, w = grid
    if fed is not None:  # CRW keeps 255 as a class of its own, as any colour
        big = cv2.resize(ann, (fed[1], fed[0]), interpolation=cv2.INTER_NEAREST)  # (th, tw)
        ids = np.unique(big)
        onehot = (big[:, :, None] == ids).astype(np.float32)  # (th, tw, C)
        small = cv2.resize(onehot, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
        return ann, torch.from_numpy(small), ids
    small = np.array(Image.fromarray(ann).resize((w, h), Image.NEAREST))  # PIL nearest, to the grid
    # 255 (void) in a first frame would be a 256th class in DINO's script; it is not an object
    small = torch.from_numpy(np.where(small == 255, 0, small).astype(np.int64))
    ids = np.arange(int(small.max()) + 1)
    return ann, F.one_hot(small, len(ids)).float(), ids  # (h, w, C)


def crw_labels_to_pixels(soft, ids, fed, size, pil):
    """CRW test_utils.py `dump_predictions`: soft (C, h, w) -> cv2 bilinear to the fed size, no
    min-max, argmax, the channel's id; then nearest to the original size: cv2's for DAVIS
    (convert_davis.py), PIL's for VIP (eval_vip.py) -> ids (H, W) uint8."""
    up = cv2.resize(soft.permute(1, 2, 0).cpu().numpy(), (fed[1], fed[0]))  # (th, tw, C) bilinear
    lab = ids[up.reshape(fed[0], fed[1], -1).argmax(-1)].astype(np.uint8)  # cv2 drops a lone C
    if pil:
        return np.array(Image.fromarray(lab).resize((size[1], size[0]), Image.NEAREST))
    return cv2.resize(lab, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def labels_to_pixels(soft, patch_size, size):
    """DINO `eval_video_tracking_davis` + `norm_mask`: soft (C, h, w), bilinear x p, each channel
    min-max normalized where its max > 0, argmax, PIL nearest to the original size -> ids (H, W)."""
    up = F.interpolate(soft[None], scale_factor=patch_size, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]  # (C, h·p, w·p)
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)  # (C, 1, 1)
    # a constant positive channel gives 0/0 = NaN, as in DINO's loop, and torch.max (DINO's call)
    # returns the NaN's index
    up = torch.where(hi > 0, (up - lo) / (hi - lo), up)
    ids = torch.max(up, dim=0).indices.to(torch.uint8).cpu().numpy()  # (h·p, w·p)
    return np.array(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))  # as DINO


# -----------------------------------------------------------------------------
# DAVIS metric: davisvideochallenge/davis2017-evaluation, semi-supervised; numpy + OpenCV

def jaccard(pred, gt):
    """Region similarity J = |S ∩ G| / |S ∪ G| (davis2017/metrics.py `db_eval_iou`); empty: 1."""
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def boundary_map(mask):
    """metrics.py `_seg2bmap`: a pixel is boundary iff it differs from its right, lower or
    lower-right neighbour (outside = 0); the last row compares only right, the last column only
    lower, and the bottom-right pixel is never boundary. (H, W) bool -> (H, W) bool."""
    e, s, se = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    b = (mask ^ e) | (mask ^ s) | (mask ^ se)
    b[-1, :] = mask[-1, :] ^ e[-1, :]
    b[:, -1] = mask[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(r):
    """skimage.morphology.disk(r), metrics.py's footprint: the points x² + y² <= r², uint8."""
    x = np.arange(-r, r + 1)
    return ((x[None, :] ** 2 + x[:, None] ** 2) <= r * r).astype(np.uint8)


def boundary_tolerance(H, W, bound_th=0.008):
    """metrics.py `f_measure`: boundaries match within ceil(bound_th · diagonal) px (480x854: 8)."""
    return int(math.ceil(bound_th * math.hypot(H, W)))


def dilate(bmap, r):
    """Binary dilation by disk(r) (metrics.py: cv2.dilate), on the boundary's bounding box grown
    by r only: outside it the result is 0 anyway, and boundaries are thin."""
    out = np.zeros(bmap.shape, np.uint8)
    rows, cols = np.flatnonzero(bmap.any(1)), np.flatnonzero(bmap.any(0))
    if rows.size:
        r0, r1 = max(rows[0] - r, 0), min(rows[-1] + r + 1, bmap.shape[0])
        c0, c1 = max(cols[0] - r, 0), min(cols[-1] + r + 1, bmap.shape[1])
        out[r0:r1, c0:c1] = cv2.dilate(bmap[r0:r1, c0:c1].view(np.uint8), disk(r))
    return out.view(bool)


def f_measure(pred, gt, bound_th=0.008):
    """Boundary F = 2PR / (P + R) (metrics.py `db_eval_boundary`, `f_measure`): P = the predicted
    boundary's share within the tolerance of the GT boundary, R the other way round. No predicted
    boundary: P 1, R 0 (if GT has one); none in GT: P 0, R 1; neither: F = 1."""
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
    """davis2017/utils.py `db_statistics` of an object's per-frame values: Mean; Recall = share >
    0.5; Decay = mean of the first of 4 bins - mean of the last, bins v[ids[i] : ids[i+1] + 1] with
    ids = round(linspace(1, n, 5) + 1e-10) - 1 (neighbouring bins share a frame)."""
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():  # no scored frame (2-frame video): NaN, quietly
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean, recall = np.nanmean(values), np.nanmean(values > 0.5)
        # the toolkit casts ids to uint8 (wrapping beyond 256 frames; DAVIS has none): kept
        ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.uint8)
        bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
        return mean, recall, np.nanmean(bins[0]) - np.nanmean(bins[3])


def evaluate_sequence(root, results, seq):
    """Per-frame J and F of each object of a sequence -> (J, F), each (K objects, frames 1 .. n-2)
    (davis2017/evaluation.py `_evaluate_semisupervised`; masks as davis2017/davis.py
    `get_all_masks`)"""
    gt_paths = sorted(glob.glob(os.path.join(root, "Annotations", "480p", seq, "*.png")))
    if not gt_paths:
        fail(f"no annotations in {root}/Annotations/480p/{seq}/; evaluation needs every frame's")
    first = read_index_png(gt_paths[0], "annotation")
    K = int(np.where(first == 255, 0, first).max())  # objects = ids 1..K of GT frame 0, void -> 0
    J, Fm = np.zeros((K, len(gt_paths) - 2)), np.zeros((K, len(gt_paths) - 2))
    for i, gpath in enumerate(gt_paths[1:-1]):  # evaluation.py: first and last frame not scored
        gt = read_index_png(gpath, "annotation")
        gt = np.where(gt == 255, 0, gt)  # davis.py: void is background in the semi-supervised task
        name = os.path.join(results, seq, os.path.basename(gpath))
        res = read_index_png(name, "result")
        if res.shape != gt.shape:
            fail(f"result {name} is {res.shape[1]}x{res.shape[0]}, its annotation {gt.shape[1]}x"
                 f"{gt.shape[0]}; save results at the original resolution")
        if res.max() > K:
            fail(f"result {name} has id {res.max()}, {seq} has {K} objects; use frame 0's ids")
        for k in range(1, K + 1):
            J[k - 1, i] = jaccard(res == k, gt == k)
            Fm[k - 1, i] = f_measure(res == k, gt == k)
    return J, Fm


COLUMNS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]


def object_rows(seq, J, Fm):
    """A row per object, named <seq>_<k> as the toolkit does: (name, JM, JR, JD, FM, FR, FD)."""
    return [(f"{seq}_{k + 1}", *db_statistics(J[k]), *db_statistics(Fm[k])) for k in range(len(J))]


def global_results(rows):
    """evaluation_method.py: means over all objects of all sequences; J&F = (J-M + F-M) / 2."""
    cols = [np.mean([r[i] for r in rows]) for i in range(1, 7)]  # JM JR JD FM FR FD
    return [(cols[0] + cols[3]) / 2.0] + cols


def write_davis_csvs(folder, subset, rows):
    """evaluation_method.py's global_results-<set>.csv and per-sequence_results-<set>.csv."""
    g = [fmt(v) for v in global_results(rows)]
    write_csv(os.path.join(folder, f"global_results-{subset}.csv"), [COLUMNS, g])
    write_csv(os.path.join(folder, f"per-sequence_results-{subset}.csv"),
              [["Sequence", "J-Mean", "F-Mean"]] + [[r[0], fmt(r[1]), fmt(r[4])] for r in rows])
    print(f"wrote {folder}/global_results-{subset}.csv, per-sequence_results-{subset}.csv\n"
          f"--- global results for {subset} ({len(rows)} objects) ---\n"
          + " ".join(f"{c:>9}" for c in COLUMNS) + "\n" + " ".join(f"{v:>9}" for v in g))


def evaluate_folder(root, results, seqs, subset):
    """--eval-only: scores every sequence of the set in `results`, writes the two CSVs there."""
    if not os.path.isdir(results):
        fail(f"results folder {results} not found; pass --results DIR holding <seq>/<frame>.png")
    rows = []
    for i, (seq, _) in enumerate(seqs):
        rows += object_rows(seq, *evaluate_sequence(root, results, seq))
        print(f"[{i + 1}/{len(seqs)}] {seq}: J&F so far {global_results(rows)[0]:.3f}", flush=True)
    write_davis_csvs(results, subset, rows)
    return rows


# -----------------------------------------------------------------------------
# DAVIS-2017: object masks propagated from the first frame, scored by J&F

def davis_annotation(root, seq, frame):
    return os.path.join(root, "Annotations", "480p", seq, frame_name(frame) + ".png")


def check_video(frames, ann0, what):
    """Before anything is written: frame 0's annotation exists and holds ids, and every frame has frame
    0's size (read from the file headers; PIL opens lazily)."""
    if not os.path.isfile(ann0):
        fail(f"{what} has no first-frame annotation {ann0}; propagation starts from it")
    ids = read_index_png(ann0, "first-frame annotation")
    sizes = []
    for f in frames:
        try:
            with Image.open(f) as im:
                sizes.append(im.size)
        except OSError:
            fail(f"frame {f} is unreadable; replace it or drop the video from the list")
        if sizes[-1] != sizes[0]:
            fail(f"{f} is {sizes[-1][0]}x{sizes[-1][1]}, frame 0 {sizes[0][0]}x{sizes[0][1]}; fix the frames")
    return ids


def list_davis(root, subset):
    """Checks the DAVIS layout up front (nothing is written before) -> [(seq, [frame paths])]."""
    need_folders(root, ("JPEGImages", "Annotations", "ImageSets"), "--davis")
    listing = os.path.join(root, "ImageSets", "2017", f"{subset}.txt")
    if not os.path.isfile(listing):
        fail(f"{listing} not found; pass an existing --set (train, val) or fix --davis")
    out = []
    for seq in filter(None, map(str.strip, open(listing))):
        frames = sorted(glob.glob(os.path.join(root, "JPEGImages", "480p", seq, "*.jpg")))
        if not frames:
            fail(f"no frames in {root}/JPEGImages/480p/{seq}/; fix it or ImageSets/2017/{subset}.txt")
        ids0 = check_video(frames, davis_annotation(root, seq, frames[0]), f"sequence {seq}")
        check_later_ids(root, seq, ids0)
        out.append((seq, frames))
    return out


def check_later_ids(root, seq, ids0):
    """The later annotations hold only frame 0's object ids and void (255). davis2017/davis.py counts the
    objects in frame 0, so the toolkit would score any other id as background, without a word."""
    K = int(np.where(ids0 == 255, 0, ids0).max())
    for path in sorted(glob.glob(os.path.join(root, "Annotations", "480p", seq, "*.png")))[1:]:
        ids = read_index_png(path, "annotation")
        extra = np.unique(ids[(ids > K) & (ids != 255)])
        if extra.size:
            fail(f"{path} has object id {', '.join(map(str, extra))}, not among frame 0's {K} object ids; "
                 f"re-save it with frame 0's ids")


def propagate_masks(encoder, frames, ann_path, seq_dir, cfg, device, amp, overlay_dir=None,
                    ids_dir=None, explain_dir=None):
    """DAVIS and VIP, one video: the first annotation's one-hot propagated, each soft label back to
    ids; writes <seq_dir>/<frame>.png for every frame (DINO: frame 0 = the annotation; CRW: its
    reconstruction, as any frame) and, with ids_dir, the same ids as greyscale PNGs -> grid."""
    crw = CHOICES[cfg.protocol].crw_labels
    (H, W), size, grid = frame_geometry(frames[0], cfg, encoder.patch_size)
    ann, onehot, ids = first_label(ann_path, grid, size if crw else None)  # (H, W), (h, w, C), (C,)
    os.makedirs(seq_dir, exist_ok=True)
    name = os.path.basename(seq_dir)
    overlay = overlay_dir and Overlay(overlay_dir, name, len(frames), H, W)
    explain = explain_dir and Explain(explain_dir, name, len(frames), H, W, grid, cfg.queue)
    for t, bgr, soft in propagate_frames(encoder, frames, onehot, size, cfg, device, amp, explain):
        if crw:
            lab = crw_labels_to_pixels(soft, ids, size, (H, W), pil=cfg.task == "vip")  # (H, W)
        else:
            lab = ann if t == 0 else labels_to_pixels(soft, encoder.patch_size, (H, W))
        save_indexed_png(os.path.join(seq_dir, frame_name(frames[t]) + ".png"), lab)
        if ids_dir:  # CropMAE eval_vip.py reads cv2's last channel (R) of <frame>_mask.png
            os.makedirs(ids_dir, exist_ok=True)
            cv2.imwrite(os.path.join(ids_dir, frame_name(frames[t]) + "_mask.png"), lab)
        if overlay:
            overlay.add(t, blend(bgr, np.where(lab == 255, 0, lab)))
    if overlay:
        overlay.close()
    return grid


def run_davis(root, seqs, encoder, out, cfg, device, amp, overlay_dir):
    """Propagates every sequence, scores it from the PNGs just written (as --eval-only would) and
    writes the toolkit's CSVs -> the per-object rows (None for a set without full ground truth)."""
    rows, scored, t_all = [], True, time.time()
    for i, (seq, frames) in enumerate(seqs):
        t0 = time.time()
        with torch.inference_mode():
            h, w = propagate_masks(encoder, frames, davis_annotation(root, seq, frames[0]),
                                   os.path.join(out, seq), cfg, device, amp, overlay_dir,
                                   explain_dir=cfg.explain and os.path.join(out, "explain"))
        line = (f"[{i + 1}/{len(seqs)}] {seq}: {len(frames)} frames, grid {h}x{w} | "
                f"{len(frames) / (time.time() - t0):.1f} frames/s")
        n_gt = len(glob.glob(os.path.join(root, "Annotations", "480p", seq, "*.png")))
        scored = scored and n_gt == len(frames)
        if scored:
            seq_rows = object_rows(seq, *evaluate_sequence(root, out, seq))
            rows += seq_rows
            line += f" | J&F {global_results(seq_rows)[0]:.3f} | so far {global_results(rows)[0]:.3f}"
        print(line + ("" if scored else " | no ground truth beyond frame 0: not scored"), flush=True)
    print(f"propagated {sum(len(f) for _, f in seqs)} frames in {time.time() - t_all:.1f} s")
    if not scored or not rows:
        print("no scores: the set has no full ground truth (submit the folder to the DAVIS server)")
        return None
    write_davis_csvs(out, cfg.set, rows)
    return rows


# -----------------------------------------------------------------------------
# --compare: what training changed. The same videos through --ckpt and, say, `random` and `pixels`:
# each one's J&F, and a picture of where each one finds the same query points in frame 0.

def comparison_encoders(cfg, encoder):
    """The --compare encoders, loaded before anything is written -> {name: encoder}. `random` and
    `pixels` take --ckpt's architecture (its width, depth and patch size), so only training differs."""
    names, model = [n.strip() for n in cfg.compare.split(",") if n.strip()], cfg.model
    if isinstance(encoder, ViT):
        dims = encoder.patch_embed.proj.out_channels, len(encoder.blocks)
        model = next((n for n, v in VIT.items() if (v["dim"], v["depth"]) == dims), None)
        if model is None and "random" in names:
            fail(f"--compare random builds --ckpt's architecture, and width {dims[0]}, depth {dims[1]} is no "
                 f"known ViT ({', '.join(VIT)}); compare with a checkpoint instead")
    return {encoder_name(n): load_encoder(n, model, encoder.patch_size, cfg.heads, cfg.checkpoint_key, cfg.seed)[0]
            for n in names}


def encoder_name(ckpt):
    """`random`, `pixels`, or a checkpoint's folder and name: out/siammae/checkpoint.pt -> siammae-checkpoint."""
    name = os.path.splitext(os.path.basename(ckpt))[0]
    return f"{os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}-{name}" if os.path.isfile(ckpt) else name


def compare_encoders(root, seqs, encoders, out, cfg, device, amp):
    """encoders {name: (encoder, its rows or None)}: the missing rows by propagating into
    OUT/compare/<name>/ (the toolkit's files, as for --ckpt), then OUT/compare.csv and the pictures."""
    table = [["encoder"] + COLUMNS]
    for name, (encoder, rows) in encoders.items():
        if rows is None:
            print(f"--compare {name}:", flush=True)
            rows = run_davis(root, seqs, encoder.to(device).eval(), os.path.join(out, "compare", name), cfg,
                             device, amp, None)
            encoders[name] = (encoder, rows)
        table.append([name] + [fmt(v) for v in global_results(rows)])
    write_csv(os.path.join(out, "compare.csv"), table)
    print(f"wrote {out}/compare.csv\n" + "\n".join(f"{r[0]:>24} {r[1]:>9}" for r in table))
    scores = {name: global_results(rows)[0] for name, (_, rows) in encoders.items()}
    for seq, frames in seqs:
        correspondence_picture(os.path.join(out, "compare", seq + ".png"), root, seq, frames,
                               {n: e for n, (e, _) in encoders.items()}, scores, cfg, device, amp)
    print(f"wrote {out}/compare/<video>.png: each encoder's best matches in frame 0 for the same points")


def query_cells(ids, grid, n=3):
    """Up to n (row, col) query cells on the patch grid (h, w): for each of the n largest objects of the
    annotation `ids`, its most interior cell (the distance transform's peak)."""
    small = cv2.resize(ids, grid[::-1], interpolation=cv2.INTER_NEAREST)  # (h, w)
    objs = sorted((k for k in np.unique(small) if 0 < k < 255), key=lambda k: -(small == k).sum())[:n]
    cells = []
    for k in objs:
        inside = cv2.distanceTransform(np.pad(small == k, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        cells.append((int(k), *np.unravel_index(inside.argmax(), inside.shape)))
    return cells  # [(object id, row, col)]


def correspondence_picture(path, root, seq, frames, encoders, scores, cfg, device, amp, top=5):
    """One row per encoder: the middle frame t with the query points (the centres of its annotated
    objects), then frame 0 (its annotation blended in) with each query's `top` most cosine-similar
    patches boxed, over the whole frame (no --radius): where each encoder thinks the point came from."""
    t = len(frames) // 2
    ann_t = davis_annotation(root, seq, frames[t])
    if not os.path.isfile(ann_t):
        return  # a set without later annotations: no query points
    proto = CHOICES[cfg.protocol]
    ids_t, ids_0 = read_index_png(ann_t, "annotation"), read_index_png(davis_annotation(root, seq, frames[0]),
                                                                        "annotation")
    (H, W), size, _ = frame_geometry(frames[0], cfg, 1)  # the fed size does not depend on the patch size
    (x0, bgr0), (xt, bgrt) = read_frame(frames[0], size, proto), read_frame(frames[t], size, proto)
    pair = torch.stack([x0, xt]).to(device)  # (2, 3, th, tw)
    rows = []
    for name, encoder in encoders.items():  # each already on the device, in eval mode
        grid = size[0] // encoder.patch_size, size[1] // encoder.patch_size
        with torch.inference_mode(), amp:
            f = F.normalize(encoder.features(pair).float(), dim=-1)  # (2, h, w, D)
        f0 = f[0].reshape(-1, f.shape[-1])  # (h w, D)
        cw, ch = W / grid[1], H / grid[0]  # a cell in original pixels
        left, right = bgrt.copy(), blend(bgr0, ids_0, alpha=0.7)
        for k, r, c in query_cells(ids_t, grid):
            colour, centre = PALETTE[k][::-1].tolist(), (round((c + 0.5) * cw), round((r + 0.5) * ch))
            cv2.circle(left, centre, 4, colour, -1)
            cv2.circle(left, centre, 5, (255, 255, 255), 1)
            for m in (f0 @ f[1, r, c]).topk(top).indices.tolist():  # the top cosine similarities
                y, x = divmod(m, grid[1])
                cv2.rectangle(right, (round(x * cw), round(y * ch)), (round((x + 1) * cw), round((y + 1) * ch)),
                              colour, 2)
        cv2.putText(left, f"{name}: J&F {scores[name]:.3f}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (255, 255, 255), 1)
        cv2.putText(left, f"frame {t}", (4, H - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        cv2.putText(right, f"frame 0: top {top}", (4, H - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        rows.append(np.concatenate([left, right], axis=1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path[:-4] + ".tmp.png", np.concatenate(rows, axis=0))
    os.replace(path[:-4] + ".tmp.png", path)


# -----------------------------------------------------------------------------
# JHMDB: 15 pose keypoints propagated as heatmaps, scored by PCK, as CRW: ajabri/videowalk
# code/data/jhmdb.py (heatmaps), code/utils/test_utils.py `process_pose` (decoding),
# code/eval/eval_pck.py (PCK; the same file in Liusifei/UVC); xvjiarui/VFS jhmdb_dataset.py.
# J joints, T frames, N scored frames

JOINTS = ("neck", "belly", "head", "right_shoulder", "left_shoulder", "right_hip", "left_hip",
          "right_elbow", "left_elbow", "right_knee", "left_knee", "right_wrist", "left_wrist",
          "right_ankle", "left_ankle")
BONES = ((0, 1), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 3), (8, 4), (9, 5), (10, 6), (11, 7),
         (12, 8), (13, 9), (14, 10))  # (joint, parent): the skeleton of CRW test_utils.py `vis_pose`
PCK_ALPHAS = (0.1, 0.2)  # SiamMAE Table 1 reports PCK@0.1 and @0.2 (CRW's script prints 0.1 .. 0.5)


def read_joint_positions(path):
    """JHMDB joint_positions.mat -> (T, J, 2) float64 keypoints (x, y), 0-based pixels. Its `pos_img`
    is 2 x 15 x T in MATLAB's 1-based pixels; CRW, UVC and VFS all subtract 1 (VFS: "magic -1")."""
    try:  # the one use of scipy in this repo: JHMDB ships its joints as MATLAB files
        from scipy.io import loadmat
    except ImportError:
        fail("reading JHMDB's joint_positions.mat needs scipy (scipy.io.loadmat): pip install scipy")
    try:
        pos = loadmat(path).get("pos_img")
    except Exception as e:  # scipy raises ValueError, TypeError, OSError ... on a non-MATLAB file
        fail(f"cannot read {path} as a MATLAB file ({type(e).__name__}); re-extract joint_positions/")
    if (pos is None or not np.issubdtype(pos.dtype, np.number) or pos.ndim != 3
            or pos.shape[:2] != (2, len(JOINTS)) or pos.shape[2] == 0 or not np.isfinite(pos).all()):
        fail(f"{path} has no finite pos_img of shape 2 x {len(JOINTS)} x frames; re-extract it")
    return pos.transpose(2, 1, 0).astype(np.float64) - 1  # (2, J, T) -> (T, J, 2)


def jhmdb_videos(split):
    """The videos to run, as <class>/<video>: from a folder of JHMDB's split files
    (<class>_test_split1.txt, a line "<video>.avi 1|2" per video, 2 = test: 268 in split 1), or from
    a list file, a line per video: <class>/<video>, or a CRW / UVC test list line (a frame folder or
    a joint_positions.mat first)."""
    if os.path.isdir(split):
        files = sorted(glob.glob(os.path.join(split, "*_test_split1.txt")))
        if not files:
            fail(f"no <class>_test_split1.txt in {split}; pass JHMDB's split folder or a list file")
        videos = []
        for path in files:
            cls = os.path.basename(path)[:-len("_test_split1.txt")]
            for line in filter(str.strip, open(path)):
                fields = line.split()
                if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                    fail(f"{path}: line '{line.strip()}' is not '<video>.avi 1|2'; restore the file")
                if fields[1] == "2":
                    videos.append(f"{cls}/{os.path.splitext(fields[0])[0]}")
        return videos
    if not os.path.isfile(split):
        fail(f"JHMDB split {split} not found; pass --jhmdb-split (a split folder or a video list)")
    firsts = [line.split()[0] for line in filter(str.strip, open(split))]
    folders = [os.path.dirname(f) if f.endswith(".mat") else f for f in firsts]  # …/<class>/<video>
    return ["/".join(f.rstrip("/").split("/")[-2:]) for f in folders]


def list_jhmdb(root, split):
    """Checks the JHMDB layout and reads every video's joints up front (nothing is written before)
    -> [(<class>/<video>, [frame paths], joints (T, J, 2))]."""
    need_folders(root, ("Rename_Images", "joint_positions"), "--jhmdb")
    split = split or os.path.join(root, "splits")
    out = []
    for video in jhmdb_videos(split):
        frames = sorted(glob.glob(os.path.join(root, "Rename_Images", video, "*.png")))
        if not frames:
            fail(f"no frames in {root}/Rename_Images/{video}/; fix it or the split list {split}")
        mat = os.path.join(root, "joint_positions", video, "joint_positions.mat")
        if not os.path.isfile(mat):
            fail(f"video {video} has no {mat}; keypoint propagation starts from frame 1's joints")
        out.append((video, frames, read_joint_positions(mat)))
    if not out:
        fail(f"{split} lists no test video; pass JHMDB's split folder or a list with --jhmdb-split")
    return out


def cell_scale(frame_hw, size, patch_size):
    """Patch cells per original pixel along (x, y): p resized pixels a cell. Pixel and cell centres
    map onto each other, u = (x + 0.5) · scale - 0.5 (CRW maps x to x / stride, onto corners)."""
    (H, W), (th, tw) = frame_hw, size
    return np.array([tw / (patch_size * W), th / (patch_size * H)])


def keypoint_heatmaps(xy, frame_hw, size, patch_size, sigma):
    """The label JHMDB propagates (CRW jhmdb.py `JhmdbSet`): keypoints (J, 2) in pixels -> (h, w, J)
    Gaussians exp(-d² / 2σ²), d in cells from the keypoint (CRW rounds it to a cell), 0 beyond 3σ
    along either axis (CRW's (6σ + 1)² window): a joint outside the frame gives an empty map. No
    background channel: each joint is propagated alone (CRW's only serves its pictures)."""
    h, w = size[0] // patch_size, size[1] // patch_size
    uv = (xy + 0.5) * cell_scale(frame_hw, size, patch_size) - 0.5  # (J, 2) column, row in cells
    uv = torch.from_numpy(uv).float()
    du = torch.arange(w).view(1, w, 1) - uv[:, 0]  # (1, w, J)
    dv = torch.arange(h).view(h, 1, 1) - uv[:, 1]  # (h, 1, J)
    gauss = torch.exp(-(du ** 2 + dv ** 2) / (2 * sigma ** 2))  # (h, w, J)
    return gauss * ((du.abs() <= 3 * sigma) & (dv.abs() <= 3 * sigma))


def crw_heatmaps(xy, frame_hw, size, patch_size, sigma):
    """CRW jhmdb.py's label: keypoints (J, 2) in pixels -> (h, w, 1 + J). A joint at cell coordinates
    u = x · (cells per pixel), onto corners; `draw_labelmap_np`: a ceil(6σ + 1)-wide window from
    trunc(u - 3σ) (trunc, not floor: int() in Python) holding exp(-(i - c)² / 2σ²) per axis,
    c = (6σ + 1) // 2 (σ 0.5: 4 x 4 cells, the peak on the rounded cell), cut at the borders. Then
    channel 0 = 1 where no joint's map reaches (the background, as CRW's JhmdbSet)."""
    h, w = size[0] // patch_size, size[1] // patch_size
    (H, W), (th, tw) = frame_hw, size
    uv = xy * np.array([tw, th]) / np.array([W, H]) / patch_size  # (J, 2) cells, CRW's order of ops
    n, c = len(np.arange(0, 6 * sigma + 1)), (6 * sigma + 1) // 2  # window cells, its centre
    lo, hi = np.trunc(uv - 3 * sigma), np.trunc(uv + 3 * sigma + 1)  # (J, 2) window corners
    heat = np.zeros((h, w, len(xy)))
    for j, ((u0, v0), (u1, v1)) in enumerate(zip(lo, hi)):
        if u0 >= w or v0 >= h or u1 < 0 or v1 < 0:  # the window misses the frame: an empty map
            continue
        cols = np.arange(max(u0, 0), min(u1, w, u0 + n))  # the window's cells inside the frame
        rows = np.arange(max(v0, 0), min(v1, h, v0 + n))
        g = lambda i, i0: np.exp(-(i - i0 - c) ** 2 / (2 * sigma ** 2))  # noqa: E731
        heat[rows.astype(int)[:, None], cols.astype(int), j] = g(rows, v0)[:, None] * g(cols, u0)
    heat = torch.from_numpy(heat).float()
    return torch.cat([(heat.sum(-1, keepdim=True) == 0).float(), heat], dim=-1)


def heatmap_keypoints(soft, k, frame_hw, size, patch_size, corners=False):
    """Propagated heatmaps (J, h, w) -> keypoints (J, 2), original pixels: each map's k highest cells
    averaged with their values as weights (CRW test_utils.py `process_pose`, k = 3; 1 = argmax). An
    all-zero map gives NaN (CRW: -1, and the joint is left out of the person box and the score).
    Cells map to pixels centre to centre, or with `corners` as CRW (eval_pck.py: x / cells · W)."""
    J, h, w = soft.shape
    vals, ids = soft.reshape(J, h * w).topk(min(k, h * w), dim=1)  # (J, k)
    weights = vals / vals.sum(dim=1, keepdim=True)  # 0 / 0 = NaN for an empty map
    cells = torch.stack([ids % w, ids // w], dim=-1).to(soft.dtype)  # (column, row): (J, k, 2)
    uv = (weights.unsqueeze(-1) * cells).sum(dim=1).double().cpu().numpy()  # (J, 2)
    scale = cell_scale(frame_hw, size, patch_size)
    return uv / scale if corners else (uv + 0.5) / scale - 0.5


def propagate_keypoints(encoder, frames, joints, cfg, device, amp, overlay_dir=None, name="",
                        explain_dir=None):
    """JHMDB, one video: frame 1's joints as heatmaps through the shared loop, each soft heatmap back
    to keypoints -> (T, J, 2) pixels. DINO: frame 1's are the given ones (NaN where its heatmap is
    empty); CRW: CRW's heatmaps with a background channel, every frame decoded, frame 1 too."""
    crw = CHOICES[cfg.protocol].crw_labels
    (H, W), size, grid = frame_geometry(frames[0], cfg, encoder.patch_size)
    heatmaps = crw_heatmaps if crw else keypoint_heatmaps
    heat = heatmaps(joints[0], (H, W), size, encoder.patch_size, cfg.sigma)  # (h, w, [1 +] J)
    pred = np.full((len(frames), len(JOINTS), 2), np.nan)
    overlay = overlay_dir and Overlay(overlay_dir, name, len(frames), H, W)
    explain = explain_dir and Explain(explain_dir, name, len(frames), H, W, grid, cfg.queue)
    for t, bgr, soft in propagate_frames(encoder, frames, heat, size, cfg, device, amp, explain):
        if t == 0 and not crw:
            pred[0] = np.where(heat.sum(dim=(0, 1)).numpy()[:, None] > 0, joints[0], np.nan)
        else:  # CRW process_pose drops the background channel
            pred[t] = heatmap_keypoints(soft[1:] if crw else soft, cfg.keypoint_topk, (H, W), size,
                                        encoder.patch_size, corners=crw)
        if overlay:
            overlay.add(t, draw_skeleton(bgr, pred[t]))
    if overlay:
        overlay.close()
    return pred


def normalized_distances(pred, gt, crw=False):
    """CRW eval_pck.py: a keypoint's distance to the truth over the person's size in that frame, 0.6 x
    the diagonal of the box around the frame's ground-truth joints (CRW, UVC and VFS alike). Joints
    without a prediction (NaN) stay out of the box and the score (CRW's `jnt_visible`); a box of size
    0 scores nothing. With `crw` (--crw-pck) as eval_pck.py at its edges: a predicted x < 0 is lost
    too, the box starts from min 1e6 / max -1, and a box of 0 (one visible joint) divides to inf or
    NaN, a miss that counts. pred, gt (N, J, 2) -> (N, J), NaN = not scored."""
    with np.errstate(invalid="ignore"):
        found = np.isfinite(pred).all(axis=-1) & ((pred[..., 0] >= 0) | (not crw))  # (N, J)
    lo = np.where(found[..., None], gt, np.inf).min(axis=1)  # (N, 2)
    hi = np.where(found[..., None], gt, -np.inf).max(axis=1)
    if crw:
        lo, hi = np.minimum(lo, 1e6), np.maximum(hi, -1.0)
    person = 0.6 * np.linalg.norm(hi - lo, axis=-1)[:, None]  # (N, 1); NaN where none is found
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.linalg.norm(pred - gt, axis=-1) / person  # (N, J)
        return np.where(found & (person > 0), d, np.where(found & crw, np.inf, np.nan))


def pck(dist, alpha):
    """PCK@α in %: per joint, the share of its scored frames with distance <= α (CRW: `<=`); the
    mean is over the joints (CRW eval_pck.py `computePCK`). dist (N, J) -> (J,), mean."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # a joint never scored is NaN
        per_joint = 100.0 * (dist <= alpha).sum(axis=0) / (~np.isnan(dist)).sum(axis=0)
        return per_joint, np.nanmean(per_joint)


def write_crw_keypoints(out, i, pred, scale):
    """CRW test.py's keypoint file <out>/<i>.dat (i = the video's line in the list): a pickled (2, J, T)
    float32 array of cell coordinates (x = pixels · cells per pixel), -1 = lost, as eval_pck.py
    reads it back (np.load(allow_pickle=True); x / feat_res · width)."""
    cells = np.nan_to_num(pred * scale, nan=-1.0).transpose(2, 1, 0).astype(np.float32)  # (2, J, T)
    cells.dump(os.path.join(out, f"{i}.dat.tmp"))
    os.replace(os.path.join(out, f"{i}.dat.tmp"), os.path.join(out, f"{i}.dat"))


def run_jhmdb(root, videos, encoder, out, cfg, device, amp, overlay_dir):
    """Propagates and scores every video, frames 2.. (frame 1 is given: CRW and UVC skip it). Writes
    <class>/<video>.csv (keypoints, 0-based pixels, empty = lost), pck.csv (per joint and mean) and
    per-video_pck.csv, in %, and with --crw-files <i>.dat and vallist.txt (eval_pck.py's inputs)
    -> the means and the per-joint values."""
    dists, rows, t_all = [], [], time.time()
    header = ["frame"] + [f"{j}_{c}" for j in JOINTS for c in "xy"]
    for i, (name, frames, joints) in enumerate(videos):
        t0 = time.time()
        with torch.inference_mode():
            pred = propagate_keypoints(encoder, frames, joints, cfg, device, amp, overlay_dir, name,
                                       cfg.explain and os.path.join(out, "explain"))
        xy_rows = [[frame_name(f)] + [fmt(v) for v in xy.reshape(-1)] for f, xy in zip(frames, pred)]
        write_csv(os.path.join(out, name + ".csv"), [header] + xy_rows)
        if cfg.crw_files:
            (H, W), size, grid = frame_geometry(frames[0], cfg, encoder.patch_size)
            write_crw_keypoints(out, i, pred, cell_scale((H, W), size, encoder.patch_size))
        n = min(len(frames), len(joints))  # frames beyond the ground truth's: not scored (as VFS)
        dists.append(normalized_distances(pred[1:n], joints[1:n], cfg.crw_pck))
        rows.append([name] + [pck(dists[-1], a)[1] for a in PCK_ALPHAS])
        so_far = [pck(np.concatenate(dists), a)[1] for a in PCK_ALPHAS]
        print(f"[{i + 1}/{len(videos)}] {name}: {len(frames)} frames | "
              f"{len(frames) / (time.time() - t0):.1f} frames/s | PCK@0.1 {rows[-1][1]:.1f}, "
              f"@0.2 {rows[-1][2]:.1f} | so far {so_far[0]:.1f}, {so_far[1]:.1f}", flush=True)
    dist = np.concatenate(dists)  # (N, J): every scored frame of every video
    table = {a: pck(dist, a) for a in PCK_ALPHAS}
    header = [f"PCK@{a} (%)" for a in PCK_ALPHAS]
    lines = [["joint"] + header] + [[j] + [fmt(table[a][0][k]) for a in PCK_ALPHAS]
                                    for k, j in enumerate(JOINTS)]
    lines.append(["mean"] + [fmt(table[a][1]) for a in PCK_ALPHAS])
    write_csv(os.path.join(out, "pck.csv"), lines)
    write_csv(os.path.join(out, "per-video_pck.csv"),
              [["video"] + header] + [[r[0], *map(fmt, r[1:])] for r in rows])
    print(f"propagated {len(videos)} videos in {time.time() - t_all:.1f} s; wrote {out}/pck.csv, "
          f"per-video_pck.csv\n--- PCK (%) over {len(dist)} frames of {len(videos)} videos ---")
    for r in lines:
        print(f"{r[0]:>15} " + " ".join(f"{v:>12}" for v in r[1:]))
    if cfg.crw_files:  # eval_pck.py's list: "<joint_positions.mat> <frame folder>" a video, in order
        path = lambda *p: os.path.abspath(os.path.join(root, *p))  # noqa: E731
        with open(os.path.join(out, "vallist.txt"), "w") as f:
            f.writelines(f"{path('joint_positions', v, 'joint_positions.mat')} "
                         f"{path('Rename_Images', v)}\n" for v, _, _ in videos)
        print(f"wrote {out}/<i>.dat and vallist.txt: CRW eval_pck.py main() with --filelist "
              f"{out}/vallist.txt --src_folder {out} --feat_res {grid[1]} {grid[0]}")
    means = {f"PCK@{a}": table[a][1] for a in PCK_ALPHAS}
    return means | {"per_joint": {a: table[a][0] for a in PCK_ALPHAS}}


# -----------------------------------------------------------------------------
# VIP: 20 human-part classes propagated like DAVIS masks, scored by mIoU, as CRW: ajabri/videowalk
# code/eval/eval_vip.py (= UVC's, from TimeCycle); UVC test_mask_vip.py (layout, list); xvjiarui/VFS
# vip_dataset.py; HCPLab-SYSU/ATEN issue #3: only the annotated frames are scored.

VIP_CLASSES = ("background", "hat", "hair", "sun-glasses", "upper-clothes", "dress", "coat", "socks",
               "pants", "gloves", "scarf", "skirt", "torso-skin", "face", "right-arm", "left-arm",
               "right-leg", "left-leg", "right-shoe", "left-shoe")  # ids 0..19 (eval_vip.py); 255 none


def vip_annotation(root, video, frame):
    return os.path.join(root, "Annotations", "Category_ids", video, frame_name(frame) + ".png")


def list_vip(root, listing):
    """Checks the VIP layout up front -> [(video, [frame paths])]: Images/<video>/*.jpg, and each
    video's first frame annotated in Annotations/Category_ids/<video>/ with ids below 20."""
    need_folders(root, ("Images", os.path.join("Annotations", "Category_ids")), "--vip")
    listing = listing or os.path.join(root, "lists", "val_videos.txt")
    if not os.path.isfile(listing):
        fail(f"video list {listing} not found; pass --vip-list or fix --vip")
    out = []
    for line in filter(str.strip, open(listing)):
        video = line.strip().split("/")[-1]  # UVC takes the name after the last "/"
        frames = sorted(glob.glob(os.path.join(root, "Images", video, "*.jpg")))
        if not frames:
            fail(f"no frames in {root}/Images/{video}/; fix the folder or the list {listing}")
        ann0 = vip_annotation(root, video, frames[0])
        ids = check_video(frames, ann0, f"video {video}")
        if ids[ids != 255].max(initial=0) >= len(VIP_CLASSES):
            fail(f"{ann0} has id {ids[ids != 255].max()}; VIP has 20 classes (0-19, 255 = none)")
        out.append((video, frames))
    return out


def confusion(gt, pred, n):
    """n x n pixel counts, rows = ground-truth class, columns = predicted (CRW eval_vip.py
    `fast_hist`); ground-truth ids outside 0..n-1 (255, unlabelled) are not counted."""
    k = gt < n
    return np.bincount(n * gt[k].astype(np.int64) + pred[k], minlength=n * n).reshape(n, n)


def mean_iou(hist):
    """IoU_c = TP / (GT_c + predicted_c - TP) (CRW eval_vip.py `show_result`: one matrix over all
    scored pixels of all videos); a class in neither is 0/0 = NaN, left out of the mean."""
    tp = np.diag(hist).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # an empty matrix: NaN
        iou = tp / (hist.sum(axis=0) + hist.sum(axis=1) - tp)
        return iou, np.nanmean(iou)


def vip_confusion(root, results, video, frames):
    """A video's confusion matrix over its annotated frames, the first included (its result is the
    annotation: CRW, UVC and VFS score every annotated frame they write) -> (hist, frames scored)."""
    n = len(VIP_CLASSES)
    hist, scored = np.zeros((n, n), np.int64), 0
    for f in frames:
        gpath = vip_annotation(root, video, f)
        if not os.path.isfile(gpath):  # VIP labels only some frames, only those are evaluated
            continue
        gt = read_index_png(gpath, "annotation")
        res = read_index_png(os.path.join(results, video, frame_name(f) + ".png"), "result")
        if res.shape != gt.shape:
            fail(f"{gpath} is {gt.shape[1]}x{gt.shape[0]}, its frame {res.shape[1]}x{res.shape[0]}; "
                 f"fix the data")
        hist, scored = hist + confusion(gt, res, n), scored + 1
    return hist, scored


def run_vip(root, videos, encoder, out, cfg, device, amp, overlay_dir):
    """Propagates every video like DAVIS (OUT/<video>/<frame>.png), scores its annotated frames; writes
    miou.csv (per class and mean) and per-video_miou.csv, in % -> the mean and per-class IoU."""
    total, rows, t_all = 0, [], time.time()
    for i, (video, frames) in enumerate(videos):
        t0 = time.time()
        with torch.inference_mode():
            h, w = propagate_masks(encoder, frames, vip_annotation(root, video, frames[0]),
                                   os.path.join(out, video), cfg, device, amp, overlay_dir,
                                   cfg.crw_files and os.path.join(out, "ids", video),
                                   cfg.explain and os.path.join(out, "explain"))
        hist, scored = vip_confusion(root, out, video, frames)
        total = total + hist
        rows.append([video, 100 * mean_iou(hist)[1]])
        print(f"[{i + 1}/{len(videos)}] {video}: {len(frames)} frames, grid {h}x{w} | "
              f"{len(frames) / (time.time() - t0):.1f} frames/s | {scored} annotated | "
              f"mIoU {rows[-1][1]:.1f} | so far {100 * mean_iou(total)[1]:.1f}", flush=True)
    iou, miou = mean_iou(total)
    per_class = [[c, fmt(100 * v)] for c, v in zip(VIP_CLASSES, iou)]
    write_csv(os.path.join(out, "miou.csv"),
              [["class", "IoU (%)"]] + per_class + [["mean", fmt(100 * miou)]])
    write_csv(os.path.join(out, "per-video_miou.csv"),
              [["video", "mIoU (%)"]] + [[r[0], fmt(r[1])] for r in rows])
    print(f"propagated {len(videos)} videos in {time.time() - t_all:.1f} s; wrote {out}/miou.csv, "
          f"per-video_miou.csv\n--- IoU (%) per class, {len(videos)} videos ---\n"
          + " ".join(f"{c}: {v or '-'}" for c, v in per_class)
          + f"\nmIoU {miou:.4f} = {100 * miou:.2f} % (eval_vip.py prints the fraction)")
    if cfg.crw_files:
        print(f"wrote {out}/ids/<video>/<frame>_mask.png: CropMAE eval_vip.py -p {out}/ids -g "
              f"{root}/Annotations/Category_ids")
    return {"mIoU": 100 * miou, "IoU": 100 * iou}


# -----------------------------------------------------------------------------
# main: check the inputs (nothing is written before), build the encoder, propagate and score

def main(argv=None):
    cfg = parse_config(argv)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    bf16 = device.type == "cuda" and cfg.precision == "bf16"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    # TF32 stays at PyTorch's default (off for matmuls): as DINO's run, the affinities exact fp32
    print(f"device {device} | forward {'bf16 autocast' if bf16 else 'fp32'}", flush=True)
    if cfg.bench:
        return bench(cfg, device, amp)
    root = getattr(cfg, cfg.task)
    if not root:  # the task's toy set (toydata.py is imported only then: this file stands alone)
        import toydata
        root = os.path.join(toydata.ensure_toy_data(), cfg.task.upper())  # DAVIS/, JHMDB/, VIP/
        size = f"frames {cfg.frame_size}" if cfg.frame_size else f"frames at their native size {TOY[cfg.task]}"
        print(f"no --{cfg.task}: the toy set at {root}, {size}")
    if cfg.eval_only:
        return evaluate_folder(root, cfg.results, list_davis(root, cfg.set), cfg.set)
    if cfg.task == "jhmdb":  # each lister checks its data before anything is written
        videos = list_jhmdb(root, cfg.jhmdb_split)
    else:
        videos = list_vip(root, cfg.vip_list) if cfg.task == "vip" else list_davis(root, cfg.set)
    encoder, desc = load_encoder(cfg.ckpt, cfg.model, cfg.patch_size, cfg.heads, cfg.checkpoint_key,
                                 cfg.seed)
    others = comparison_encoders(cfg, encoder) if cfg.compare else {}
    encoder = encoder.to(device).eval()
    n_params = sum(p.numel() for p in encoder.parameters())
    print(f"encoder: {desc} ({n_params / 1e6:.1f}M params) | {len(videos)} videos")
    name = encoder_name(cfg.ckpt)
    out = cfg.out or os.path.join("out", cfg.task, f"{name}-{cfg.protocol}")
    overlay_dir = os.path.join(out, "overlays") if cfg.overlay else None
    os.makedirs(overlay_dir or out, exist_ok=True)
    run = {"davis": run_davis, "jhmdb": run_jhmdb, "vip": run_vip}[cfg.task]
    rows = run(root, videos, encoder, out, cfg, device, amp, overlay_dir)
    if others and rows is not None:
        compare_encoders(root, videos, {name: (encoder, rows), **{n: (e, None) for n, e in others.items()}},
                         out, cfg, device, amp)
    return rows


# -----------------------------------------------------------------------------
# Plumbing: command line, overlays, benchmark

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
    """Config from the command line: defaults < the (--task, --protocol) preset < the toy preset (no
    data root) < the flags given. Bool flags are --x / --no-x. Prints the knobs and the overrides."""
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    helps = config_help()
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=None)
        kw["help"] = f"{helps.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            ap.add_argument(flag, type=f.type, metavar=f.type.__name__.upper(), **kw)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    task, protocol = given.get("task", Config.task), given.get("protocol", Config.protocol)
    if task not in TOY:
        fail(f"unknown --task {task}; use one of {', '.join(TOY)}")
    if (task, protocol) not in PROTOCOLS:
        fail(f"no --protocol {protocol} for --task {task}; use one of "
             f"{', '.join(p for t, p in PROTOCOLS if t == task)}")
    toy = TOY[task] if not given.get(task) and not given.get("bench") else {}  # no data root
    preset = {**PROTOCOLS[task, protocol], **toy}
    cfg = Config(**{**preset, **given})
    if cfg.precision not in ("bf16", "fp32"):
        fail(f"unknown --precision {cfg.precision}; use bf16 or fp32")
    if cfg.eval_only and (cfg.task != "davis" or not cfg.results):
        fail("--eval-only scores a DAVIS results folder: it needs --results DIR (<seq>/<frame>.png) "
             "and --task davis (JHMDB and VIP are scored as they are propagated)")
    if cfg.compare and cfg.task != "davis":
        fail("--compare scores encoders by J&F: it needs --task davis")
    if cfg.topk < 1 or cfg.queue < 0 or cfg.radius < 0 or cfg.temperature <= 0 or cfg.batch < 1:
        fail("--topk and --batch must be >= 1, --queue and --radius >= 0, --temperature > 0")
    if cfg.sigma <= 0 or cfg.keypoint_topk < 1:
        fail("--sigma must be > 0 and --keypoint-topk >= 1")
    if not re.fullmatch(r"([1-9]\d*(x[1-9]\d*)?)?", cfg.frame_size):
        fail(f"--frame-size {cfg.frame_size} is neither HxW (480x880) nor one long side (880)")
    if cfg.frame_size and min(int(v) for v in cfg.frame_size.split("x")) < 64:
        fail(f"--frame-size {cfg.frame_size} is under 64 px; give the size fed to the ViT")
    size = (f"frames {cfg.frame_size}" if cfg.frame_size else
            f"short side {cfg.short_side} (long side x{cfg.size_multiple})")
    print(f"task {task}, protocol {protocol}: top-k {cfg.topk}, queue {cfg.queue}, radius "
          f"{cfg.radius}, temperature {cfg.temperature}, {size}"
          + (f", heatmap σ {cfg.sigma}, keypoint top-{cfg.keypoint_topk}" if task == "jhmdb" else ""))
    for k in sorted(k for k in given if k in preset and given[k] != preset[k]):
        print(f"overriding {k} = {given[k]} (preset {preset[k]})")
    return cfg


def blend(bgr, ids, alpha=0.5):
    """Overlay picture: object pixels mixed half-half with their palette colour (davis2017/utils.py
    `overlay_semantic_mask`) and outlined in it: where a mask leaks or shrinks is what to look at."""
    colour = PALETTE[ids][:, :, ::-1].astype(np.float32)  # RGB palette -> BGR as the frame
    out = bgr.astype(np.float32)
    fg = ids > 0
    out[fg] = alpha * out[fg] + (1 - alpha) * colour[fg]
    out = out.round().astype(np.uint8)
    for k in np.unique(ids[fg]):
        contours = cv2.findContours((ids == k).astype(np.uint8), cv2.RETR_LIST,
                                    cv2.CHAIN_APPROX_SIMPLE)[0]
        cv2.drawContours(out, contours, -1, PALETTE[k][::-1].tolist(), 1)
    return out


def draw_skeleton(bgr, xy):
    """--overlay picture of a JHMDB frame: bones as lines, joints as dots, in the joints' colours."""
    pic, found = bgr.copy(), np.isfinite(xy).all(axis=1)
    pts = [tuple(p) for p in np.where(found[:, None], xy, 0).round().astype(int).tolist()]
    for j, parent in BONES:
        if found[j] and found[parent]:
            cv2.line(pic, pts[j], pts[parent], PALETTE[j + 1][::-1].tolist(), 2, cv2.LINE_AA)
    for j in np.flatnonzero(found):
        cv2.circle(pic, pts[j], 3, PALETTE[j + 1][::-1].tolist(), -1, cv2.LINE_AA)
    return pic


class Overlay:
    """--overlay pictures of one video: every frame's into <dir>/<video>.mp4, six of them side by
    side in <dir>/<video>.png (240 px high)."""

    def __init__(self, folder, seq, n_frames, H, W):
        self.png = os.path.join(folder, seq + ".png")
        os.makedirs(os.path.dirname(self.png), exist_ok=True)  # JHMDB names are <class>/<video>
        self.video = cv2.VideoWriter(os.path.join(folder, seq + ".mp4"),
                                     cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
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


class Explain:
    """--explain picture of one video, <dir>/<video>.png: at its middle frame, for 3 target patches
    (where the 3 largest labels peak; channel 0, the background, left out), the sources that
    labelled them, boxed on the context frames that hold them (frame 0 first) with their weights
    (summed where CRW's copies of frame 0 repeat a patch); the target frame first, its 3 patches
    dotted. These are the weights propagate_step used (its `record`), not a re-computation."""

    def __init__(self, folder, name, n_frames, H, W, grid, queue):
        self.path, self.t, self.queue = os.path.join(folder, name + ".png"), n_frames // 2, queue
        self.hw, self.grid, self.pics = (H, W), grid, {}
        self.scale = 240 / H  # panels 240 px high

    def keep(self, t, bgr):  # frame 0 and the frames the queue may still hold
        self.pics = {s: p for s, p in self.pics.items() if s == 0 or s >= t - self.queue} | {t: bgr}

    def panel(self, bgr, title):
        pic = cv2.resize(bgr, (round(self.hw[1] * self.scale), 240), interpolation=cv2.INTER_AREA)
        cv2.putText(pic, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        return pic

    def cell(self, col, row):  # a patch cell's corners in panel pixels
        h, w = self.grid
        sx, sy = self.hw[1] * self.scale / w, 240 / h
        return (round(col * sx), round(row * sy)), (round((col + 1) * sx), round((row + 1) * sy))

    def draw(self, bgr, soft, context, record, bands):
        """soft (w, h, C): frame t's label; record: each band's (weights, ids) from propagate_step."""
        h = self.grid[0]
        chans = soft[..., 1:] if soft.shape[-1] > 1 else soft  # (w, h, C')
        top = chans.sum(dim=(0, 1)).topk(min(3, chans.shape[-1])).indices.tolist()
        queries = [divmod(int(chans[..., c].argmax()), h) for c in top]  # (col, row) each
        N, S = self.grid[0] * self.grid[1], context.frames()[0].shape[1]
        boxes = {}  # (frame, query, col, row) -> weight
        for qn, (col, row) in enumerate(queries):
            b = next(i for i, band in enumerate(bands) if band[0] <= col < band[1])
            c0, _, s0 = bands[b][:3]
            weights, ids = (x[(col - c0) * h + row].tolist() for x in record[b])
            for wt, m in zip(weights, ids):
                if context.global_slot is not None and m < N:  # the global slot: frame 0, (w, h)
                    key = (0, qn, m // h, m % h)
                else:  # the band's sources, laid out (columns, S slots, h rows)
                    m -= N if context.global_slot is not None else 0
                    key = (context.frame_of[m // h % S], qn, s0 + m // (S * h), m % h)
                boxes[key] = boxes.get(key, 0.0) + wt
        target = self.panel(bgr, f"frame {self.t}: 3 target patches")
        for qn, (col, row) in enumerate(queries):
            (x0, y0), (x1, y1) = self.cell(col, row)
            colour = PALETTE[qn + 1][::-1].tolist()
            cv2.circle(target, ((x0 + x1) // 2, (y0 + y1) // 2), 5, colour, -1)
        panels = [target]
        for f in sorted({k[0] for k in boxes}):
            pic = self.panel(self.pics[f], f"frame {f}")
            for (g, qn, col, row), wt in boxes.items():
                if g == f and wt > 0:
                    (x0, y0), (x1, y1) = self.cell(col, row)
                    colour = PALETTE[qn + 1][::-1].tolist()
                    cv2.rectangle(pic, (x0, y0), (x1, y1), colour, 1 + round(2 * wt))
                    cv2.putText(pic, f"{wt:.2f}", (x0, y0 - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.3,
                                colour, 1)
            panels.append(pic)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        cv2.imwrite(self.path[:-4] + ".tmp.png", np.concatenate(panels, axis=1))
        os.replace(self.path[:-4] + ".tmp.png", self.path)


def timed(fn, sync, repeat):
    """Median seconds of `repeat` calls, after one warm-up call (allocations, kernel selection)."""
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(cfg, device, amp):
    """--bench, at DAVIS 480p without data: propagation (the dense definition and the banded path),
    the ViT-S/16 forward pass, a whole synthetic video, the metric."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    h, w, D, S = 30, 52, 384, 1 + cfg.queue  # the ViT-S/16 grid of 480x832; frame 0 + a full queue
    feats = F.normalize(torch.randn(w, S, h, D, generator=g), dim=-1).to(device)
    labels = torch.softmax(4 * torch.randn(w, S, h, 3, generator=g), dim=-1).to(device)  # 3 classes
    target = F.normalize(torch.randn(w, h, D, generator=g), dim=-1).to(device)
    bands = neighbourhood_bands(h, w, cfg.radius, device)
    dense = [x.movedim(0, -2).flatten(-3, -2) for x in (target, feats, labels)]  # (…, h·w, ·)
    window = local_window(h, w, cfg.radius).to(device)
    with torch.inference_mode():
        t_dense = timed(lambda: label_propagation(*dense, window, cfg.topk, cfg.temperature), sync, 1)
        t_prop = timed(lambda: propagate_step(target, feats, labels, bands, cfg.topk,
                                              cfg.temperature), sync, 5)
        soft = propagate_step(target, feats, labels, bands, cfg.topk, cfg.temperature)
        t_pix = timed(lambda: labels_to_pixels(soft.permute(2, 1, 0), 16, (480, 854)), sync, 5)
    print(f"propagation, grid {h}x{w}, {S} context frames, radius {cfg.radius}, top-k {cfg.topk}: "
          f"{t_prop:.3f} s/frame (dense definition: {t_dense:.3f} s); back to pixels (upsample, "
          f"argmax, resize) {t_pix * 1000:.0f} ms/frame")

    model = random_vit("vit_small", 16, 0).to(device).eval()
    B = max(1, min(cfg.batch, 4 if device.type == "cpu" else 32))
    x = torch.randn(B, 3, 480, 832, generator=g).to(device)
    with torch.inference_mode(), amp:
        t_vit = timed(lambda: model.features(x), sync, 2 if device.type == "cpu" else 5) / B
    print(f"ViT-S/16 forward, 480x832, batch {B}: {t_vit:.3f} s/frame")

    T, rng = cfg.queue + 4, np.random.default_rng(0)  # a synthetic video; the queue fills
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for sub in ("JPEGImages", "Annotations", "out"):
            os.makedirs(os.path.join(tmp, sub, "480p", "synthetic"))
        for t in range(T):  # a grey square drifting over a noise background
            img = rng.integers(0, 256, (480, 854, 3), dtype=np.uint8)
            lab = np.zeros((480, 854), np.uint8)
            img[100:300, 200 + 8 * t:400 + 8 * t], lab[100:300, 200 + 8 * t:400 + 8 * t] = 128, 1
            paths.append(os.path.join(tmp, "JPEGImages", "480p", "synthetic", f"{t:05d}.jpg"))
            cv2.imwrite(paths[-1], img)
            save_indexed_png(davis_annotation(tmp, "synthetic", paths[-1]), lab)
        t0 = time.perf_counter()
        with torch.inference_mode():
            propagate_masks(model, paths, davis_annotation(tmp, "synthetic", paths[0]),
                            os.path.join(tmp, "out", "synthetic"), cfg, device, amp)
        t_run = (time.perf_counter() - t0) / T
        t0 = time.perf_counter()
        evaluate_sequence(tmp, os.path.join(tmp, "out"), "synthetic")
        t_eval = (time.perf_counter() - t0) / T
    print(f"whole run, {T}-frame 480x854 video, ViT-S/16: {t_run:.3f} s/frame = forward + "
          f"{t_run - t_vit:.3f} s; + scoring {t_eval * 1000:.0f} ms/frame")

    yy, xx = np.mgrid[0:480, 0:854]
    gt = (yy - 240) ** 2 / 120 ** 2 + (xx - 400) ** 2 / 200 ** 2 < 1  # an ellipse and a wobblier one
    pred = (yy - 250) ** 2 / 110 ** 2 + (xx - 420 + 15 * np.sin(yy / 9)) ** 2 / 210 ** 2 < 1
    t_metric = timed(lambda: (jaccard(pred, gt), f_measure(pred, gt)), lambda: None, 20)
    print(f"J and F of one 480x854 object-frame: {t_metric * 1000:.1f} ms "
          f"(J {jaccard(pred, gt):.3f}, F {f_measure(pred, gt):.3f})")
    return dict(dense_s=t_dense, propagation_s=t_prop, pixels_s=t_pix, vit_s=t_vit, run_s=t_run,
                metric_ms=t_metric * 1000)


if __name__ == "__main__":
    main()
