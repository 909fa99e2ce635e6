"""Text -> image: the text itself (``plain``) or a word cloud (``wordcloud``).

``plain`` wraps the words greedily to a fixed page width and draws them in
DejaVu Sans, black on white; the height follows from the number of lines, so
the same text always gives the same picture. ``wordcloud`` sizes words by how
often they occur (the ``wordcloud`` package, fixed ``random_state``).

The font is DejaVu Sans from the system (``fonts-dejavu-core``) or, failing
that, the copy matplotlib ships, so rendering works without system fonts.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

STYLES = ("plain", "wordcloud")
WIDTH = 800               # page width, both styles (pixels)
FONT_SIZE = 32
MARGIN = 24
LINE_SPACING = 1.25
CLOUD_HEIGHT = 400
MAX_HEIGHT = 16384        # plain: the tallest page (pixels; 800 x 16384 RGB = 38 MiB, about 400 lines)
MAX_CHARS = 100_000       # refused before wrapping (the default page holds about 400 lines of 40 characters)
CLOUD_MAX_WORDS = 200
RANDOM_STATE = 0

_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/TTF", "/usr/share/fonts/dejavu",
              "/usr/local/share/fonts", "/Library/Fonts")


@lru_cache(maxsize=None)
def font_path(name: str = "DejaVuSans.ttf") -> str:
    """A TrueType font file: ``$MMBATCH_FONT``, the system's DejaVu, else matplotlib's copy."""
    env = os.environ.get("MMBATCH_FONT")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"MMBATCH_FONT={env} is not a file")
        return env
    for d in _FONT_DIRS:
        p = Path(d) / name
        if p.is_file():
            return str(p)
    try:
        import matplotlib
        p = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
        if p.is_file():
            return str(p)
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        pass
    raise FileNotFoundError(f"font {name} not found; install it with `apt-get install fonts-dejavu-core` "
                            "or point MMBATCH_FONT at a .ttf file")


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.truetype(font_path(), size)


def wrap_text(text: str, font, max_width: float) -> list[str]:
    """Greedy word wrap by rendered width; paragraphs (newlines) kept; over-long words split."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            while font.getlength(word) > max_width and len(word) > 1:
                # hard-split a word wider than the page
                cut = max(1, int(len(word) * max_width / font.getlength(word)))
                while cut > 1 and font.getlength(word[:cut]) > max_width:
                    cut -= 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def render_text(text: str, width: int = WIDTH, font_size: int = FONT_SIZE, margin: int = MARGIN,
                line_spacing: float = LINE_SPACING, max_height: int = MAX_HEIGHT) -> np.ndarray:
    """Word-wrapped text, black on white: RGB uint8 [H, width, 3]; H grows with the number of lines.

    ValueError for a text over :data:`MAX_CHARS` characters or one whose page would be taller than
    ``max_height`` pixels (blank lines count: 400 KB of newlines would ask for a 19 GB image)."""
    from PIL import Image, ImageDraw

    if not text or not text.strip():
        raise ValueError("no text to render")
    if len(text) > MAX_CHARS:
        raise ValueError(f"text is {len(text)} characters; at most {MAX_CHARS} are rendered")
    font = _font(font_size)
    lines = wrap_text(text, font, width - 2 * margin)
    step = int(round(font_size * line_spacing))
    height = 2 * margin + step * max(1, len(lines))
    if height > max_height:
        raise ValueError(f"text wraps to {len(lines)} lines, a page {height} px high; at most {max_height} px "
                         f"({(max_height - 2 * margin) // step} lines at font size {font_size})")
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * step), line, font=font, fill="black")
    return np.asarray(im)


def render_wordcloud(text: str, width: int = WIDTH, height: int = CLOUD_HEIGHT,
                     max_words: int = CLOUD_MAX_WORDS, random_state: int = RANDOM_STATE) -> np.ndarray:
    """Word cloud of ``text`` (word size ~ frequency; common English stop words dropped): RGB uint8 [height, width, 3]."""
    from wordcloud import STOPWORDS, WordCloud

    if not text or not text.strip():
        raise ValueError("no text to render")
    wc = WordCloud(width=width, height=height, font_path=font_path(), background_color="white",
                   max_words=max_words, random_state=random_state, collocations=False,
                   stopwords=set(STOPWORDS), prefer_horizontal=0.9)
    try:
        wc.generate(text)
    except ValueError:
        # only stop words / punctuation: fall back to every token as it is
        wc = WordCloud(width=width, height=height, font_path=font_path(), background_color="white",
                       max_words=max_words, random_state=random_state, collocations=False,
                       stopwords=set(), regexp=r"\S+", min_word_length=0)
        wc.generate(text)
    return np.asarray(wc.to_array(), dtype=np.uint8)


def text_to_image(text: str, style: str = "plain", **kwargs) -> np.ndarray:
    """Render ``text`` in ``style`` (``plain`` or ``wordcloud``): RGB uint8."""
    if style == "plain":
        return render_text(text, **kwargs)
    if style == "wordcloud":
        return render_wordcloud(text, **kwargs)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
