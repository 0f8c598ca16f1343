from testkit import *  # noqa: F401,F403  (temporary split of test_all.py; merged back at the end)


# =============================================================================
# toydata.py

def test_toydata_writes_the_real_formats_deterministically(tmp_path):
    import cv2
    from PIL import Image
    for run in ("a", "b"):
        toydata.make_davis(str(tmp_path / run), np.random.default_rng(7))
    seq = open(tmp_path / "a" / "ImageSets" / "2017" / "val.txt").read().split()
    assert seq == ["toy-pan", "toy-cross", "toy-crowd"]
    for s in seq:  # same seed, same bytes; every frame has its annotation
        frames = sorted(os.listdir(tmp_path / "a" / "JPEGImages" / "480p" / s))
        assert frames[0] == "00000.jpg"
        for f in frames:
            png = f.replace(".jpg", ".png")
            assert (tmp_path / "a" / "Annotations" / "480p" / s / png).read_bytes() == \
                (tmp_path / "b" / "Annotations" / "480p" / s / png).read_bytes()
    ann = Image.open(tmp_path / "a" / "Annotations" / "480p" / "toy-crowd" / "00000.png")
    assert ann.mode == "P" and ann.getpalette()[3:6] == [128, 0, 0]  # DAVIS palette: id 1 is dark red
    assert set(np.unique(np.array(ann))) == {0, 1, 2, 3}  # ids 1..K
    assert 255 in np.array(Image.open(tmp_path / "a" / "Annotations" / "480p" / "toy-cross" / "00005.png"))  # void
    root = tmp_path / "ucf101"
    toydata.make_ucf101(str(root), np.random.default_rng(0), groups=1, clips=1, size=(48, 64), frames=20)
    avi = root / "BlobDrift" / "v_BlobDrift_g01_c01.avi"
    assert avi.read_bytes()[:12] == b"RIFF" + avi.read_bytes()[4:8] + b"AVI " and b"vidsXVID" in avi.read_bytes()[:512]
    cap = cv2.VideoCapture(str(avi))
    assert cap.get(cv2.CAP_PROP_FPS) == 25 and cap.get(cv2.CAP_PROP_FRAME_COUNT) == 28 and cap.read()[0]


