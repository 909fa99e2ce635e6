"""`mmbatch convert`: run one conversion over a file or a folder of files.

A file in gives a file out (``--out`` names it, or a folder to put it in: an
existing folder, or a name ending in ``/`` or without an extension). A
folder in gives a folder out: one output per input found under it (searched
recursively, sub-folders kept), named as the input with the direction's
extension (``photo.jpg`` -> ``photo.wav``; text inputs are ``.txt`` files).
image-to-speech also writes the sound's spectrogram next to it as
``<name>.spectrogram.png``.

A file that fails gets one line on stderr and the rest go on; the last line
counts the failures, and the exit code is 1 if any failed (0 otherwise). A
missing program (tesseract, espeak-ng) is reported once, before any file.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mmbatch.convert import DIRECTIONS, MissingTool, audio_format_for, decode_rgb, encode_audio, encode_png
from mmbatch.errors import EXIT_FAIL, EXIT_OK, UsageError

log = logging.getLogger("mmbatch.convert")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
TEXT_EXTS = (".txt",)
AUDIO_OUT_EXTS = (".wav", ".flac")
IMAGE_OUT_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

INPUT_EXTS = {
    "image-to-speech": IMAGE_EXTS,
    "image-to-text": IMAGE_EXTS,
    "text-to-image": TEXT_EXTS,
    "text-to-speech": TEXT_EXTS,
}
OUTPUT_EXT = {            # folder mode, and a single file whose --out is a folder
    "image-to-speech": ".wav",
    "image-to-text": ".txt",
    "text-to-image": ".png",
    "text-to-speech": ".wav",
}
ALLOWED_OUT_EXTS = {
    "image-to-speech": AUDIO_OUT_EXTS,
    "image-to-text": None,            # any name
    "text-to-image": IMAGE_OUT_EXTS,
    "text-to-speech": AUDIO_OUT_EXTS,
}
SPECTROGRAM_SUFFIX = ".spectrogram.png"


def spectrogram_path(audio_path: Path) -> Path:
    return audio_path.with_name(audio_path.stem + SPECTROGRAM_SUFFIX)


def check_tools(direction: str, style: str = "plain") -> None:
    """Fail early (MissingTool / UsageError) when a direction cannot run here."""
    if direction not in DIRECTIONS:
        raise UsageError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    if direction == "image-to-text":
        from mmbatch.convert.image_to_text import check_tesseract
        check_tesseract()
    elif direction == "text-to-speech":
        from mmbatch.convert.text_to_speech import check_espeak
        check_espeak()
    elif direction == "text-to-image":
        from mmbatch.convert.text_to_image import STYLES
        if style not in STYLES:
            raise UsageError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_text(src: Path) -> str:
    return src.read_text(encoding="utf-8-sig")


def convert_file(direction: str, src: Path | str, dst: Path | str, *, style: str = "plain",
                 seconds: float | None = None, voice: str | None = None) -> list[Path]:
    """Convert one file; returns the paths written. Raises on any failure."""
    src, dst = Path(src), Path(dst)
    written = [dst]
    if direction == "image-to-speech":
        from mmbatch.convert import image_to_speech as i2s

        rgb = decode_rgb(src.read_bytes())
        y = i2s.image_to_waveform(rgb, seconds=seconds or i2s.SECONDS)
        _write_atomic(dst, encode_audio(y, format=audio_format_for(dst)))
        spec = spectrogram_path(dst)
        i2s.save_spectrogram_png(y, spec, fmax=min(i2s.FMAX * 1.25, 8000.0), title=src.name)
        written.append(spec)
    elif direction == "image-to-text":
        from mmbatch.convert.image_to_text import ocr_image

        text = ocr_image(decode_rgb(src.read_bytes()))
        _write_atomic(dst, (text + "\n").encode("utf-8") if text else b"")
    elif direction == "text-to-image":
        from PIL import Image

        from mmbatch.convert.text_to_image import text_to_image

        rgb = text_to_image(_read_text(src), style=style)
        if dst.suffix.lower() == ".png":
            _write_atomic(dst, encode_png(rgb))
        else:
            import io
            buf = io.BytesIO()
            fmt = Image.registered_extensions().get(dst.suffix.lower(), "PNG")
            Image.fromarray(rgb).save(buf, format=fmt)
            _write_atomic(dst, buf.getvalue())
    elif direction == "text-to-speech":
        from mmbatch.convert.text_to_speech import VOICE, synthesize

        y = synthesize(_read_text(src), voice=voice or VOICE)
        _write_atomic(dst, encode_audio(y, format=audio_format_for(dst)))
    else:
        raise UsageError(f"unknown direction {direction!r}")
    return written


def _is_input(p: Path, exts: tuple[str, ...]) -> bool:
    return p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")


def refuse_overwrite(src: str, dst: str) -> None:
    """UsageError when the output ``dst`` is the input ``src``, holds it or lies inside it (URIs
    normalised: mmbatch.engine.ownership.check_disjoint)."""
    from mmbatch.engine import ownership

    ownership.check_disjoint({"--out": str(dst)}, {"INPUT": str(src)})


def plan(direction: str, input: Path | str, out: Path | str) -> list[tuple[Path, Path]]:
    """(source, destination) pairs for a file or folder input. UsageError if nothing to do."""
    as_folder = str(out).endswith(("/", os.sep))
    src, out = Path(input), Path(out)
    exts = INPUT_EXTS[direction]
    new_ext = OUTPUT_EXT[direction]
    if src.is_file():
        # --out is a folder when it is one, ends with a slash, or has no extension
        if as_folder or out.is_dir() or not out.suffix:
            dst = out / (src.stem + new_ext)
        else:
            dst = out
        allowed = ALLOWED_OUT_EXTS[direction]
        if allowed and dst.suffix.lower() not in allowed:
            raise UsageError(f"{direction}: output {dst} must end in one of {', '.join(allowed)}")
        refuse_overwrite(src, dst)
        return [(src, dst)]
    if not src.is_dir():
        raise UsageError(f"input {src} does not exist")
    if out.exists() and not out.is_dir():
        raise UsageError(f"input {src} is a folder, so --out must be a folder; {out} is a file")
    refuse_overwrite(src, out)
    pairs = []
    for p in sorted(src.rglob("*")):
        if not _is_input(p, exts):
            continue
        rel = p.relative_to(src)
        pairs.append((p, out / rel.with_suffix(new_ext)))
    if not pairs:
        raise UsageError(f"no {'/'.join(exts)} files under {src}")
    return pairs


def convert_cli(direction: str, input: str, out: str, style: str = "plain", *,
                seconds: float | None = None, voice: str | None = None, shown: str | None = None) -> int:
    """Entry point of ``mmbatch convert``: 0 when every file converted, 1 otherwise. ``input`` and
    ``out`` may be object-store URIs (:func:`convert_remote`)."""
    if "://" in str(input) or "://" in str(out):
        return convert_remote(direction, input, out, style=style, seconds=seconds, voice=voice)
    if direction not in DIRECTIONS:
        raise UsageError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    pairs = plan(direction, input, out)       # usage errors (an output over its input) before the tools
    try:
        check_tools(direction, style)
    except MissingTool as e:
        print(f"mmbatch convert {direction}: {e}", file=sys.stderr)
        return EXIT_FAIL
    single = Path(input).is_file()
    failed = 0
    claimed: dict[Path, Path] = {}
    for src, dst in pairs:
        other = claimed.get(dst)
        if other is not None:
            failed += 1
            print(f"FAILED {src}: output {dst} already written from {other} (same name, different extension)",
                  file=sys.stderr)
            continue
        claimed[dst] = src
        try:
            written = convert_file(direction, src, dst, style=style, seconds=seconds, voice=voice)
            log.info("%s -> %s", src, ", ".join(map(str, written)))
        except Exception as e:  # one bad file must not stop the folder
            failed += 1
            reason = getattr(e, "reason", None) or type(e).__name__
            detail = getattr(e, "detail", None) or str(e)
            print(f"FAILED {src}: {reason}: {detail}", file=sys.stderr)
    ok = len(pairs) - failed
    where = shown or (pairs[0][1] if single else out)
    print(f"{direction}: {ok} of {len(pairs)} file(s) converted into {where}; {failed} failed")
    return EXIT_FAIL if failed else EXIT_OK


def convert_remote(direction: str, input: str, out: str, **kwargs) -> int:
    """``mmbatch convert`` with an object-store input or output (s3://, gs://, ...): the input is copied
    into a local temp folder and converted there exactly as a local one is, then every output is
    uploaded once to its final key (no partial object is ever visible)."""
    import posixpath
    import tempfile

    from mmbatch.engine import storage

    in_fs, in_path = storage.url_to_fs(input)
    out_fs, out_path = storage.url_to_fs(out)
    if not in_fs.exists(in_path):
        raise UsageError(f"input {input} does not exist")
    folder_in = in_fs.isdir(in_path)
    # the output is a file name only for a file input whose --out has an extension and is no folder
    file_out = (not folder_in and bool(Path(out_path).suffix) and not str(out).endswith("/")
                and not out_fs.isdir(out_path))
    if folder_in or file_out:
        refuse_overwrite(input, out)
    with tempfile.TemporaryDirectory(prefix="mmbatch-convert-") as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        if folder_in:
            in_fs.get(in_path.rstrip("/") + "/", str(src), recursive=True)
        else:
            src.mkdir()
            src = src / posixpath.basename(in_path)
            in_fs.get_file(in_path, str(src))
        dst.mkdir()
        local_out = dst / Path(out_path).name if file_out else dst
        rc = convert_cli(direction, str(src), str(local_out) + ("" if file_out else "/"), shown=out, **kwargs)
        base = posixpath.dirname(out_path) if file_out else out_path
        for p in sorted(dst.rglob("*")):
            if p.is_file():
                out_fs.put_file(str(p), storage.join(base, p.relative_to(dst).as_posix()))
    return rc
