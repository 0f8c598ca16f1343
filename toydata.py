"""
Procedural toy datasets in the REAL on-disk formats, so the real loaders are what the tests exercise.

    python toydata.py OUT            # writes OUT/ucf101, OUT/images, OUT/DAVIS in a few seconds, a few MB
    python toydata.py OUT --seed 1   # another draw; the same seed always gives the same files

What it writes (the layouts the real datasets use):
    OUT/ucf101/<ClassName>/v_<ClassName>_gNN_cNN.avi        UCF101: XviD AVI, 25 fps, 4:3
    OUT/images/{train,val}/<class>/NNNN.png                  ImageFolder tree (MSN / CMAE / --eval)
    OUT/DAVIS/JPEGImages/480p/<seq>/00000.jpg                DAVIS-2017 frames
    OUT/DAVIS/Annotations/480p/<seq>/00000.png               indexed PNG, DAVIS palette, ids 1..K, 255 = void
    OUT/DAVIS/ImageSets/2017/{train,val}.txt                 sequence lists

Why the content looks like this: correspondence must be something a model has to LEARN, not read off a colour.
Every scene is textured objects over a textured background; the camera pans; several objects move, occlude
each other (fixed depth order) and may leave the frame. Colours are random per object, so an object is
identified by its texture and shape, and image classes are told apart by shape, never by colour.
The "480p" folder holds small frames (160 px high, like a downscaled DAVIS), which keeps CPU tests fast.
"""
import argparse
import os
import shutil
import sys

import cv2
import numpy as np
from PIL import Image

VERSION = "2"  # bump when the generated content changes, so cached ./toy_data folders are remade
UCF_CLASSES = ["BlobDrift", "CrossingShapes", "FastPan", "Occluders"]  # toy stand-ins for UCF101's 101 classes
IMAGE_CLASSES = ["disc", "square", "triangle", "cross", "ring", "star"]
DAVIS_SEQS = {  # name: (height, width, frames, objects, split); widths differ on purpose (real DAVIS does too)
    "toy-pan": (160, 288, 16, 1, "val"),
    "toy-cross": (160, 240, 20, 2, "val"),
    "toy-crowd": (160, 288, 24, 3, "val"),
    "toy-train": (160, 288, 12, 2, "train"),
}


# -----------------------------------------------------------------------------
# Textures and shapes (vectorised numpy; no loops over pixels)

def texture(rng, h, w):
    """(h, w, 3) float32 in [0, 1]: two random colours mixed by random gratings plus smooth noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = np.zeros((h, w), np.float32)
    for _ in range(3):  # a few oriented sinusoidal gratings
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6), rng.uniform(0, 2 * np.pi)
        pattern += np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    coarse = rng.standard_normal((max(h // 8, 2), max(w // 8, 2))).astype(np.float32)
    pattern += 1.2 * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    pattern = (pattern - pattern.min()) / (np.ptp(pattern) + 1e-6)  # (h, w) in [0, 1]
    c0, c1 = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    return c0 + pattern[..., None] * (c1 - c0)


def shape_mask(kind, dx, dy, r, phase=0.0):
    """Boolean mask of a shape of radius r centred at the origin, evaluated at offsets (dx, dy)."""
    rad, ang = np.hypot(dx, dy), np.arctan2(dy, dx)
    if kind == "disc":
        return rad <= r
    if kind == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if kind == "triangle":
        return (dy <= 0.6 * r) & (dy >= -r + 1.7 * np.abs(dx))
    if kind == "cross":
        return ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r)) | ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r))
    if kind == "ring":
        return (rad <= r) & (rad >= 0.55 * r)
    if kind == "star":
        return rad <= r * (0.6 + 0.4 * np.cos(5 * ang + phase))
    if kind == "blob":  # smooth wobbly outline, used for video objects
        return rad <= r * (1 + 0.25 * np.sin(3 * ang + phase) + 0.1 * np.cos(5 * ang + 2 * phase))
    raise ValueError(kind)


# -----------------------------------------------------------------------------
# Video scenes: camera pan over a large background, textured objects moving with occlusion

def render_scene(rng, h, w, frames, n_objects, speed=1.0):
    """Returns frames (T, h, w, 3) uint8 RGB and labels (T, h, w) uint8 (0 background, 1..K objects, front wins)."""
    pan = rng.uniform(-1.5, 1.5, 2) * speed  # camera velocity in px/frame
    margin = int(np.ceil(np.abs(pan).max() * frames)) + 2
    bg = texture(rng, h + 2 * margin, w + 2 * margin)
    objs = []
    for k in range(n_objects):
        r = rng.uniform(0.12, 0.22) * h
        start = np.array([rng.uniform(0.2, 0.8) * w, rng.uniform(0.25, 0.75) * h])
        vel = rng.uniform(-1, 1, 2) * speed * np.array([w, h]) / frames * 0.9  # some objects leave the frame
        sprite = texture(rng, int(2 * r) + 3, int(2 * r) + 3)  # texture moves with the object
        objs.append(dict(r=r, start=start, vel=vel, sprite=sprite, phase=rng.uniform(0, 6.28), id=k + 1))
    order = rng.permutation(n_objects)  # depth order: later in the list = in front
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    video = np.empty((frames, h, w, 3), np.uint8)
    labels = np.zeros((frames, h, w), np.uint8)
    for t in range(frames):
        oy, ox = (margin + pan[::-1] * t).round().astype(int)
        img = bg[oy:oy + h, ox:ox + w].copy()
        lab = np.zeros((h, w), np.uint8)
        for k in order:
            o = objs[k]
            cx, cy = o["start"] + o["vel"] * t + 0.1 * o["r"] * np.sin([0.3 * t, 0.2 * t])  # drift + wobble
            dx, dy = xx - cx, yy - cy
            m = shape_mask("blob", dx, dy, o["r"], o["phase"] + 0.05 * t)
            sy = np.clip((dy + o["r"] + 1).astype(int), 0, o["sprite"].shape[0] - 1)
            sx = np.clip((dx + o["r"] + 1).astype(int), 0, o["sprite"].shape[1] - 1)
            img[m] = o["sprite"][sy[m], sx[m]]
            lab[m] = o["id"]
        noise = rng.normal(0, 0.015, img.shape).astype(np.float32)  # sensor noise: frames never repeat exactly
        video[t] = (np.clip(img + noise, 0, 1) * 255).round().astype(np.uint8)
        labels[t] = lab
    return video, labels


def write_avi(path, video, fps=25):
    """XviD AVI like UCF101's. video: (T, h, w, 3) uint8 RGB."""
    T, h, w, _ = video.shape
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"XVID"), fps, (w, h))
    if not writer.isOpened():
        raise SystemExit(f"error: OpenCV cannot write XviD video {path}; install opencv-python-headless from PyPI")
    for frame in video:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    # OpenCV's FFmpeg backend encodes MPEG-4 Part 2 (what XviD is) but tags the stream 'FMP4'; UCF101's files say
    # 'XVID'. Same bitstream, so set the tag in the AVI headers (strh handler, strf compression) as UCF101 has it.
    with open(path, "r+b") as f:
        head = f.read(8192)
        f.seek(0)
        f.write(head.replace(b"FMP4", b"XVID"))


def make_ucf101(root, rng, groups=3, clips=2, size=(120, 160), frames=64):
    """UCF101 layout: <root>/<Class>/v_<Class>_gNN_cNN.avi (4 classes x 3 groups x 2 clips = 24 videos)."""
    for ci, cls in enumerate(UCF_CLASSES):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for g in range(1, groups + 1):
            for c in range(1, clips + 1):
                speed = [0.7, 1.0, 1.6, 1.0][ci]
                video, _ = render_scene(rng, *size, frames + 8 * g, n_objects=2 + ci % 3, speed=speed)
                write_avi(os.path.join(root, cls, f"v_{cls}_g{g:02d}_c{c:02d}.avi"), video)


# -----------------------------------------------------------------------------
# Image classification tree: class = shape; colours and textures random

def class_texture(rng, h, w, k, n_classes):
    """A grating whose orientation belongs to class k (colours, phase and frequency jitter random): the class shows in
    every crop of the object, so crop-invariant learning (MSN, CMAE) has something to find, while colour does not."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # orientations in [0, 90°): a horizontal flip (θ -> 180° − θ, every method's augmentation) never turns one class's
    # stripes into another's
    theta, freq = 0.5 * np.pi * k / n_classes + rng.normal(0, 0.03), rng.uniform(0.5, 0.7)
    pattern = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    c0, c1 = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    return c0 + pattern[..., None] * (c1 - c0)


def render_shape_image(rng, kind, size=96):
    """Class = shape AND the orientation of the object's stripes; background texture and all colours are random."""
    img = texture(rng, size, size)
    r = rng.uniform(0.3, 0.45) * size
    cx, cy = rng.uniform(r, size - r, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    m = shape_mask(kind, xx - cx, yy - cy, r, rng.uniform(0, 6.28))
    img[m] = class_texture(rng, size, size, IMAGE_CLASSES.index(kind), len(IMAGE_CLASSES))[m]
    return (img * 255).round().astype(np.uint8)


def make_images(root, rng, n_train=30, n_val=10, size=96):
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in IMAGE_CLASSES:
            d = os.path.join(root, split, kind)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                Image.fromarray(render_shape_image(rng, kind, size)).save(os.path.join(d, f"{i:04d}.png"))


# -----------------------------------------------------------------------------
# DAVIS-2017 layout

def davis_palette():
    """The DAVIS / PASCAL VOC colour map: id i -> RGB from the bits of i (256 x 3 bytes)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal.reshape(-1).tolist()


def save_indexed_png(path, labels):
    """Indexed (mode P) PNG with the DAVIS palette, as DAVIS annotations and results are stored."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(davis_palette())
    im.save(path)


def make_davis(root, rng):
    lists = {"train": [], "val": []}
    for seq, (h, w, frames, n_obj, split) in DAVIS_SEQS.items():
        video, labels = render_scene(rng, h, w, frames, n_obj)
        if seq == "toy-cross":  # a few void pixels (255) along an object edge in later frames, as DAVIS has
            edge = (cv2.dilate(labels[5], np.ones((3, 3), np.uint8)) != labels[5])
            labels[5][edge] = 255
        jdir, adir = (os.path.join(root, sub, "480p", seq) for sub in ("JPEGImages", "Annotations"))
        os.makedirs(jdir, exist_ok=True)
        os.makedirs(adir, exist_ok=True)
        for t in range(frames):
            cv2.imwrite(os.path.join(jdir, f"{t:05d}.jpg"), cv2.cvtColor(video[t], cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            save_indexed_png(os.path.join(adir, f"{t:05d}.png"), labels[t])
        lists[split].append(seq)
    os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
    for split, seqs in lists.items():
        with open(os.path.join(root, "ImageSets", "2017", f"{split}.txt"), "w") as f:
            f.write("".join(s + "\n" for s in seqs))


# -----------------------------------------------------------------------------

def make_all(out, seed=0):
    """Writes all toy datasets under `out` atomically (temp dir, then rename); returns `out`."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_ucf101(os.path.join(tmp, "ucf101"), np.random.default_rng([seed, 0]))
    make_images(os.path.join(tmp, "images"), np.random.default_rng([seed, 1]))
    make_davis(os.path.join(tmp, "DAVIS"), np.random.default_rng([seed, 2]))
    with open(os.path.join(tmp, "VERSION"), "w") as f:
        f.write(VERSION + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def ensure_toy_data(out=None):
    """The trainers' default data: generated once into ./toy_data (or $TOYDATA) and reused afterwards."""
    out = out or os.environ.get("TOYDATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_data"))
    stamp = os.path.join(out, "VERSION")
    if not os.path.exists(stamp) or open(stamp).read().strip() != VERSION:  # missing, or made by an older toydata.py
        print(f"generating toy data in {out} (once) ...", flush=True)
        make_all(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", help="output folder (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0, help="same seed -> same files")
    args = ap.parse_args()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"error: {args.out} exists and is not a folder; pass a folder path")
    make_all(args.out, args.seed)
    print(f"wrote toy UCF101, images and DAVIS to {args.out}")
