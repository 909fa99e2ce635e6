"""Image decode (hostile inputs included), hog_color and the ResNet extractor, on real bytes."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest

from mmbatch import media
from mmbatch.config import ImageFeatures
from mmbatch.preprocess.features import image as img_mod
from mmbatch.preprocess.features.image import (HogColorExtractor, ResNetExtractor, decode_full, decode_image,
                                    reduced_scale, resize_center_crop)
from mmbatch.preprocess.features.registry import build_extractor, embedding_dim
from mmbatch.preprocess.features.resnet import build_resnet


def _jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)    # arr in OpenCV channel order
    assert ok
    return buf.tobytes()


def _smooth_rgb(w: int, h: int, seed: int = 0, cell: int = 16) -> np.ndarray:
    rng = np.random.RandomState(seed)
    small = (rng.rand(h // cell + 2, w // cell + 2, 3) * 255).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _solid_rgb(w: int, h: int, rgb) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = rgb
    return a


def _reason(data, size=32) -> str:
    with pytest.raises(media.MediaError) as ei:
        decode_image(data, size)
    return ei.value.reason


# --- decode ------------------------------------------------------------------------
@pytest.mark.parametrize("enc", ["jpeg", "png"])
def test_red_decodes_with_r_high(enc):
    red = _solid_rgb(40, 30, (255, 0, 0))
    data = _jpeg(red) if enc == "jpeg" else _png(cv2.cvtColor(red, cv2.COLOR_RGB2BGR))
    out = decode_image(data, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    r, g, b = out[..., 0].mean(), out[..., 1].mean(), out[..., 2].mean()
    assert r > 240 and g < 15 and b < 15


def test_resize_shorter_side_then_center_crop():
    # left half red, right half blue, 200x100: the crop keeps the middle 100 columns
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    a[:, 100:] = (0, 0, 255)
    out = resize_center_crop(a, 50)
    assert out.shape == (50, 50, 3)
    assert out[:, :20, 0].min() > 240 and out[:, 30:, 2].min() > 240
    tall = resize_center_crop(np.zeros((300, 60, 3), np.uint8), 20)
    assert tall.shape == (20, 20, 3)


def test_reduced_decode_used_for_big_jpeg_and_matches_full(monkeypatch):
    data = _jpeg(_smooth_rgb(1024, 768, cell=64))     # photo-like: detail at ~64 px scale
    assert reduced_scale(1024, 768, 64) == 8
    assert reduced_scale(1024, 768, 200) == 2 and reduced_scale(1024, 768, 500) == 1
    seen = []
    real = cv2.imdecode
    monkeypatch.setattr(img_mod.cv2, "imdecode", lambda buf, flags: seen.append(flags) or real(buf, flags))
    fast = decode_image(data, 64)
    assert seen == [img_mod._REDUCED[8]]
    monkeypatch.undo()
    full = resize_center_crop(decode_full(data, 1), 64)
    diff = np.abs(fast.astype(int) - full.astype(int))
    assert diff.mean() < 2.0 and diff.max() < 16          # measured 1.2 / 6 (8x DCT scaling)
    for size, scale in ((256, 2), (150, 4)):
        assert reduced_scale(1024, 768, size) == scale
        d = np.abs(decode_image(data, size).astype(int) - resize_center_crop(decode_full(data, 1), size))
        assert d.mean() < 1.0 and d.max() < 8
    # PNG never takes the reduced path (OpenCV would decode fully and resize bilinearly)
    seen.clear()
    monkeypatch.setattr(img_mod.cv2, "imdecode", lambda buf, flags: seen.append(flags) or real(buf, flags))
    decode_image(_png(_smooth_rgb(512, 512)), 64)
    assert seen == [img_mod._REDUCED[1]]


def test_cmyk_jpeg_decodes_to_rgb():
    from PIL import Image

    im = Image.new("CMYK", (48, 40), (0, 255, 255, 0))      # red in CMYK
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    assert media.probe_image(buf.getvalue()).mode == "CMYK"
    out = decode_image(buf.getvalue(), 32)
    assert out.shape == (32, 32, 3)
    assert out[..., 0].mean() > 230 and out[..., 1].mean() < 25 and out[..., 2].mean() < 25


def test_grayscale_jpeg_and_png_named_jpeg():
    gray = _smooth_rgb(64, 48)[..., 0]
    ok, buf = cv2.imencode(".jpg", gray)
    out = decode_image(buf.tobytes(), 32)
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    # ImageNet's n02105855_2933.JPEG is really a PNG: format comes from the bytes
    png = _png(cv2.cvtColor(_solid_rgb(40, 40, (0, 200, 0)), cv2.COLOR_RGB2BGR))
    assert media.probe_image(png).format == "PNG"
    out = decode_image({"bytes": png, "path": "n02105855_2933.JPEG"}, 40)
    assert out[..., 1].min() == 200 and out[..., 0].max() == 0


def test_16bit_and_alpha_png_become_8bit_rgb():
    x16 = (np.random.RandomState(1).rand(32, 32, 3) * 65535).astype(np.uint16)   # BGR order
    out = decode_image(_png(x16), 32)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    expect = cv2.cvtColor((x16 >> 8).astype(np.uint8), cv2.COLOR_BGR2RGB)
    assert np.abs(out.astype(int) - expect.astype(int)).max() <= 1
    bgra = np.zeros((32, 32, 4), np.uint8)
    bgra[..., 2] = 255          # red
    bgra[..., 3] = 128          # half transparent: alpha is dropped
    out = decode_image(_png(bgra), 32)
    assert out.shape == (32, 32, 3) and out[..., 0].min() == 255 and out[..., 2].max() == 0


def test_truncated_and_corrupt_images():
    data = _jpeg(_smooth_rgb(300, 200))
    for cut in (len(data) - 2, len(data) // 2, 1000):
        assert _reason(data[:cut]) == "corrupt_image"
    png = _png(_smooth_rgb(300, 200))
    assert _reason(png[: len(png) // 2]) == "corrupt_image"
    assert _reason(b"") == "empty_file"
    assert _reason(None) == "empty_file"
    assert _reason(b"this is not an image at all" * 10) == "not_an_image"


def _png_with_size(w: int, h: int) -> bytes:
    png = bytearray(_png(np.zeros((8, 8, 3), np.uint8)))
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", w, h)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)   # keep the CRC valid
    return bytes(png)


def _jpeg_with_size(w: int, h: int) -> bytes:
    data = bytearray(_jpeg(np.zeros((8, 8, 3), np.uint8)))
    i = data.index(b"\xff\xc0")        # baseline SOF0: marker, length(2), precision(1), height(2), width(2)
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


@pytest.mark.parametrize("make", [_png_with_size, _jpeg_with_size])
def test_decompression_bomb_refused_before_decoding(make, monkeypatch):
    data = make(60000, 60000)
    info_err = pytest.raises(media.MediaError)
    with info_err:
        media.probe_image(data)
    called = []
    monkeypatch.setattr(img_mod.cv2, "imdecode", lambda *a: called.append(1))
    ex = HogColorExtractor(size=32)
    dec = ex.decode([data])
    assert dec.values == [None]
    assert dec.errors[0][0] == "decompression_bomb"
    assert called == []                 # nothing was decoded, so nothing was allocated


def test_decode_batch_reports_errors_per_row():
    ex = HogColorExtractor(size=32)
    good = _jpeg(_smooth_rgb(80, 60))
    feats, errors = ex.extract([good, b"", None, good[:500], {"bytes": good, "path": "x.jpg"}])
    assert [e[0] if e else None for e in errors] == [None, "empty_file", "empty_file", "corrupt_image", None]
    assert feats.shape == (5, ex.dim) and feats.dtype == np.float32
    assert np.array_equal(feats[0], feats[4]) and not feats[1:4].any()


# --- hog_color ---------------------------------------------------------------------
def test_hog_color_dims_determinism_and_batch_independence():
    ex = HogColorExtractor(size=64)
    assert ex.dim == 7 * 7 * 4 * 9 + 8 * 4 * 4 == 1892 == embedding_dim("image", ImageFeatures())
    imgs = [decode_image(_jpeg(_smooth_rgb(128, 96, seed=s)), 64) for s in range(5)]
    a = ex.encode(imgs)
    b = ex.encode(imgs)
    single = np.concatenate([ex.encode([im]) for im in imgs])
    assert a.shape == (5, 1892) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b) and np.array_equal(a, single)
    # HSV part is a sqrt-normalised histogram: unit L2 norm
    assert np.allclose(np.linalg.norm(a[:, 1764:], axis=1), 1.0, atol=1e-5)
    # a flat image has no gradients: zero HOG, still finite
    flat = ex.encode([np.full((64, 64, 3), 90, np.uint8)])
    assert np.isfinite(flat).all() and not flat[0, :1764].any()
    assert ex.params()["cells"] == 8 and ex.describe()["name"] == "hog_color"


def test_hog_sees_orientation():
    ex = HogColorExtractor(size=64)
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = 255
    stripes[:, 1::8] = 255
    vertical = ex.encode([stripes])[0, :1764].reshape(-1, 9)
    horizontal = ex.encode([stripes.transpose(1, 0, 2).copy()])[0, :1764].reshape(-1, 9)
    # vertical stripes -> horizontal gradients (bin of 0/180 degrees); horizontal -> 90 degrees
    assert vertical.sum(0).argmax() in (0, 8) and horizontal.sum(0).argmax() == 4


def test_hog_other_sizes_keep_dim():
    for size in (16, 40, 100):
        ex = HogColorExtractor(size=size)
        out = ex.extract([_jpeg(_smooth_rgb(120, 90))])[0]
        assert out.shape == (1, 1892) and np.isfinite(out).all()


def test_registry_image():
    ex = build_extractor("image", ImageFeatures(size=48))
    assert isinstance(ex, HogColorExtractor) and ex.size == 48 and not ex.needs_model
    cnn = build_extractor("image", ImageFeatures(extractor="cnn", arch="resnet50", size=32))
    assert isinstance(cnn, ResNetExtractor) and cnn.dim == 2048 and cnn.needs_model
    assert embedding_dim("image", ImageFeatures(extractor="cnn", arch="resnet34")) == 512


# --- ResNet ------------------------------------------------------------------------
RESNET18_FIRST = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                  "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight"]
RESNET18_LAST = ["layer4.1.bn2.running_mean", "layer4.1.bn2.running_var", "layer4.1.bn2.num_batches_tracked",
                 "fc.weight", "fc.bias"]


def test_resnet_state_dict_uses_torchvision_names():
    sd18 = build_resnet("resnet18").state_dict()
    keys = list(sd18)
    assert len(keys) == 122
    assert keys[:len(RESNET18_FIRST)] == RESNET18_FIRST and keys[-len(RESNET18_LAST):] == RESNET18_LAST
    for k in ("layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight"):
        assert k in sd18
    assert "layer1.0.downsample.0.weight" not in sd18
    assert tuple(sd18["fc.weight"].shape) == (1000, 512)
    assert len(build_resnet("resnet34").state_dict()) == 218
    sd50 = build_resnet("resnet50").state_dict()
    assert len(sd50) == 320
    assert "layer1.0.downsample.0.weight" in sd50 and "layer1.0.conv3.weight" in sd50
    assert tuple(sd50["fc.weight"].shape) == (1000, 2048)
    assert tuple(sd50["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)   # stride on the 3x3 (v1.5)


def test_resnet_random_init_warns_and_save_load_round_trip(tmp_path):
    import torch

    imgs = [decode_image(_jpeg(_smooth_rgb(96, 80, seed=s)), 32) for s in range(3)]
    rand = ResNetExtractor("resnet18", size=32, weights=None, batch_size=2)
    with pytest.warns(RuntimeWarning, match="RANDOM weights"):
        a = rand.encode(imgs)
    assert a.shape == (3, 512) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, rand.encode(imgs))
    assert rand.params()["init"] == "random(seed=0)"
    sd = rand._model.state_dict()
    for i, wrap in enumerate([lambda s: s, lambda s: {"state_dict": s, "epoch": 3},
                              lambda s: {"model": {"module." + k: v for k, v in s.items()}}]):
        path = tmp_path / f"r18_{i}.pth"
        torch.save(wrap(sd), path)
        loaded = ResNetExtractor("resnet18", size=32, weights=str(path), batch_size=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # no random-init warning with weights
            b = loaded.encode(imgs)
        assert np.array_equal(a, b)
        assert len(loaded.params()["weights_sha256"]) == 64
    # a fine-tuned checkpoint with another class count loads (fc is not used)
    sd10 = dict(sd)
    sd10["fc.weight"], sd10["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    torch.save(sd10, tmp_path / "r18_10.pth")
    assert np.array_equal(a, ResNetExtractor("resnet18", size=32, weights=str(tmp_path / "r18_10.pth"), batch_size=2)
                          .encode(imgs))
    # a mismatching checkpoint is refused, not half-loaded
    torch.save(build_resnet("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises((ValueError, RuntimeError)):
        ResNetExtractor("resnet18", size=32, weights=str(tmp_path / "r50.pth")).encode(imgs)


def test_resnet_bf16_on_cpu_close_to_fp32():
    imgs = [decode_image(_jpeg(_smooth_rgb(64, 64, seed=s)), 32) for s in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        f32 = ResNetExtractor("resnet18", size=32).encode(imgs)
        b16 = ResNetExtractor("resnet18", size=32, precision="bf16").encode(imgs)
    assert b16.dtype == np.float32
    cos = (f32 * b16).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(b16, axis=1))
    assert cos.min() > 0.98


# --- hog_color equals the implementation it replaced -------------------------------
def _previous_hog_color(images: np.ndarray, cells=8, bins=9, block=2, hsv_bins=(8, 4, 4)) -> np.ndarray:
    """The oracle: hog_color_features exactly as mmbatch computed it before this rewrite."""
    n, S = images.shape[0], images.shape[1]
    tall = np.ascontiguousarray(images, dtype=np.uint8).reshape(n * S, S, 3)
    gray = cv2.cvtColor(tall, cv2.COLOR_RGB2GRAY).reshape(n * S, S).astype(np.float32)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=1)
    gy3 = gy.reshape(n, S, S)
    gy3[:, 0, :] = 0.0
    gy3[:, S - 1, :] = 0.0
    mag, q = cv2.cartToPolar(gx, gy, angleInDegrees=True)
    q *= bins / 180.0
    q -= np.float32(bins) * (q >= bins)
    q += 0.5
    slot = q.astype(np.intp)
    frac = q - slot
    w_hi = mag * frac
    w_lo = mag - w_hi
    slots = bins + 2
    cell_of = (np.arange(S) * cells) // S
    cell = cell_of[:, None] * cells + cell_of[None, :]
    base = ((np.arange(n)[:, None, None] * (cells * cells) + cell[None]) * slots).astype(np.intp)
    idx = base.reshape(-1) + slot.reshape(-1)
    total = n * cells * cells * slots
    hist = np.bincount(idx, weights=w_lo.reshape(-1), minlength=total)
    hist += np.bincount(idx + 1, weights=w_hi.reshape(-1), minlength=total)
    hist = hist.reshape(n, cells, cells, slots)
    h = hist[..., 1:bins + 1].astype(np.float32)
    h[..., bins - 1] += hist[..., 0]
    h[..., 0] += hist[..., bins + 1]
    nb = cells - block + 1
    blocks = np.concatenate([h[:, dy:dy + nb, dx:dx + nb, :] for dy in range(block) for dx in range(block)],
                            axis=-1)
    blocks /= np.sqrt(np.sum(blocks * blocks, axis=-1, keepdims=True) + 1e-10)
    np.minimum(blocks, 0.2, out=blocks)
    blocks /= np.sqrt(np.sum(blocks * blocks, axis=-1, keepdims=True) + 1e-10)
    hb, sb, vb = hsv_bins
    hsv = cv2.cvtColor(tall, cv2.COLOR_RGB2HSV).reshape(n, -1, 3).astype(np.intp)
    code = ((np.minimum(hsv[..., 0] * hb // 180, hb - 1) * sb + hsv[..., 1] * sb // 256) * vb
            + hsv[..., 2] * vb // 256)
    k = hb * sb * vb
    colour = np.stack([np.bincount(c, minlength=k) for c in code]).astype(np.float32) / code.shape[1]
    return np.concatenate([blocks.reshape(n, -1), np.sqrt(colour)], axis=1).astype(np.float32)


def _real_image_files() -> dict[str, bytes]:
    """Encoded images in the shapes the workflows see, plus edge cases."""
    from benchmarks.extractors import large_items, small_items

    files = {f"large_jpeg_{i}": b for i, b in enumerate(large_items(3)["image"])}      # 500x375 q92
    files.update({f"small_png_{i}": b for i, b in enumerate(small_items(3)["image"])})  # 28x28
    files["smooth_jpeg_128x96"] = _jpeg(_smooth_rgb(128, 96, seed=3))
    files["gray_png_70x200"] = _png(_smooth_rgb(70, 200, seed=4)[..., 0])
    files["flat_jpeg"] = _jpeg(_solid_rgb(80, 80, (200, 30, 90)))
    files["stripes_png"] = _png(np.tile(((np.arange(64) // 4) % 2 * 255).astype(np.uint8)[:, None, None], (1, 64, 3)))
    return files


# Both compute in float32 with float64 histogram sums; 1e-5 absolute on values in [0, 1]
# (HOG after L2-Hys, sqrt of a normalised histogram) is ~100 float32 steps and fails on
# any change of gradient, binning, normalisation or layout (those move values by >= 1e-3).
@pytest.mark.parametrize("size", [64, 40, 100])
def test_hog_color_equal_to_the_previous_implementation_on_real_files(size):
    files = _real_image_files()
    ex = HogColorExtractor(size=size)
    feats, errors = ex.extract(list(files.values()))
    assert errors == [None] * len(files)
    ref = _previous_hog_color(np.stack([decode_image(b, size) for b in files.values()]))
    for i, name in enumerate(files):
        assert np.abs(feats[i] - ref[i]).max() <= 1e-5, name
    assert feats[:, :1764].any(axis=1).sum() == len(files) - 1          # only the flat image has no HOG


# --- HOG against scikit-image ------------------------------------------------------
def _reference_hog(gray: np.ndarray, cells: int, bins: int, block: int, vote: str) -> np.ndarray:
    """HOG in plain float64 numpy, pixel loops written out: skimage's conventions
    (gradients [-1, 0, 1] with zero border rows/columns, unsigned angle, cell means,
    L2-Hys blocks with eps 1e-5, (block row, block col, cell row, cell col, bin) order).
    ``vote="nearest"``: every pixel into its bin (skimage); ``"linear"``: split between
    the two nearest bin centres (b + 0.5) * 180 / bins (mmbatch)."""
    g = gray.astype(np.float64)
    side = g.shape[0] // cells
    d_row, d_col = np.zeros_like(g), np.zeros_like(g)
    d_row[1:-1, :] = g[2:, :] - g[:-2, :]
    d_col[:, 1:-1] = g[:, 2:] - g[:, :-2]
    mag = np.hypot(d_row, d_col)
    theta = np.rad2deg(np.arctan2(d_row, d_col)) % 180.0
    width = 180.0 / bins
    rows, cols = np.indices(g.shape) // side
    hist = np.zeros((cells, cells, bins))
    if vote == "nearest":
        np.add.at(hist, (rows, cols, np.floor(theta / width).astype(int) % bins), mag)
    else:
        pos = theta / width - 0.5
        lo = np.floor(pos)
        frac = pos - lo
        np.add.at(hist, (rows, cols, lo.astype(int) % bins), mag * (1.0 - frac))
        np.add.at(hist, (rows, cols, (lo.astype(int) + 1) % bins), mag * frac)
    hist /= side * side
    nb = cells - block + 1
    out = np.zeros((nb, nb, block, block, bins))
    for r in range(nb):
        for c in range(nb):
            v = hist[r:r + block, c:c + block]
            v = np.minimum(v / np.sqrt(np.sum(v ** 2) + 1e-10), 0.2)
            out[r, c] = v / np.sqrt(np.sum(v ** 2) + 1e-10)
    return out.ravel()


# cv2.cartToPolar's angles are accurate to about 0.3 degrees (OpenCV documentation): at
# most 0.3 / 20 = 1.5 % of a pixel's vote lands in the neighbouring bin. Measured max
# difference to the exact-angle reference: 3.8e-4 (9 bins) on these images; a vote one
# bin off, a mirrored angle or transposed cells differ by >= 0.09.
HOG_ANGLE_TOL = 2e-3


@pytest.mark.parametrize("bins", [9, 4, 1])
def test_hog_agrees_with_skimage(bins):
    from skimage.feature import hog as skimage_hog

    files = _real_image_files()
    images = np.stack([decode_image(b, 64) for b in files.values()])
    n = len(images)
    gray = cv2.cvtColor(images.reshape(n * 64, 64, 3), cv2.COLOR_RGB2GRAY).reshape(n, 64, 64)
    ours = img_mod.hog_color_features(images, bins=bins)[:, :49 * 4 * bins]
    for i, name in enumerate(files):
        sk = skimage_hog(gray[i].astype(np.float64), orientations=bins, pixels_per_cell=(8, 8),
                         cells_per_block=(2, 2), block_norm="L2-Hys", feature_vector=True)
        # 1. the reference, with skimage's nearest-bin vote, is skimage
        assert np.abs(_reference_hog(gray[i], 8, bins, 2, "nearest") - sk).max() < 1e-6, name
        linear = _reference_hog(gray[i], 8, bins, 2, "linear")
        # 2. with one bin the vote plays no part: ours is skimage to float32 rounding
        if bins == 1:
            assert np.abs(ours[i] - sk).max() < 1e-6, name
        # 3. ours is the reference with the linear vote, to cartToPolar's angle accuracy
        assert np.abs(ours[i] - linear).max() < HOG_ANGLE_TOL, name
        if bins > 1 and ours[i].any():      # and that tolerance tells a wrong bin apart
            wrong = np.roll(ours[i].reshape(-1, bins), 1, axis=1).ravel()
            assert np.abs(wrong - linear).max() > 20 * HOG_ANGLE_TOL, name


def test_zero_copy_column_views_decode_like_bytes():
    """The preprocess unit hands extractors memoryviews into the Parquet column's buffer
    (``raw_items``): same features and same row errors as the bytes themselves."""
    import pyarrow as pa

    from mmbatch.preprocess.unit import raw_items

    good = list(_real_image_files().values())
    jpeg = _jpeg(_smooth_rgb(300, 200))
    values = good + [jpeg[:1000], b"this is not an image at all" * 10, b"", None]
    col = pa.array([None if v is None else {"bytes": v, "path": f"img/{i}"} for i, v in enumerate(values)],
                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    items, paths = raw_items(pa.table({"image": col}), "image")
    assert all(isinstance(x, memoryview) for x in items[:-1]) and items[-1] is None
    assert paths[0] == "img/0" and paths[-1] is None
    ex = HogColorExtractor()
    f_bytes, e_bytes = ex.extract(values)
    f_view, e_view = ex.extract(items)
    assert e_view == e_bytes and [e[0] for e in e_view[len(good):-2]] == ["corrupt_image", "not_an_image"]
    assert np.array_equal(f_view, f_bytes)
