"""Cross-modal conversions: sonification, OCR, text rendering, speech synthesis,
the `convert` command and the Ray Data completion stage.

Needs the system programs tesseract (tesseract-ocr) and espeak-ng; the tests
that use them are skipped with a message when they are absent.
"""
from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

from mmbatch.convert import MissingTool, SR, decode_rgb, encode_png
from mmbatch.convert import image_to_speech as i2s
from mmbatch.convert.cli import convert_cli
from mmbatch.convert.image_to_text import check_tesseract, ocr_image, words
from mmbatch.convert.text_to_image import font_path, render_text, render_wordcloud, text_to_image
from mmbatch.convert.text_to_speech import check_espeak, synthesize
from mmbatch.convert.transforms import GENERATED, CompleteModality
from mmbatch.schema import CANONICAL

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None,
                                     reason="tesseract not installed (apt-get install tesseract-ocr)")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (apt-get install espeak-ng)")


# --- fixtures -------------------------------------------------------------------------
def structured_image(h: int = 96, w: int = 128) -> np.ndarray:
    """RGB test picture: a bright block top left, a grey disc bottom right, a diagonal bar."""
    import cv2

    g = np.zeros((h, w), np.uint8)
    cv2.rectangle(g, (10, 8), (60, 40), 255, -1)
    cv2.circle(g, (92, 66), 22, 170, -1)
    cv2.line(g, (0, h - 1), (w - 1, h // 2), 110, 6)
    return np.dstack([g, g, g])


def text_image(text: str, size: int = 40, dark: bool = False) -> np.ndarray:
    """Text drawn with PIL in DejaVu Sans (white on dark when ``dark``)."""
    font = ImageFont.truetype(font_path(), size)
    w = int(font.getlength(text)) + 40
    im = Image.new("RGB", (w, size + 40), "black" if dark else "white")
    ImageDraw.Draw(im).text((20, 15), text, font=font, fill="white" if dark else "black")
    return np.asarray(im)


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# --- image -> speech ------------------------------------------------------------------
def test_sonification_spectrogram_matches_image():
    img = structured_image()
    y = i2s.image_to_waveform(img, sr=SR, seconds=1.0, rows=64, fmin=500, fmax=5000)
    assert y.dtype == np.float32 and y.shape == (SR,)
    assert 0.5 < np.abs(y).max() <= 1.0
    ref = i2s.scan_image(img, rows=64, cols=64)
    # STFT spectrogram sampled at the row frequencies and the column slot centres
    freqs, times, mag = i2s.waveform_spectrogram(y, SR, n_fft=512)
    edges = i2s.slot_edges(y.size, 64)
    centres = (edges[:-1] + edges[1:]) / 2 / SR
    seen = i2s.spectrogram_at(freqs, times, mag, i2s.row_frequencies(64, 500, 5000), centres)
    assert pearson(ref, seen) > 0.8
    # and the exact slot/row read-back
    assert pearson(ref, i2s.sonogram(y, SR, rows=64, cols=64, fmin=500, fmax=5000)) > 0.8


def test_sonification_pitch_and_time_axes():
    top = np.zeros((64, 64), np.uint8)
    top[:4, :] = 255                              # bright top rows -> high pitch
    bottom = np.zeros((64, 64), np.uint8)
    bottom[-4:, :] = 255                          # bright bottom rows -> low pitch
    for img, lo, hi in ((top, 4000, 5200), (bottom, 450, 650)):
        y = i2s.image_to_waveform(img)
        spec = np.abs(np.fft.rfft(y))
        f = np.fft.rfftfreq(y.size, 1 / SR)
        assert lo < f[spec.argmax()] < hi
    left = np.zeros((64, 64), np.uint8)
    left[:, :16] = 255                            # bright left quarter -> sound in the first quarter second
    y = i2s.image_to_waveform(left, seconds=2.0)
    assert y.size == 2 * SR
    e = (y.reshape(8, -1) ** 2).mean(axis=1)
    assert e[:2].min() > 100 * e[3:].max()
    silent = i2s.image_to_waveform(np.zeros((10, 10), np.uint8))
    assert not silent.any()
    with pytest.raises(ValueError, match="fmax"):
        i2s.image_to_waveform(top, sr=8000, fmax=5000)


def test_spectrogram_png():
    buf = io.BytesIO()
    i2s.save_spectrogram_png(i2s.image_to_waveform(structured_image()), buf, title="test")
    im = Image.open(io.BytesIO(buf.getvalue()))
    assert im.format == "PNG" and im.size[0] > 100


# --- image -> text --------------------------------------------------------------------
@needs_tesseract
@pytest.mark.parametrize("text,size,dark", [
    ("Hello multimodal world", 40, False),
    ("Seven quiet zebras", 14, False),            # small: upscaled before OCR
    ("White letters here", 36, True),             # inverted page
])
def test_ocr_reads_rendered_text(text, size, dark):
    got = words(ocr_image(text_image(text, size, dark)))
    assert got == words(text)


def test_missing_programs_say_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TESSERACT_CMD", "/nonexistent/tesseract")
    monkeypatch.setenv("ESPEAK_CMD", "/nonexistent/espeak-ng")
    with pytest.raises(MissingTool, match="apt-get install tesseract-ocr"):
        check_tesseract()
    with pytest.raises(MissingTool, match="apt-get install espeak-ng"):
        check_espeak()
    with pytest.raises(MissingTool, match="apt-get install espeak-ng"):
        synthesize("hello")
    src = tmp_path / "a.png"
    src.write_bytes(encode_png(text_image("abc")))
    assert convert_cli("image-to-text", str(src), str(tmp_path / "a.txt")) == 1
    assert "apt-get install tesseract-ocr" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists()


# --- text -> image --------------------------------------------------------------------
@needs_tesseract
def test_plain_rendering_reads_back():
    text = "The quick brown fox jumps over the lazy dog while batch pipelines turn pictures into speech"
    img = render_text(text, width=600)
    assert img.dtype == np.uint8 and img.shape[1] == 600 and img.shape[2] == 3
    assert img.shape[0] > 2 * 40                  # wrapped onto several lines
    assert np.array_equal(img, render_text(text, width=600))
    assert words(ocr_image(img)) == words(text)


def test_wordcloud_deterministic_and_not_empty():
    text = "speech speech speech image image text ray batch speech image"
    a = text_to_image(text, style="wordcloud")
    b = render_wordcloud(text)
    assert a.shape == (400, 800, 3) and np.array_equal(a, b)
    ink = (a.min(axis=2) < 200).mean()
    assert 0.02 < ink < 0.9
    with pytest.raises(ValueError):
        text_to_image("   ", style="plain")
    with pytest.raises(ValueError, match="style"):
        text_to_image("x", style="comic")


# --- text -> speech -------------------------------------------------------------------
@needs_espeak
def test_speech_synthesis():
    short = synthesize("hello")
    long = synthesize("hello there, this sentence is a good deal longer than the first one")
    for y in (short, long):
        assert y.dtype == np.float32 and y.ndim == 1
        assert np.sqrt(np.mean(y ** 2)) > 0.01
        assert np.abs(y).max() <= 1.0
    assert long.size > 2 * short.size
    assert 0.2 < short.size / SR < 2.0
    with pytest.raises(ValueError):
        synthesize("  ")
    with pytest.raises(RuntimeError, match="voice"):
        synthesize("hello", voice="zz-nonexistent")
    low, high = synthesize("hello", pitch=10), synthesize("hello", pitch=90)
    assert low.size != high.size or not np.allclose(low, high)
    with pytest.raises(ValueError, match="pitch"):
        synthesize("hello", pitch=120)


# --- CLI ------------------------------------------------------------------------------
def test_cli_folder_image_to_speech_continues_after_failure(tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(encode_png(structured_image()))
    Image.fromarray(structured_image(40, 60)).save(src / "sub" / "b.JPG")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "notes.md").write_text("ignored")
    out = tmp_path / "out"
    assert convert_cli("image-to-speech", str(src), str(out)) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "FAILED" in err
    for wav in (out / "a.wav", out / "sub" / "b.wav"):
        info = sf.info(str(wav))
        assert info.samplerate == SR and info.channels == 1 and abs(info.duration - 1.0) < 1e-3
        assert Image.open(wav.with_name(wav.stem + ".spectrogram.png")).format == "PNG"
    assert not (out / "broken.wav").exists()
    assert sorted(p.name for p in out.rglob("*.wav")) == ["a.wav", "b.wav"]


def test_cli_final_line_counts(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("hello world")
    (src / "b.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    assert convert_cli("text-to-image", str(src), str(tmp_path / "out")) == 1
    cap = capsys.readouterr()
    assert cap.out.strip().splitlines()[-1].endswith("1 failed")
    assert "1 of 2" in cap.out and "b.txt" in cap.err
    assert Image.open(tmp_path / "out" / "a.png").size[0] == 800
    assert convert_cli("text-to-image", str(src / "a.txt"), str(tmp_path / "cloud.png"), style="wordcloud") == 0
    assert Image.open(tmp_path / "cloud.png").size == (800, 400)


@needs_espeak
@needs_tesseract
def test_cli_single_files_and_main(tmp_path):
    from mmbatch.cli import main

    txt = tmp_path / "greeting.txt"
    txt.write_text("Good morning from the converter\n")
    assert main(["convert", "text-to-speech", str(txt), "--out", str(tmp_path / "speech.flac")]) == 0
    x, sr = sf.read(str(tmp_path / "speech.flac"))
    assert sr == SR and x.ndim == 1 and x.size > SR // 2
    outdir = tmp_path / "pics"
    outdir.mkdir()
    assert main(["convert", "text-to-image", str(txt), "--out", str(outdir)]) == 0
    png = outdir / "greeting.png"
    assert main(["convert", "text-to-speech", str(txt), "--out", str(tmp_path / "new") + "/"]) == 0
    assert sf.info(str(tmp_path / "new" / "greeting.wav")).samplerate == SR
    assert main(["convert", "image-to-text", str(png), "--out", str(tmp_path / "back.txt")]) == 0
    assert words((tmp_path / "back.txt").read_text()) == words(txt.read_text())
    assert main(["convert", "text-to-speech", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.wav")]) == 2
    assert main(["convert", "text-to-speech", str(txt), "--out", str(tmp_path / "x.mp3")]) == 2


# --- Ray Data stage -------------------------------------------------------------------
def canonical_rows() -> pa.Table:
    """Two image rows without audio, one speech row with audio, one image row without label."""
    png = encode_png(structured_image(32, 32))
    present = {"bytes": b"RIFF-not-touched", "path": "keep.wav"}
    rows = [
        {"sample_id": "img-0", "source": "imagenet", "label_name": "golden retriever",
         "image": {"bytes": png, "path": "a.JPEG"}},
        {"sample_id": "img-1", "source": "imagenet", "label_name": "tench",
         "image": {"bytes": png, "path": "b.JPEG"}, "audio": {"bytes": None, "path": None}},
        {"sample_id": "spk-0", "source": "librispeech", "audio": present, "text": "already spoken",
         "sample_rate": 8000, "num_samples": 8, "duration": 0.001},
        {"sample_id": "img-2", "source": "imagenet", "image": {"bytes": png, "path": "c.JPEG"}},
    ]
    return pa.Table.from_pylist(rows, schema=CANONICAL)


@needs_espeak
def test_complete_modality_batch_without_ray():
    out = CompleteModality("text-to-speech", source_column="label_name")(canonical_rows())
    assert out.schema.field(GENERATED).type == pa.string()
    assert out.schema.field("audio").type == CANONICAL.field("audio").type
    rows = out.to_pylist()
    assert [r[GENERATED] for r in rows] == ["audio", "audio", None, None]
    assert rows[2]["audio"]["bytes"] == b"RIFF-not-touched" and rows[2]["sample_rate"] == 8000
    assert rows[3]["audio"] is None
    # a pandas batch works the same
    df = CompleteModality("text-to-image", source_column="label_name")(canonical_rows().to_pandas())
    assert df[GENERATED].tolist()[:2] == [None, None]       # image already present on image rows
    assert df[GENERATED].tolist()[2] is None                # no label_name on the speech row


@needs_espeak
def test_complete_modality_in_ray_pipeline(ray_session):
    import ray

    ds = ray.data.from_arrow(canonical_rows())
    ds = ds.map_batches(CompleteModality("text-to-speech", source_column="label_name"),
                        **CompleteModality.RAY_OPTIONS)
    ds = ds.map_batches(CompleteModality("text-to-image", source_column="text", style="wordcloud"),
                        **CompleteModality.RAY_OPTIONS)
    rows = {r["sample_id"]: r for r in ds.take_all()}
    assert set(rows) == {"img-0", "img-1", "img-2", "spk-0"}
    for sid, name in (("img-0", "golden retriever"), ("img-1", "tench")):
        r = rows[sid]
        assert r[GENERATED] == "audio" and r["label_name"] == name
        x, sr = sf.read(io.BytesIO(r["audio"]["bytes"]), dtype="float32")
        assert sf.info(io.BytesIO(r["audio"]["bytes"])).format == "FLAC"
        assert sr == SR == r["sample_rate"] and r["num_samples"] == x.size
        assert r["duration"] == pytest.approx(x.size / SR)
        assert np.sqrt(np.mean(x ** 2)) > 0.01
        assert r["image"]["path"] in ("a.JPEG", "b.JPEG")      # present image untouched
    assert rows["img-2"][GENERATED] is None and rows["img-2"]["audio"] is None
    spk = rows["spk-0"]
    assert spk["audio"]["bytes"] == b"RIFF-not-touched"
    assert spk[GENERATED] == "image"                             # word cloud of its transcript
    assert decode_rgb(spk["image"]["bytes"]).shape == (400, 800, 3)


def test_generated_modalities_accumulate():
    t = pa.Table.from_pylist([{"sample_id": "t-0", "source": "manifest", "text": "a red apple"}], schema=CANONICAL)
    t = CompleteModality("text-to-image")(t)
    t = CompleteModality("image-to-speech")(t)
    t = CompleteModality("image-to-speech")(t)                  # audio now present: nothing to do
    row = t.to_pylist()[0]
    assert row[GENERATED] == "image,audio"
    assert row["num_samples"] == SR and row["duration"] == pytest.approx(1.0)
    assert decode_rgb(row["image"]["bytes"]).shape[1] == 800
