"""
Label-efficient evaluation of a frozen ViT: weighted k-NN and few-shot logistic regression, top-1
on a labelled val split. One protocol for the encoders of siammae.py, msn.py and cmae.py and for
public ViT weights, so that their numbers compare.

    python evaluate.py --ckpt out/msn/checkpoint.pt                    # toy images (toydata.py)
    python evaluate.py --ckpt out/cmae/checkpoint.pt --data imagenet/  # train/<class>/, val/<class>/
    python evaluate.py --ckpt dino_deitsmall16_pretrain.pth --data imagenet/ \\
        --subsets imagenet_subsets1/1imgs_class.txt imagenet_subsets1/5imgs_class.txt
    python evaluate.py --ckpt random --model vit_small --img-size 64   # the untrained baseline

The protocol, step by step, and the official code each step follows:
  encoder   anything propagate.py reads: siammae.py / cmae.py checkpoints (`encoder.`), msn.py ones
            (`target_encoder.`, the EMA network MSN's logistic_eval.py loads), timm / DINO / MAE
            ViT weights; `random` = propagate.py's MAE-initialised ViT. Frozen, in eval mode.
  images    short side to round(S·256/224), centre crop S, ImageNet mean / std (MSN
            logistic_eval.py `init_pipe` at S = 224, bilinear); S = the encoder's training size.
  feature   the cls token of the last block BEFORE the final LayerNorm (MSN src/deit.py
            `forward_blocks` with one block, as logistic_eval.py calls it), for both classifiers.
  k-NN      DINO eval_knn.py `knn_classifier`: L2-normalised features; the k = 20 most cosine-
            similar train images vote exp(cos / 0.07) for their class.
  few-shot  MSN logistic_eval.py: n = 1, 2, 5 labelled images per class (its ImageNet lists with
            --subsets, else `draws` seeded random draws); each feature centred and L2-normalised
            (cyanure `preprocess(centering=True, normalize=True, columns=False)`: per image);
            multinomial logistic regression without intercept minimising
                (1/n)·Σ_i CE(W x_i, y_i) + (λ/2)·‖W‖²,   λ = lambd / n
            (cyanure `MultiClassifier('multiclass-logistic', penalty='l2', fit_intercept=False)`,
            whose l2 penalty is λ/2·‖w‖²; logistic_eval.py divides lambd by the image count),
            lambd = 0.0025, the value of the README's logistic_eval.py command (its argparse default
            is 0.00025). Strictly convex: any solver run to convergence gives the same W; here
            full-batch L-BFGS in float64.
"""
import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import propagate
from propagate import fail

IMG_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as logistic_eval.py
SHOTS = (1, 2, 5)  # labelled images per class (MSN Table 1: 1, 2 and 5 images per class)


# -----------------------------------------------------------------------------
# Images and features

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


def labelled_splits(root):
    """([(path, label)] of <root>/train, of <root>/val, the class names), checked: the same class
    folders in both. The trainers call it at the start of an --eval run: a bad val/ stops them
    before training."""
    (train, classes), (val, val_classes) = (list_images(os.path.join(root, s))
                                            for s in ("train", "val"))
    if classes != val_classes:
        only = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        fail(f"{root}/train and {root}/val have different class folders (only in train: "
             f"{only[0][:3]}, only in val: {only[1][:3]}, in order: {classes[:3]} vs "
             f"{val_classes[:3]}); they must list the same classes")
    return train, val, classes


class LabelledImages(torch.utils.data.Dataset):
    """(path, label) samples -> (normalized image (3, S, S), label): short side to
    round(S·256/224), centre crop S. An unreadable image gives zeros and label -1, for evaluate_vit
    to leave out and count."""

    def __init__(self, root, samples, classes, img_size):
        self.root, self.samples, self.classes, self.img_size = root, samples, classes, img_size
        self.targets = [y for _, y in samples]
        self.transform = T.Compose([T.Resize(round(img_size * 256 / 224)), T.CenterCrop(img_size),
                                    T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        img = read_image(path)
        if img is None:
            return torch.zeros(3, self.img_size, self.img_size), -1
        return self.transform(img), y


def image_folders(root, img_size):
    """<root>/train and <root>/val as LabelledImages, checked by labelled_splits."""
    train, val, classes = labelled_splits(root)
    return tuple(LabelledImages(os.path.join(root, split), samples, classes, img_size)
                 for split, samples in (("train", train), ("val", val)))


@torch.inference_mode()
def extract_features(vit, folder, device, workers=0, batch_size=64):
    """(n, D) cls tokens of the last block before the final LayerNorm, and the labels (n,)."""
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, num_workers=workers)
    feats, labels = [], []
    for imgs, y in loader:
        h = vit.blocks_output(imgs.to(device))  # (b, 1 + N, D)
        feats.append(h[:, 0].float().cpu())  # cls: (b, D)
        labels.append(y)
    return torch.cat(feats).clone(), torch.cat(labels).clone()  # clones live outside inference mode


def readable(x, y, folder, print0):
    """Features and labels without the images LabelledImages could not read (label -1), with a
    counted warning."""
    bad = y < 0
    if bad.any():
        first = folder.samples[int(bad.nonzero()[0])][0]
        print0(f"warning: skipped {int(bad.sum())} unreadable images of {len(y)} in {folder.root} "
               f"(the first: {first})", flush=True)
    return x[~bad], y[~bad]


# -----------------------------------------------------------------------------
# Classifiers

def knn_top1(train_x, train_y, val_x, val_y, num_classes, k=20, temp=0.07):
    """DINO's weighted k-NN on L2-normalised features: the k most cosine-similar train images vote
    exp(cos / temp) for their class. Top-1 accuracy in %."""
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    k = min(k, train_x.shape[0])
    sim, idx = (val_x @ train_x.T).topk(k, dim=1)  # (n_val, D) x (D, n_train) -> (n_val, k)
    votes = torch.zeros(len(val_x), num_classes).scatter_add_(1, train_y[idx], (sim / temp).exp())
    return 100.0 * (votes.argmax(dim=1) == val_y).float().mean().item()


def centre_and_normalise(x):
    """cyanure preprocess(centering=True, normalize=True, columns=False): each row minus its mean,
    then scaled to unit L2 norm."""
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


def fit_logistic(x, y, num_classes, lambd, max_iter=500):
    """W (C, D) = argmin (1/n)·Σ_i CE(W x_i, y_i) + (λ/2)·‖W‖², λ = lambd / n, no bias.
    Full-batch L-BFGS with a strong-Wolfe line search, in float64, from W = 0."""
    x, lam = x.double(), lambd / x.shape[0]
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.T, y) + 0.5 * lam * W.pow(2).sum()  # (n, D) x (D, C) logits
        loss.backward()
        return loss
    opt.step(objective)
    return W.detach()


def logistic_top1(train_x, train_y, val_x, val_y, num_classes, lambd):
    """Fits on the labelled images, top-1 % on all of val; both preprocessed as logistic_eval.py."""
    W = fit_logistic(centre_and_normalise(train_x), train_y, num_classes, lambd)
    pred = (centre_and_normalise(val_x).double() @ W.T).argmax(dim=1)  # (n_val, D) x (D, C)
    return 100.0 * (pred == val_y).float().mean().item()


def random_draw(labels, shots, num_classes, generator):
    """Indices of `shots` random images of every class (all of a class that has fewer)."""
    per_class = (torch.nonzero(labels == c).flatten() for c in range(num_classes))
    return torch.cat([ids[torch.randperm(len(ids), generator=generator)[:shots]]
                      for ids in per_class])


def subset_draw(folder, path):
    """Indices of the train images an official list names: one a line, either MSN's form
    `n01440764_10026.JPEG` (the class is the part before "_", as its ImageNetSubset reads it; see
    imagenet_subsets1/5imgs_class.txt) or `<class>/<file>`."""
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    wanted = {ln if "/" in ln else os.path.join(ln.split("_")[0], ln) for ln in lines}
    picked = [i for i, (p, _) in enumerate(folder.samples) if os.path.relpath(p, folder.root) in wanted]
    if len(picked) != len(wanted):
        fail(f"{path} names {len(wanted)} images but {len(picked)} of them are in {folder.root}; "
             f"pass the train folder that list was made for")
    return torch.tensor(picked)


# -----------------------------------------------------------------------------
# The evaluation

def evaluate_vit(vit_state, img_size, root, device, desc, workers=0, seed=0, print0=print, heads=0,
                 knn_k=20, knn_temp=0.07, draws=5, lambd=0.0025, subsets=()):
    """The protocol above for one encoder. vit_state: a plain ViT state dict (timm names), e.g. a
    trainer's `model.encoder.state_dict()`; img_size: S, None = the encoder's training size; root:
    ImageFolder root with train/ and val/; heads: 0 = from the width (timm's sizes). Prints one
    table. Returns dict(knn_top1, shots={n: dict(mean, std, draws)}, subsets={file: top-1}, ...)."""
    vit, arch = propagate.vit_from_state_dict(vit_state, heads=heads)
    vit = vit.to(device).eval()
    img_size = img_size or vit.grid * vit.patch_size
    train, val = image_folders(root, img_size)
    C = len(train.classes)
    fewest = torch.bincount(torch.tensor(train.targets), minlength=C).min().item()
    if not subsets and fewest < max(SHOTS):
        fail(f"{root}/train has a class with {fewest} images; few-shot needs at least {max(SHOTS)}")
    t0 = time.perf_counter()
    tx_all, ty_all = extract_features(vit, train, device, workers)  # all rows, for --subsets
    tx, ty = readable(tx_all, ty_all, train, print0)
    vx, vy = readable(*extract_features(vit, val, device, workers), val, print0)
    res = dict(encoder=desc, arch=arch, img_size=img_size, data=root, n_train=len(ty),
               n_val=len(vy), classes=C, knn_top1=knn_top1(tx, ty, vx, vy, C, knn_k, knn_temp),
               shots={}, subsets={})
    for n in () if subsets else SHOTS:
        accs = []
        for d in range(draws):
            g = torch.Generator().manual_seed(hash((seed, n, d)) & 0xFFFF_FFFF)
            pick = random_draw(ty, n, C, g)
            accs.append(logistic_top1(tx[pick], ty[pick], vx, vy, C, lambd))
        res["shots"][n] = dict(mean=statistics.mean(accs), std=statistics.pstdev(accs), draws=accs)
    for path in subsets:
        pick = subset_draw(train, path)
        pick = pick[ty_all[pick] >= 0]  # an unreadable listed image is left out (and was counted)
        acc = logistic_top1(tx_all[pick], ty_all[pick], vx, vy, C, lambd)
        res["subsets"][os.path.basename(path)] = acc
    titles = ["k-NN top-1"] + [f"{n}-shot" for n in res["shots"]] + list(res["subsets"])
    cells = [f"{res['knn_top1']:10.1f}"] + [f"{s['mean']:5.1f} ± {s['std']:4.1f}"
                                            for s in res["shots"].values()]
    print0(f"eval | {desc} | {img_size} px | {root}: {len(ty)} train / {len(vy)} val, "
           f"{C} classes | {time.perf_counter() - t0:.1f}s\n  " + " | ".join(titles) + "\n  "
           + " | ".join(cells + [f"{v:5.1f}" for v in res["subsets"].values()]), flush=True)
    return res

def make_out_dir(out):
    """Creates --out and writes a probe file in it before the evaluation: an unwritable folder is a
    one-line error now, not after the features of every image have been computed."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"--out {out} is not writable ({e.strerror}); fix its permissions or choose another "
             f"--out")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint of siammae.py / msn.py / cmae.py, "
                    "a timm / DINO / MAE ViT, or `random`")
    ap.add_argument("--data", default="", help="ImageFolder root: train/ and val/; empty = toy images")
    ap.add_argument("--out", default="", help="eval.json goes here; empty = out/eval/<ckpt name>")
    ap.add_argument("--img-size", type=int, default=0, help="crop side S; 0 = the training size")
    ap.add_argument("--model", default="vit_small", help="architecture of `random`")
    ap.add_argument("--patch-size", type=int, default=0, help="patch size of `random` (0 = 16)")
    ap.add_argument("--checkpoint-key", default="", help="sub-dict of a checkpoint, e.g. teacher")
    ap.add_argument("--knn-k", type=int, default=20, help="neighbours that vote (DINO: 20)")
    ap.add_argument("--knn-temp", type=float, default=0.07, help="votes exp(cos / t) (DINO: 0.07)")
    ap.add_argument("--draws", type=int, default=5, help="random labelled draws per few-shot n")
    ap.add_argument("--lambd", type=float, default=0.0025, help="L2 strength before its division by "
                    "the number of labelled images (MSN logistic_eval.py, its README's value)")
    ap.add_argument("--subsets", nargs="*", default=[], help="official labelled lists (MSN's "
                    "imagenet_subsets*/*.txt) instead of random draws")
    ap.add_argument("--seed", type=int, default=0, help="seeds `random` and the draws")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader processes reading images (4, or fewer on a smaller CPU)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cuda | cpu")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    root = a.data
    if not root:
        import toydata
        root = os.path.join(toydata.ensure_toy_data(), "images")
    labelled_splits(root)  # a bad --data stops here, before anything is loaded or written
    encoder, desc = propagate.load_encoder(a.ckpt, model=a.model, patch_size=a.patch_size,
                                           checkpoint_key=a.checkpoint_key, seed=a.seed)
    if not hasattr(encoder, "blocks_output"):
        fail(f"--ckpt {a.ckpt} is no ViT; pass a checkpoint or `random`")
    name = os.path.splitext(os.path.basename(a.ckpt))[0]
    if os.path.isfile(a.ckpt):  # out/msn/checkpoint.pt -> msn-checkpoint
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(a.ckpt)))}-{name}"
    out = a.out or os.path.join("out", "eval", name)
    make_out_dir(out)
    res = evaluate_vit(encoder.state_dict(), a.img_size or None, root, device, desc, a.workers,
                       a.seed, heads=getattr(encoder, "heads", 0), knn_k=a.knn_k,
                       knn_temp=a.knn_temp, draws=a.draws, lambd=a.lambd, subsets=a.subsets)
    path = os.path.join(out, "eval.json")
    try:
        with open(path + ".tmp", "w") as f:  # then renamed: never half-written
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        fail(f"cannot write {path} ({e.strerror}); the results are printed above: free space or "
             f"choose another --out")
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
