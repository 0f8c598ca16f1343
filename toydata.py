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
    OUT/JHMDB/Rename_Images/<class>/<video>/00001.png        JHMDB frames, 320 x 240 (needs scipy, else skipped)
    OUT/JHMDB/joint_positions/<class>/<video>/joint_positions.mat   MATLAB file, pos_img 2 x 15 x T, 1-based pixels
    OUT/JHMDB/splits/<class>_test_split1.txt                 "<video>.avi 1|2" lines, 2 = test
    OUT/VIP/Images/<video>/000000000000.jpg                  VIP_Fine frames, 320 x 240
    OUT/VIP/Annotations/Category_ids/<video>/<frame>.png     part ids 0-19 (greyscale PNG), every other frame
    OUT/VIP/lists/{train,val}_videos.txt                     video lists

Why the content looks like this: correspondence must be something a model has to LEARN, not read off a colour.
Every scene is textured objects over a textured background; the camera pans; several objects move, occlude
each other (fixed depth order) and may leave the frame. Colours are random per object, so an object is
identified by its texture and shape. The videos (toy UCF101 and toy DAVIS alike) also have what real video has
and a rigid, constant-light scene lacks, so that an untrained network's local colour hash is not enough: light
that drifts over the clip, motion blur from each object's own motion, objects that scale, rotate and bend, texture
that turns out of view (a spinning cylinder), unlabelled distractors in a labelled object's colours, sensor noise
and JPEG artefacts (see "Video scenes" below). On the toy DAVIS at propagate.py's toy preset (short side 160), raw
8 x 8 pixel patches fell from 0.827 to 0.427 J&F and a random ViT-T/8 from 0.798 to 0.497 (VERSION 4 -> 5, 2026-12-01).
An image class is one scene of textured shapes, photographed with other framing and lighting each time, so classes
are told apart by layout and texture, never by colour. (Person videos, toy JHMDB and VIP, keep the plain scenes.)
The "480p" folder holds small frames (160 px high, like a downscaled DAVIS), which keeps CPU tests fast.
JHMDB and VIP share one person: a textured stick figure in JHMDB's 15-joint order that walks and swings its limbs
over a panning background; JHMDB keeps its joints, VIP its body parts painted with VIP's class ids.
"""
import argparse
import os
import shutil
import sys
import tempfile

import cv2
import numpy as np
from PIL import Image

try:
    import fcntl  # POSIX file locks; on Windows two first runs at once are not guarded
except ImportError:
    fcntl = None

VERSION = "5"  # bump when the generated content changes, so cached ./toy_data folders are remade
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

def texture(rng, h, w, colours=None):
    """(h, w, 3) float32 in [0, 1]: two colours (random, or the given pair) mixed by random gratings plus smooth
    noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = np.zeros((h, w), np.float32)
    for _ in range(3):  # a few oriented sinusoidal gratings
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6), rng.uniform(0, 2 * np.pi)
        pattern += np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    coarse = rng.standard_normal((max(h // 8, 2), max(w // 8, 2))).astype(np.float32)
    pattern += 1.2 * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    pattern = (pattern - pattern.min()) / (np.ptp(pattern) + 1e-6)  # (h, w) in [0, 1]
    if colours is None:
        colours = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    c0, c1 = (np.asarray(c, np.float32) for c in colours)
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
# Video scenes: what real video has that a colour hash cannot follow
#
# A camera pans over a textured background; labelled objects move, occlude each other (depth order drawn once) and
# may leave the frame. On top of that, each effect below breaks "same colour = same thing", so that propagating a
# label needs correspondence (what an untrained network's local colour hash does not give):
#   lighting drift    a global gain and a white-balance tint that drift over the clip, times a soft band of light
#                     that sweeps across the frame (light_field)
#   motion blur       each frame is the mean of renders at sub-frame times over an exposure of 0.5-1 frame, so
#                     blur follows each object's own motion (and the pan); the labels are the mid-exposure masks
#   non-rigid motion  objects scale (approach / recede, x0.7-1.4), rotate in-plane and bend (a parabolic shear that
#                     oscillates), the texture deforming with them (object_layer)
#   out-of-plane      the texture is wrapped on a cylinder that spins about the object's own axis: it slides across
#                     the outline, compresses at the rims, which are shaded darker, and a side unseen at frame 0
#                     comes into view
#   distractors       unlabelled objects (label 0, as unannotated objects are in DAVIS) in the two colours of a
#                     labelled one, with another pattern and outline: a colour hash takes them for the object
#   sensor noise      signal-dependent Gaussian noise (sigma 0.01 in the dark to 0.02 at white), then a JPEG round
#                     trip at quality 55-85, drawn per frame, as consumer video is compressed
# Everything is vectorised over pixels (numpy, OpenCV); the loops run over frames, sub-frame times and objects.

def new_object(rng, h, w, frames, speed, colours=None, away_from=None):
    """One object's look and motion: size, path, scale / rotation / bend / spin rates, and its cylinder texture.
    away_from: a point (x, y) the object starts at least 2.5 radii from, when one of 16 draws allows it."""
    r = rng.uniform(0.12, 0.22) * h
    rc = 1.4 * r  # cylinder radius: covers the blob's widest point (1.35 r)
    starts = rng.uniform([0.2 * w, 0.25 * h], [0.8 * w, 0.75 * h], (16, 2))  # candidate start points (x, y)
    far = np.ones(16, bool) if away_from is None else np.hypot(*(starts - away_from).T) > 2.5 * r
    start = starts[np.argmax(far)]  # the first far enough one, else the first
    vel = rng.uniform(-1, 1, 2) * speed * np.array([w, h]) / frames * 0.9  # some objects leave the frame
    # texture around the whole cylinder (circumference 2 pi rc) x its height, moving with the object
    sprite = texture(rng, int(2 * rc) + 3, int(np.ceil(2 * np.pi * rc)), colours)
    return dict(r=r, rc=rc, start=start, vel=vel, sprite=sprite, phase=rng.uniform(0, 2 * np.pi),
                scale_amp=rng.uniform(0.15, 0.35), scale_freq=rng.uniform(0.1, 0.3), scale_phase=rng.uniform(0, 6.3),
                rot0=rng.uniform(0, 2 * np.pi), rot_rate=rng.choice([-1, 1]) * rng.uniform(0.02, 0.06),
                bend_amp=rng.uniform(0.15, 0.35), bend_freq=rng.uniform(0.15, 0.4), bend_phase=rng.uniform(0, 6.3),
                spin_rate=rng.choice([-1, 1]) * rng.uniform(0.03, 0.08))


def object_layer(o, t, h, w):
    """Object o drawn at (float) time t: (y0, x0, mask (bh, bw) bool, rgb (bh, bw, 3)) on its bounding box.
    A frame pixel maps to the object's texture by undoing, in turn, translation, rotation, scale and bend; the
    texture coordinate is the arc length on the spinning cylinder."""
    r, rc = o["r"], o["rc"]
    s = np.exp(o["scale_amp"] * np.sin(o["scale_freq"] * t + o["scale_phase"]))  # approach / recede
    cx, cy = o["start"] + o["vel"] * t + 0.1 * r * np.sin([0.3 * t, 0.2 * t])  # drift + wobble
    R = 1.8 * r * s  # bounds the blob (1.35 r) after bend (+0.35 r) and scale
    y0, y1 = max(int(cy - R), 0), min(int(cy + R) + 2, h)
    x0, x1 = max(int(cx - R), 0), min(int(cx + R) + 2, w)
    if y0 >= y1 or x0 >= x1:  # out of frame
        return 0, 0, np.zeros((0, 0), bool), np.zeros((0, 0, 3), np.float32)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)  # (bh, bw)
    a = o["rot0"] + o["rot_rate"] * t
    dx, dy = xx - cx, yy - cy
    u = (np.cos(a) * dx + np.sin(a) * dy) / s  # object frame: rotation undone, then scale
    v = (-np.sin(a) * dx + np.cos(a) * dy) / s
    u = u - o["bend_amp"] * np.sin(o["bend_freq"] * t + o["bend_phase"]) * v * v / r  # parabolic bend
    mask = shape_mask("blob", u, v, r, o["phase"] + 0.05 * t)
    c = np.clip(u / rc, -1, 1)  # position across the cylinder, -1 .. 1 rim to rim
    arc = rc * np.arcsin(c) + rc * o["spin_rate"] * t  # arc length on the spinning surface
    sh, sw = o["sprite"].shape[:2]
    ty = np.clip((v + rc + 1).astype(int), 0, sh - 1)
    tx = np.floor(arc).astype(int) % sw  # wraps around the cylinder
    shade = 0.55 + 0.45 * np.sqrt(1 - c * c)  # Lambert-like: rims darker than the middle
    return y0, x0, mask, o["sprite"][ty, tx] * shade[..., None]


def light_field(rng, h, w, frames):
    """(T, h, w, 3) float32 multiplicative light: gain and tint drifting linearly over the clip, times a band of
    light (+-15-30 %) a few frame widths long that sweeps across the frame."""
    tt = np.linspace(0, 1, frames, dtype=np.float32)[:, None]  # (T, 1) clip time 0 .. 1
    g0, g1 = np.log(rng.uniform(0.65, 1.35, 2))  # log gain at the first and the last frame
    log_gain = g0 + tt * (g1 - g0)  # (T, 1)
    tint = tt * rng.normal(0, 0.12, 3)  # (T, 3) log white balance drift
    colour = np.exp(log_gain + tint).astype(np.float32)  # (T, 3)
    theta, wavelength = rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 3) * w
    amp, sweep = rng.uniform(0.15, 0.3), rng.uniform(1, 2) * np.pi  # the band moves by a half-period or more
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = 2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / wavelength  # (h, w)
    band = 1 + amp * np.cos(proj[None] - sweep * tt[:, :, None])  # (T, h, w)
    return band[..., None] * colour[:, None, None, :]


def sensor(rng, img):
    """img (h, w, 3) float in [0, 1] -> uint8 after signal-dependent noise and a JPEG round trip."""
    sigma = np.sqrt(1e-4 + 3e-4 * np.clip(img, 0, 1))  # 0.01 (black) .. 0.02 (white)
    noisy = np.clip(img + sigma * rng.standard_normal(img.shape).astype(np.float32), 0, 1)
    u8 = (noisy * 255).round().astype(np.uint8)
    _, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(55, 86))])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(u8.shape)


def render_scene(rng, h, w, frames, n_objects, speed=1.0):
    """Returns frames (T, h, w, 3) uint8 RGB and labels (T, h, w) uint8 (0 background, 1..K objects, front wins).
    Besides the K labelled objects, max(1, K - 1) distractors share a labelled object's colours; see above."""
    pan = rng.uniform(-1.5, 1.5, 2) * speed  # camera velocity in px/frame
    margin = int(np.ceil(np.abs(pan).max() * (frames + 1))) + 2
    bg = texture(rng, h + 2 * margin, w + 2 * margin)
    objs = [new_object(rng, h, w, frames, speed) for _ in range(n_objects)]
    for k in range(n_objects):
        objs[k]["id"] = k + 1
    for _ in range(max(1, n_objects - 1)):  # distractors: a labelled object's two colours, another pattern
        twin = objs[rng.integers(n_objects)]
        colours = (twin["sprite"].min(axis=(0, 1)), twin["sprite"].max(axis=(0, 1)))
        objs.append({**new_object(rng, h, w, frames, speed, colours, twin["start"]), "id": 0})
    order = rng.permutation(len(objs))  # depth order: later in the list = in front
    exposure = rng.uniform(0.5, 1.0)  # shutter open for this fraction of the frame interval
    fastest = max(np.abs(o["vel"]).max() + 0.3 * o["r"] * o["scale_amp"] for o in objs)  # px/frame, roughly
    half = int(min(np.ceil(fastest * exposure / 3), 2))  # renders either side of mid-exposure: 1.5 px apart, <= 5
    offsets = exposure * np.linspace(-0.5, 0.5, 2 * half + 1)  # sub-frame times; the middle one is 0
    light = light_field(rng, h, w, frames)
    video = np.empty((frames, h, w, 3), np.uint8)
    labels = np.zeros((frames, h, w), np.uint8)
    for t in range(frames):
        acc = np.zeros((h, w, 3), np.float32)
        for j, tau in enumerate(t + offsets):
            oy, ox = (margin + pan[::-1] * tau).round().astype(int)
            img = bg[oy:oy + h, ox:ox + w].copy()
            for k in order:
                y0, x0, m, rgb = object_layer(objs[k], tau, h, w)
                img[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = rgb[m]
                if j == half:  # labels: the masks at mid-exposure
                    labels[t, y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = objs[k]["id"]
            acc += img
        video[t] = sensor(rng, acc / len(offsets) * light[t])
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
# Image classification tree: a class = one object scene, its images = photos of it with other framing and lighting

def render_class_scene(rng, k, size=192):
    """Class k's scene (size, size, 3) in [0, 1]: a textured background and three textured shapes, the first of them
    the class's namesake shape. Every image of the class is a photo of this one scene."""
    scene = texture(rng, size, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for j in range(3):
        r = rng.uniform(0.15, 0.3) * size
        cx, cy = rng.uniform(r, size - r, 2)
        kind = IMAGE_CLASSES[(k + j) % len(IMAGE_CLASSES)]
        m = shape_mask(kind, xx - cx, yy - cy, r, rng.uniform(0, 2 * np.pi))
        scene[m] = texture(rng, size, size)[m]
    return scene


def photograph(rng, scene, size):
    """One photo of a scene (uint8 (size, size, 3)): a random framing (crop of 20-100 % of the area, aspect 3/4-4/3,
    mirrored half the time) under random lighting (brightness, contrast, saturation x0.6-1.4, hue +-0.1 turn). These are
    the ranges of the methods' own augmentations (RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1)), so what
    tells two photos of one class apart is exactly what MSN and CMAE learn to ignore, and an untrained network does
    not: the k-NN of a short toy run beats the untrained network's (test_all.py)."""
    C = scene.shape[0]
    area, ratio = rng.uniform(0.2, 1.0) * C * C, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w, h = min(C, int(round(np.sqrt(area * ratio)))), min(C, int(round(np.sqrt(area / ratio))))
    x0, y0 = rng.integers(0, C - w + 1), rng.integers(0, C - h + 1)
    img = cv2.resize(scene[y0:y0 + h, x0:x0 + w], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    b, c, s = rng.uniform(0.6, 1.4, 3)
    img = img * b  # brightness
    mean = img.mean()
    img = (img - mean) * c + mean  # contrast around the mean
    gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
    img = (img - gray[..., None]) * s + gray[..., None]  # saturation
    hsv = cv2.cvtColor(np.clip(img, 0, 1).astype(np.float32), cv2.COLOR_RGB2HSV)  # H in degrees
    hsv[..., 0] = (hsv[..., 0] + 360 * rng.uniform(-0.1, 0.1)) % 360
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_images(root, rng, n_train=30, n_val=20, size=96):
    """ImageFolder tree of len(IMAGE_CLASSES) classes; train and val photos are independent draws of each scene."""
    scenes = [render_class_scene(rng, k) for k in range(len(IMAGE_CLASSES))]
    for split, n in (("train", n_train), ("val", n_val)):
        for k, kind in enumerate(IMAGE_CLASSES):
            d = os.path.join(root, split, kind)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                Image.fromarray(photograph(rng, scenes[k], size)).save(os.path.join(d, f"{i:04d}.png"))


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
# JHMDB and VIP layouts: a walking stick figure. Joint order = JHMDB's (propagate.py JOINTS); (x, y) offsets from the
# belly in units of the person's height; the person faces the camera, so its right side is on the image's left.

PERSON = np.array([[0, -0.30], [0, 0], [0, -0.42], [-0.12, -0.28], [0.12, -0.28], [-0.08, 0.12], [0.08, 0.12],
                   [-0.17, -0.12], [0.17, -0.12], [-0.09, 0.34], [0.09, 0.34], [-0.19, 0.04], [0.19, 0.04],
                   [-0.10, 0.56], [0.10, 0.56]])  # neck belly head shoulders hips elbows knees wrists ankles (R, L)
LIMBS = ((3, (7, 11), 1), (4, (8, 12), -1), (5, (9, 13), -1), (6, (10, 14), 1))  # (root, joints it swings, sign)
PARTS = (  # (from joint, to joint, half width in heights, VIP class id), painted in this order: later is in front
    (1, 5, 0.07, 8), (1, 6, 0.07, 8), (5, 9, 0.045, 8), (6, 10, 0.045, 8),  # pants: hips and thighs
    (9, 13, 0.035, 16), (10, 14, 0.035, 17), (13, 13, 0.04, 18), (14, 14, 0.04, 19),  # right/left leg, shoes
    (0, 1, 0.1, 4), (3, 4, 0.05, 4),  # upper-clothes: torso and shoulders
    (3, 7, 0.035, 14), (7, 11, 0.03, 14), (4, 8, 0.035, 15), (8, 12, 0.03, 15),  # right-arm, left-arm
    (0, 2, 0.03, 13), (2, 2, 0.085, 13),  # face: neck and head
)
JHMDB_CLASSES = ("toy_wave", "toy_walk", "toy_jump")  # toy stand-ins for JHMDB's 21 action classes


def person_joints(rng, h, w, frames):
    """(T, 15, 2) joint positions (x, y) in pixels: a person of random size drifting across the frame while its arms
    and legs swing about the shoulders and hips."""
    height = rng.uniform(0.6, 0.75) * h
    direction = rng.choice([-1, 1])  # walks left or right, 0.4-0.5 of the frame width over the clip
    start = np.array([(0.5 - direction * 0.22) * w, rng.uniform(0.45, 0.5) * h])
    vel = np.array([direction * rng.uniform(0.4, 0.5) * w, rng.uniform(-0.04, 0.04) * h]) / frames
    swing, freq, phase = rng.uniform(0.15, 0.35), rng.uniform(0.3, 0.6), rng.uniform(0, 2 * np.pi)
    out = np.empty((frames, len(PERSON), 2))
    for t in range(frames):
        pts = PERSON * height
        for root, kids, sign in LIMBS:  # rotate the limb about its root
            a = sign * swing * np.sin(freq * t + phase)
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            pts[list(kids)] = (pts[list(kids)] - pts[root]) @ rot.T + pts[root]
        out[t] = pts + start + vel * t
    return out


def segment_mask(xx, yy, a, b, r):
    """Pixels within r of the segment a-b (a disc when a == b)."""
    d = b - a
    s = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
    return (xx - a[0] - s * d[0]) ** 2 + (yy - a[1] - s * d[1]) ** 2 <= r * r


def render_person(rng, h, w, frames):
    """-> frames (T, h, w, 3) uint8 RGB, part ids (T, h, w) uint8 (VIP classes, 0 = background), joints (T, 15, 2)."""
    joints = person_joints(rng, h, w, frames)
    height = np.ptp(joints[0, :, 1]) / np.ptp(PERSON[:, 1])
    pan = rng.uniform(-1.5, 1.5, 2)
    margin = int(np.ceil(np.abs(pan).max() * frames)) + 2
    bg = texture(rng, h + 2 * margin, w + 2 * margin)
    skins = {c: texture(rng, h, w) for c in {p[3] for p in PARTS}}  # one texture per part, moving with the person
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    video, labels = np.empty((frames, h, w, 3), np.uint8), np.zeros((frames, h, w), np.uint8)
    for t in range(frames):
        oy, ox = (margin + pan[::-1] * t).round().astype(int)
        img, lab = bg[oy:oy + h, ox:ox + w].copy(), np.zeros((h, w), np.uint8)
        shift = (joints[t, 1] - joints[0, 1]).round().astype(int)  # the belly's drift: textures move with the body
        ty, tx = (yy.astype(int) - shift[1]) % h, (xx.astype(int) - shift[0]) % w
        for a, b, r, cls in PARTS:
            m = segment_mask(xx, yy, joints[t, a], joints[t, b], r * height)
            img[m], lab[m] = skins[cls][ty[m], tx[m]], cls
        noise = rng.normal(0, 0.015, img.shape).astype(np.float32)
        video[t], labels[t] = (np.clip(img + noise, 0, 1) * 255).round().astype(np.uint8), lab
    return video, labels, joints


def make_jhmdb(root, rng, size=(240, 320), frames=12):
    """JHMDB layout, 3 classes x 2 videos: a 3-frame one in split 1's train set (1), one of `frames` in its test set
    (2); joints in a real MATLAB file (scipy.io.savemat, pos_img 2 x 15 x T, 1-based pixels, as JHMDB's)."""
    from scipy.io import savemat
    os.makedirs(os.path.join(root, "splits"), exist_ok=True)
    for cls in JHMDB_CLASSES:
        lines = []
        for k, (role, n) in enumerate(((1, 3), (2, frames))):
            video_name = f"{cls}_person_{k}"
            video, _, joints = render_person(rng, *size, n)
            idir, jdir = (os.path.join(root, sub, cls, video_name) for sub in ("Rename_Images", "joint_positions"))
            os.makedirs(idir, exist_ok=True)
            os.makedirs(jdir, exist_ok=True)
            for t, img in enumerate(video):
                cv2.imwrite(os.path.join(idir, f"{t + 1:05d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            savemat(os.path.join(jdir, "joint_positions.mat"),
                    {"pos_img": joints.transpose(2, 1, 0) + 1, "scale": np.ones((1, len(joints)))})
            lines.append(f"{video_name}.avi {role}\n")
        with open(os.path.join(root, "splits", f"{cls}_test_split1.txt"), "w") as f:
            f.write("".join(lines))


def make_vip(root, rng, size=(240, 320), frames=10):
    """VIP_Fine layout: 3 val videos + 1 train video; part ids (greyscale PNG) on every other frame, the first too."""
    lists = {"train": [], "val": []}
    for k in range(4):
        video_name, split = f"videos{k + 1}", "train" if k == 3 else "val"
        video, labels, _ = render_person(rng, *size, frames)
        idir, adir = (os.path.join(root, sub, video_name) for sub in ("Images", "Annotations/Category_ids"))
        os.makedirs(idir, exist_ok=True)
        os.makedirs(adir, exist_ok=True)
        for t in range(frames):
            cv2.imwrite(os.path.join(idir, f"{t:012d}.jpg"), cv2.cvtColor(video[t], cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            if t % 2 == 0:
                Image.fromarray(labels[t], mode="L").save(os.path.join(adir, f"{t:012d}.png"))
        lists[split].append(video_name)
    os.makedirs(os.path.join(root, "lists"), exist_ok=True)
    for split, videos in lists.items():
        with open(os.path.join(root, "lists", f"{split}_videos.txt"), "w") as f:
            f.write("".join(v + "\n" for v in videos))


def has_scipy():
    try:
        import scipy.io  # noqa: F401  (only toy JHMDB's .mat files need it)
        return True
    except ImportError:
        return False


# -----------------------------------------------------------------------------

def make_all(out, seed=0):
    """Writes all toy datasets under `out` atomically: into a private temp folder beside it, then one rename, so a
    reader never sees half a dataset; returns `out`."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".toy_data.", dir=parent)  # unique: two writers never share one
    try:
        make_ucf101(os.path.join(tmp, "ucf101"), np.random.default_rng([seed, 0]))
        make_images(os.path.join(tmp, "images"), np.random.default_rng([seed, 1]))
        make_davis(os.path.join(tmp, "DAVIS"), np.random.default_rng([seed, 2]))
        if has_scipy():
            make_jhmdb(os.path.join(tmp, "JHMDB"), np.random.default_rng([seed, 3]))
        else:
            print("toy JHMDB skipped: writing its joint_positions.mat needs scipy (pip install scipy)")
        make_vip(os.path.join(tmp, "VIP"), np.random.default_rng([seed, 4]))
        with open(os.path.join(tmp, "VERSION"), "w") as f:
            f.write(version_stamp() + "\n")
        if os.path.isdir(out):  # an older version: moved aside in one rename, deleted after the swap
            old = tempfile.mkdtemp(prefix=".toy_data.old.", dir=parent)
            os.replace(out, os.path.join(old, "data"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something failed part-way
    return out


def version_stamp():
    """VERSION, marked when toy JHMDB could not be written, so that installing scipy later remakes the folder."""
    return VERSION if has_scipy() else VERSION + " (no JHMDB: no scipy)"


def ensure_toy_data(out=None):
    """The trainers' default data: generated once into ./toy_data (or $TOYDATA) and reused afterwards. Two programs
    started together on a fresh checkout take turns on a lock file: the second waits, then finds the data made."""
    out = out or os.environ.get("TOYDATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_data"))
    if is_current(out):
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(os.path.abspath(out).rstrip("/") + ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not is_current(out):  # missing, or made by an older toydata.py
            print(f"generating toy data in {out} (once) ...", flush=True)
            make_all(out)
    return out


def is_current(out):
    stamp = os.path.join(out, "VERSION")
    return os.path.exists(stamp) and open(stamp).read().strip() == version_stamp()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", help="output folder (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0, help="same seed -> same files")
    args = ap.parse_args()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"error: {args.out} exists and is not a folder; pass a folder path")
    make_all(args.out, args.seed)
    print(f"wrote toy UCF101, images, DAVIS, JHMDB and VIP to {args.out}")
