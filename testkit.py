"""TEMPORARY during issue 10: shared imports, fixtures and helpers of the test parts (merged into test_all.py)."""
import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cmae
import msn
import propagate as P
import siammae
import toydata

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# shared fixtures

@pytest.fixture(scope="session")
def toy_videos(tmp_path_factory):
    """A tiny UCF101-layout folder: 4 classes x 1 group x 1 clip, XviD AVI, 48x64, 40-48 frames."""
    root = tmp_path_factory.mktemp("ucf") / "ucf101"
    toydata.make_ucf101(str(root), np.random.default_rng(0), groups=1, clips=1, size=(48, 64), frames=40)
    return str(root)


@pytest.fixture(scope="session")
def toy_photos(tmp_path_factory):
    """The demos' toy ImageFolder (the draw make_all writes to toy_data/images): 6 scene classes x (30 train + 20 val)
    photos of 96 px, for the tests that train MSN and CMAE briefly and compare k-NN with the untrained network's."""
    root = tmp_path_factory.mktemp("photos") / "images"
    toydata.make_images(str(root), np.random.default_rng([0, 1]))
    return str(root)


def knn_before_and_after(module, train_args, data, out):
    """Trains `module` with train_args on `data` with --eval: evaluate.py's k-NN top-1 (%) of the evaluated encoder
    at step 0 and after training, as the trainer writes them to <out>/eval.json ({"before": ..., "after": ...})."""
    module.main(train_args + ["--data", data, "--out", str(out), "--eval"])
    with open(out / "eval.json") as f:
        res = json.load(f)
    return res["before"]["knn_top1"], res["after"]["knn_top1"]


def bad_exit(capsys, fn, *args):
    """Runs fn(*args), expects the promised user error: exit code 2 and one 'error: ...' line on stderr."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, f"exit code {e.value.code}"
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def params_of(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)["model"]


def crash_then_resume(module, args, tmp_path, monkeypatch, crash_step):
    """Trains `args` uninterrupted into a/; then into b/ with a simulated crash right after the checkpoint of step
    `crash_step`, and `--resume` from it. Returns the two final state dicts."""
    module.main(args + ["--out", str(tmp_path / "a")])
    original = module.save_checkpoint

    def crash_after_the_save(path, model, optimizer, scaler, step, cfg):
        original(path, model, optimizer, scaler, step, cfg)
        if step == crash_step:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(module, "save_checkpoint", crash_after_the_save)
    with pytest.raises(RuntimeError):
        module.main(args + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(module, "save_checkpoint", original)
    module.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    return params_of(tmp_path / "a" / "checkpoint.pt"), params_of(tmp_path / "b" / "checkpoint.pt")


def torchrun_two_gloo_processes(script, args):
    """Runs `script args` as 2 DDP processes on CPU (gloo) through torchrun; asserts it finished as world 2."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world 2" in run.stdout

