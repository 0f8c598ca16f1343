from testkit import *  # noqa: F401,F403  (temporary split of test_all.py; merged back at the end)

import evaluate


# =============================================================================
# evaluate.py

@pytest.fixture(scope="session")
def eval_images(tmp_path_factory):
    """A small ImageFolder: 6 scene classes x (8 train + 4 val) photos of 48 px."""
    root = tmp_path_factory.mktemp("eval_img") / "images"
    toydata.make_images(str(root), np.random.default_rng(0), n_train=8, n_val=4, size=48)
    return str(root)


def dino_knn_loop(train_x, train_y, val_x, num_classes, k, temp):
    """DINO eval_knn.py `knn_classifier`, transcribed (one-hot of the retrieved labels times exp(sim / T), summed,
    highest first), one val image at a time: the reference the vectorised k-NN must equal."""
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    preds = []
    for v in val_x:
        sim = train_x @ v  # (n_train,)
        dist, idx = sim.topk(k, largest=True, sorted=True)
        one_hot = torch.zeros(k, num_classes).scatter_(1, train_y[idx].view(-1, 1), 1)
        probs = (one_hot * dist.div(temp).exp().view(-1, 1)).sum(0)
        preds.append(int(probs.argmax()))
    return torch.tensor(preds)


def test_evaluate_knn_equals_dino_loop_and_weights_votes_by_similarity():
    g = torch.Generator().manual_seed(0)
    tx, ty, vx = torch.randn(40, 8, generator=g), torch.randint(0, 4, (40,), generator=g), torch.randn(25, 8, generator=g)
    for k in (1, 5, 20):
        ref = dino_knn_loop(tx, ty, vx, 4, k, 0.07)
        assert evaluate.knn_top1(tx, ty, vx, ref, 4, k=k) == 100.0
        assert evaluate.knn_top1(tx, ty, vx, (ref + 1) % 4, 4, k=k) == 0.0
    # by hand: angles 0 (class 1) vs 30 and 35 degrees (class 0) from a query at 5 degrees; cos 0.9962, 0.9063,
    # 0.8660: one vote exp(0.9962/0.07) = 1.5e6 beats exp(0.9063/0.07) + exp(0.8660/0.07) = 4.2e5 + 2.4e5
    ang = torch.tensor([0.0, 30.0, 35.0, 5.0]).deg2rad()
    pts = torch.stack([ang.cos(), ang.sin()], dim=1)
    assert evaluate.knn_top1(pts[:3], torch.tensor([1, 0, 0]), pts[3:], torch.tensor([1]), 2, k=3) == 100.0
    # ... but at temperature 1 the two class-0 votes (2.47 + 2.38) outweigh the one (2.71)
    assert evaluate.knn_top1(pts[:3], torch.tensor([1, 0, 0]), pts[3:], torch.tensor([0]), 2, k=3, temp=1.0) == 100.0


def test_evaluate_centre_and_normalise_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0]])
    want = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]])
    want = want / want.norm(dim=1, keepdim=True)  # means 2 and 3 removed, then unit length
    assert torch.allclose(evaluate.centre_and_normalise(x), want, atol=1e-7)


def test_evaluate_logistic_fit_is_the_minimiser_of_the_cyanure_objective():
    """The fitted W equals scipy's L-BFGS-B on the objective written out in numpy (an independent solver and an
    independent gradient): (1/n) Σ_i [log Σ_c exp(w_c·x_i) − w_{y_i}·x_i] + (λ/2)‖W‖², λ = lambd / n."""
    from scipy.optimize import minimize
    g = torch.Generator().manual_seed(1)
    x = evaluate.centre_and_normalise(torch.randn(12, 6, generator=g))
    y = torch.arange(3).repeat(4)
    lambd = 0.0025 * 10  # a stronger penalty than the default makes the optimum well inside the solver tolerances
    W = evaluate.fit_logistic(x, y, 3, lambd).numpy()
    X, Y, n, lam = x.double().numpy(), y.numpy(), 12, lambd / 12

    def objective(w):
        w = w.reshape(3, 6)
        z = X @ w.T
        zmax = z.max(axis=1, keepdims=True)
        lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
        p = np.exp(z - lse[:, None])
        p[np.arange(n), Y] -= 1
        return np.mean(lse - z[np.arange(n), Y]) + 0.5 * lam * (w ** 2).sum(), (p.T @ X / n + lam * w).ravel()
    ref = minimize(objective, np.zeros(18), jac=True, method="L-BFGS-B", options=dict(gtol=1e-12, ftol=1e-15)).x
    assert np.abs(W.ravel() - ref).max() < 1e-5
    assert np.abs(objective(W.ravel())[1]).max() < 1e-8  # the gradient vanishes at our W


def test_evaluate_few_shot_separable_clusters_and_subset_files(eval_images, tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g)
    tx = centres.repeat(6, 1) + 0.05 * torch.randn(18, 16, generator=g)
    ty = torch.arange(3).repeat(6)
    vx = centres.repeat(4, 1) + 0.05 * torch.randn(12, 16, generator=g)
    vy = torch.arange(3).repeat(4)
    pick = evaluate.random_draw(ty, 1, 3, torch.Generator().manual_seed(0))
    assert sorted(ty[pick].tolist()) == [0, 1, 2]  # one of each class
    assert evaluate.logistic_top1(tx[pick], ty[pick], vx, vy, 3, 0.0025) == 100.0
    train, _ = evaluate.image_folders(eval_images, 32)
    names = [os.path.relpath(p, train.root) for p, _ in train.samples[::8]]  # each class's first image
    (tmp_path / "1img.txt").write_text("\n".join(names) + "\n")
    assert evaluate.subset_draw(train, str(tmp_path / "1img.txt")).tolist() == list(range(0, len(train), 8))
    # MSN's lists name n01440764_10026.JPEG: the class is the part before "_"
    imagenet = argparse.Namespace(root="/in/train", samples=[(f"/in/train/{c}/{c}_{i}.JPEG", k)
                                  for k, c in enumerate(("n01", "n02")) for i in range(3)])
    (tmp_path / "msn.txt").write_text("n02_1.JPEG\nn01_2.JPEG\n")
    assert evaluate.subset_draw(imagenet, str(tmp_path / "msn.txt")).tolist() == [2, 4]


def tiny_vit_state(seed=0, dim=32, depth=2, p=8, grid=4):
    """A plain 2-block ViT state dict in timm names (heads from --heads-free width: 32 wide -> 2 heads given)."""
    torch.manual_seed(seed)
    vit = P.ViT(dim, depth, 2, p, grid)
    for t in vit.parameters():
        torch.nn.init.normal_(t, std=0.2)
    return vit.state_dict()


def test_evaluate_features_are_the_cls_of_the_last_block_before_the_final_norm():
    sd = tiny_vit_state()
    vit, _ = P.vit_from_state_dict(sd, heads=2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = torch.cat([vit.cls_token.expand(3, -1, -1), vit.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1)
        h = h + vit.pos_embed
        for blk in vit.blocks:
            h = blk(h)
    feats, labels = evaluate.extract_features(vit.eval(), [(x[i], i) for i in range(3)], torch.device("cpu"))
    assert torch.allclose(feats, h[:, 0], atol=1e-5) and labels.tolist() == [0, 1, 2]
    assert not torch.allclose(feats, vit.norm(h)[:, 0], atol=1e-2)


def test_evaluate_reads_the_three_trainers_checkpoints(eval_images, tmp_path, capsys):
    """Each trainer's checkpoint is evaluated through its own encoder key (msn: the EMA target), and eval.json
    holds what was printed."""
    import cmae
    scfg = siammae.Config(model="vit_tiny", patch_size=8, img_size=32, decoder_depth=1, decoder_dim=32,
                          decoder_heads=2)
    mcfg = msn.Config(model="vit_tiny", patch_size=8, img_size=32, focal_size=16, hidden_dim=32, output_dim=16,
                      num_proto=8)
    ccfg = cmae.Config(model="vit_tiny", patch_size=8, img_size=32, crop_size=40, shift=7, decoder_depth=1,
                       decoder_dim=32, decoder_heads=2, feat_decoder_depth=1, feat_decoder_dim=32,
                       feat_decoder_heads=2, proj_hidden=32, proj_dim=16)
    results = {}
    for module, model in ((siammae, siammae.SiamMAE(scfg)), (msn, msn.MSN(mcfg)), (cmae, cmae.CMAE(ccfg))):
        if module is msn:  # make the target differ from the online encoder, to see which one is evaluated
            with torch.no_grad():
                for p in model.target_encoder.parameters():
                    p.add_(0.1 * torch.randn_like(p))
        path = str(tmp_path / f"{module.__name__}.pt")
        module.save_checkpoint(path, model, torch.optim.AdamW(model.parameters()),
                               torch.amp.GradScaler("cpu", enabled=False), 7, model.cfg)
        out = tmp_path / f"ev_{module.__name__}"
        res = evaluate.main(["--ckpt", path, "--data", eval_images, "--out", str(out), "--workers", "0",
                             "--draws", "1"])
        assert res["img_size"] == 32 and res["n_train"] == 48 and res["classes"] == 6
        assert json.load(open(out / "eval.json"))["knn_top1"] == res["knn_top1"]
        enc = model.target_encoder if module is msn else model.encoder
        direct = evaluate.evaluate_vit(enc.state_dict(), 32, eval_images, torch.device("cpu"), "direct", draws=1)
        assert direct["knn_top1"] == res["knn_top1"] and direct["shots"] == res["shots"]
        results[module.__name__] = res
    printed = capsys.readouterr().out
    assert printed.count("k-NN top-1 | 1-shot | 2-shot | 5-shot") == 6
    assert "target_encoder" in results["msn"]["encoder"] and "step 7" in results["siammae"]["encoder"]


def test_evaluate_bad_inputs_give_one_line_errors_and_exit_code_2(eval_images, tmp_path, capsys):
    run = ["--ckpt", "random", "--model", "vit_tiny", "--patch-size", "8", "--img-size", "32", "--workers", "0"]
    assert "no train/ folder" in bad_exit(capsys, evaluate.main, run + ["--data", str(tmp_path / "nowhere")])
    bad = tmp_path / "classes"
    shutil.copytree(eval_images, bad)
    shutil.rmtree(bad / "val" / os.listdir(bad / "val")[0])
    assert "different class folders" in bad_exit(capsys, evaluate.main, run + ["--data", str(bad)])
    few = tmp_path / "few"
    shutil.copytree(eval_images, few)
    cls = sorted(os.listdir(few / "train"))[0]
    for f in sorted(os.listdir(few / "train" / cls))[2:]:
        os.remove(few / "train" / cls / f)
    assert "few-shot needs at least 5" in bad_exit(capsys, evaluate.main, run + ["--data", str(few)])
    (tmp_path / "list.txt").write_text("not_an_image.JPEG\n")
    msg = bad_exit(capsys, evaluate.main, run + ["--data", eval_images, "--subsets", str(tmp_path / "list.txt")])
    assert "names 1 images but 0" in msg
    assert "not found" in bad_exit(capsys, evaluate.main, ["--ckpt", str(tmp_path / "missing.pt")])
