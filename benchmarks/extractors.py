"""Per-sample CPU cost of the default feature extractors, per modality.

    python -m benchmarks.extractors [--small N] [--large N] [--repeats R]

Builds two in-memory corpora of encoded bytes, then times each default
extractor (``FeaturesConfig()``: ``hog_color`` 64 px, ``logmel_stats``,
``hashing``) on them in this one process, warm (one batch first, untimed), in
batches of 64, with ``time.process_time`` (CPU seconds of this process; one
BLAS/OpenCV thread, as in a worker):

- SMALL: 28x28 PNG + 1 s 16 kHz FLAC + 5-9 word text (the AV-MNIST shape);
- LARGE: 500x375 JPEG q92 + 10-15 s 16 kHz FLAC + 20-39 word text
  (``benchmarks.run.make_corpus``'s items).

Prints ms per sample for decode, encode and their sum (``extract``) per
modality; the best of ``--repeats`` passes over the corpus.
"""
from __future__ import annotations

import argparse
import os
import time

from mmbatch.engine.runtime import THREAD_ENV

# One BLAS thread, as in a worker (mmbatch.engine.runtime.init_ray sets these for Ray's workers
# before they import numpy). Set before numpy loads: OpenBLAS reads them once, and a
# two-thread sgemm on these small matrices costs CPU time, not only wall time.
for _k, _v in THREAD_ENV.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402

BATCH = 64


def small_items(n: int, seed: int = 0) -> dict[str, list]:
    import cv2

    from mmbatch.demo.corpus import bits, encode_flac, make_audio, make_image, make_sentence

    rng = np.random.default_rng(seed)
    images, audios, texts = [], [], []
    for i in range(n):
        a, b, t = bits(i % 4)
        ok, png = cv2.imencode(".png", make_image(i % 4, rng, width=28, height=28))
        images.append(png.tobytes())
        audios.append(encode_flac(make_audio(b, rng, seconds=1.0)))
        texts.append(" ".join(make_sentence(t, rng)))
    return {"image": images, "audio": audios, "text": texts}


def large_items(n: int, seed: int = 0) -> dict[str, list]:
    """The items of ``benchmarks.run.make_corpus`` (same generator), kept in memory."""
    import cv2

    from mmbatch.demo.corpus import bits, encode_flac, make_audio, make_sentence

    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 255, size=(375, 500, 3), dtype=np.uint8), (0, 0), 3)
    images, audios, texts = [], [], []
    for i in range(n):
        a, b, t = bits(i % 4)
        img = np.roll(base, int(rng.integers(0, 500)), axis=1).copy()
        img = cv2.add(img, rng.integers(0, 60, size=img.shape, dtype=np.uint8))
        img[..., 2 if a == 0 else 0] = cv2.add(img[..., 2 if a == 0 else 0], 60)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append(jpg.tobytes())
        audios.append(encode_flac(make_audio(b, rng, seconds=float(rng.uniform(10, 15)))))
        texts.append(" ".join(make_sentence(t, rng, n_words=int(rng.integers(20, 40)))))
    return {"image": images, "audio": audios, "text": texts}


def time_extractor(ex, items: list, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` CPU ms per sample for decode, encode and both."""
    ex.extract(items[:BATCH])                      # warm: caches, lazy imports, filterbanks
    best = {"decode": float("inf"), "encode": float("inf")}
    for _ in range(repeats):
        spent = {"decode": 0.0, "encode": 0.0}
        for i in range(0, len(items), BATCH):
            batch = items[i:i + BATCH]
            t0 = time.process_time()
            dec = ex.decode(batch)
            t1 = time.process_time()
            ex.encode([v for v, e in zip(dec.values, dec.errors) if e is None])
            t2 = time.process_time()
            spent["decode"] += t1 - t0
            spent["encode"] += t2 - t1
        for k in best:
            best[k] = min(best[k], spent[k] * 1000.0 / len(items))
    best["extract"] = best["decode"] + best["encode"]
    return best


def measure(corpora: dict[str, dict[str, list]], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    from mmbatch.config import FeaturesConfig
    from mmbatch.preprocess.features.registry import build_extractor
    from mmbatch.engine.runtime import pin_threads

    pin_threads()
    cfg = FeaturesConfig()
    extractors = {m: build_extractor(m, getattr(cfg, m)) for m in ("image", "audio", "text")}
    return {shape: {m: time_extractor(extractors[m], items[m], repeats) for m in extractors}
            for shape, items in corpora.items()}


def render(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'shape':<6} {'modality':<8} {'decode ms':>10} {'encode ms':>10} {'extract ms':>11}"]
    for shape, per_mod in results.items():
        total = 0.0
        for m, r in per_mod.items():
            lines.append(f"{shape:<6} {m:<8} {r['decode']:>10.3f} {r['encode']:>10.3f} {r['extract']:>11.3f}")
            total += r["extract"]
        lines.append(f"{shape:<6} {'all':<8} {'':>10} {'':>10} {total:>11.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=512, help="SMALL samples (default 512)")
    ap.add_argument("--large", type=int, default=128, help="LARGE samples (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="passes; the best is reported (default 3)")
    args = ap.parse_args(argv)
    corpora = {"SMALL": small_items(args.small), "LARGE": large_items(args.large)}
    print(f"CPU ms per sample (time.process_time, one process, warm, batches of {BATCH}, "
          f"best of {args.repeats}; SMALL n={args.small}, LARGE n={args.large})")
    print(render(measure(corpora, args.repeats)))


if __name__ == "__main__":
    main()
