"""Image -> text: OCR with Tesseract (``pytesseract`` over the ``tesseract`` program).

Light preprocessing first (:func:`preprocess_for_ocr`): grayscale, upscale small
images so text is tall enough for Tesseract, Otsu threshold, dark text on a
light background, a white margin. The ``tesseract`` program comes from the
system (Debian/Ubuntu: ``apt-get install tesseract-ocr``); :func:`check_tesseract`
says so when it is missing.
"""
from __future__ import annotations

import os
import re
import shutil

import numpy as np

from mmbatch.convert import MissingTool

LANG = "eng"
MIN_HEIGHT = 300          # upscale images shorter than this (pixels) before OCR
MAX_UPSCALE = 4.0
BORDER = 16               # white margin added around the page (pixels)
TIMEOUT_S = 120.0         # one Tesseract run; a longer one is killed (RuntimeError)
INSTALL_HINT = ("the `tesseract` program is not installed or not on PATH; install it with "
                "`apt-get install tesseract-ocr` (Debian/Ubuntu) or `brew install tesseract` (macOS), "
                "or set TESSERACT_CMD to its location")


def tesseract_cmd() -> str:
    """The tesseract executable: ``$TESSERACT_CMD`` or ``tesseract`` on PATH."""
    return os.environ.get("TESSERACT_CMD") or "tesseract"


def check_tesseract() -> str:
    """Path of the tesseract program; :class:`MissingTool` (with the install command) if absent."""
    try:
        import pytesseract  # noqa: F401
    except ImportError:
        raise MissingTool("the pytesseract package is not installed; "
                          "from a clone `pip install -e '.[convert]'` (an installed mmbatch: "
                          "`pip install 'mmbatch[convert]'`), and `apt-get install tesseract-ocr`") from None
    cmd = tesseract_cmd()
    path = shutil.which(cmd)
    if path is None:
        raise MissingTool(INSTALL_HINT)
    return path


def preprocess_for_ocr(image: np.ndarray, min_height: int = MIN_HEIGHT) -> np.ndarray:
    """RGB/RGBA/gray uint8 -> binary uint8 page (0 text on 255 background) for Tesseract."""
    import cv2

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 4:
        # composite transparency onto white so transparent areas read as background
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = (a[:, :, :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    if a.ndim == 3:
        gray = cv2.cvtColor(np.ascontiguousarray(a[:, :, :3]), cv2.COLOR_RGB2GRAY)
    else:
        gray = a
    if gray.dtype != np.uint8:
        gray = np.clip(gray.astype(np.float32) * (255.0 if gray.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    h = gray.shape[0]
    if 0 < h < min_height:
        f = min(MAX_UPSCALE, min_height / h)
        gray = cv2.resize(gray, None, fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
    _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # text is the minority class: if most pixels are dark, the page is inverted
    if np.count_nonzero(binary) < binary.size / 2:
        binary = 255 - binary
    return cv2.copyMakeBorder(binary, BORDER, BORDER, BORDER, BORDER, cv2.BORDER_CONSTANT, value=255)


def ocr_image(image: np.ndarray, lang: str = LANG, psm: int | None = None,
              preprocess: bool = True, timeout: float = TIMEOUT_S) -> str:
    """Recognised text of an image (stripped; lines joined with ``\\n``).

    ``psm`` is Tesseract's page segmentation mode (default: its automatic mode 3).
    Tesseract runs single-threaded (``OMP_THREAD_LIMIT=1`` unless set): callers
    parallelise over images, not inside one. A run longer than ``timeout`` seconds is
    killed and raises RuntimeError.
    """
    check_tesseract()
    import pytesseract

    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    pytesseract.pytesseract.tesseract_cmd = tesseract_cmd()
    page = preprocess_for_ocr(image) if preprocess else np.asarray(image)
    config = f"--psm {int(psm)}" if psm is not None else ""
    try:
        text = pytesseract.image_to_string(page, lang=lang, config=config, timeout=timeout)
    except RuntimeError as e:
        if "timeout" not in str(e).lower():
            raise
        raise RuntimeError(f"tesseract took longer than {timeout:g} s on a {page.shape[1]}x{page.shape[0]} "
                           "page; killed") from None
    lines = [ln.strip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln)


def words(text: str) -> list[str]:
    """Lower-case words of a text (letters, digits and apostrophes), for comparing OCR output."""
    return re.findall(r"[a-z0-9']+", text.lower())
