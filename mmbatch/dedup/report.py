"""report.html of `mmbatch duplicates`: one self-contained page (base64 PNGs), so a person can
judge the top pairs by eye: image thumbnails side by side, audio log-mel spectrograms; and, to
choose a threshold, the precision/recall curves measured on the held-out benchmark corpus
(heldout_curve.json, shipped in the package)."""
from __future__ import annotations

import base64
import html
import io
import json
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbatch.engine import storage
from mmbatch.plots import no_tex, plain

TOP = 12
THUMB_PX = 112
CURVE_FILE = "heldout_curve.json"
CURVE_CAPTION = "Measured on mmbatch's held-out benchmark corpus, not on your data"
# the x axis starts a little below the highest threshold with precision under CURVE_PRECISION_FLOOR,
# but no lower than CURVE_SPAN times the distance from the lower marked threshold to 1
CURVE_PRECISION_FLOOR = 0.95
CURVE_SPAN = 5


def _media(shards, dataset: str, sample_id: str, modality: str) -> bytes | None:
    for s in shards:
        if s.dataset != dataset:
            continue
        fs, _ = storage.url_to_fs(s.uri)
        t = pq.read_table(s.path, filesystem=fs, columns=["sample_id", modality],
                          filters=pc.equal(pc.field("sample_id"), sample_id))
        if t.num_rows:
            return t.column(modality)[0].as_py()["bytes"]
    return None


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _thumb(data: bytes) -> str:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    scale = THUMB_PX / max(h, w)
    img = cv2.resize(img, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
    return _b64(cv2.imencode(".png", img)[1].tobytes())


def _spectrogram(data: bytes) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmbatch.dedup.signatures import audio_logmel, decode_audio

    m = audio_logmel(*decode_audio(data))
    fig, ax = plt.subplots(figsize=(3.2, 1.4))
    ax.imshow(m, origin="lower", aspect="auto", cmap="magma")
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return _b64(buf.getvalue())


def _top(pairs: pa.Table, modality: str) -> list[dict]:
    """Cross-split pairs first (the leakage), near before exact (harder to judge), then by similarity."""
    rows = [r for r in pairs.to_pylist() if r["modality"] == modality]
    rows.sort(key=lambda r: (r["a_split"] == r["b_split"], r["kind"] == "exact", -r["similarity"]))
    return rows[:TOP]


def _cell(r: dict, side: str) -> str:
    return html.escape(f"{r[side + '_dataset']}/{r[side + '_sample_id']} ({r[side + '_split']})")


def _signals(r: dict) -> str:
    names = {"structure": "structure", "colour": "colour", "audio_corr": "correlation", "audio_lag_ms": "lag ms",
             "text_jaccard": "Jaccard"}
    return ", ".join(f"{v} {r[k]:.3f}" if k != "audio_lag_ms" else f"{v} {r[k]:.0f}"
                     for k, v in names.items() if r.get(k) is not None)


def heldout_curves() -> dict:
    """The package's heldout_curve.json: modality -> thresholds (descending), precision, recall of
    the verified candidate pairs of the held-out benchmark corpus at each threshold, and the
    threshold that run used (written by ``python -m benchmarks.duplicates --accuracy``)."""
    return json.loads(resources.files("mmbatch.dedup").joinpath(CURVE_FILE).read_text("utf-8"))["modalities"]


@no_tex
def _curve_png(m: str, c: dict, default: float, used: float) -> str:
    """Precision and recall against the threshold (``c``: thresholds, precision, recall lists), the
    default threshold marked, and ``used`` (this run's) when it differs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.8, 3.0))
    ax.plot(c["thresholds"], c["precision"], lw=1.5, label="precision")
    ax.plot(c["thresholds"], c["recall"], lw=1.5, label="recall")
    ax.axvline(default, color="crimson", ls="--", lw=1, label=f"default threshold {default:.3f}")
    if abs(used - default) > 1e-9:
        ax.axvline(used, color="black", ls=":", lw=1.2, label=f"this run {used:.3f}")
    low = [t for t, p in zip(c["thresholds"], c["precision"]) if p < CURVE_PRECISION_FLOOR]
    near = min(default, used)
    lo = min(near, max(max(low) if low else min(c["thresholds"], default=near), 1.0 - CURVE_SPAN * (1.0 - near)))
    ax.set_xlim(lo - 0.1 * (1.0 - lo), 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("threshold")
    ax.set_title(plain(f"{m}: {c.get('true_pairs', '?')} true of {c.get('candidates', '?')} candidate pairs"),
                 fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return _b64(buf.getvalue())


def curve_at(c: dict, threshold: float) -> tuple[float, float, float] | None:
    """(curve threshold, precision, recall) of ``c``'s point at the lowest of its thresholds at or
    above ``threshold`` (the same point when ``threshold`` is on its grid); None above them all."""
    up = [i for i, t in enumerate(c["thresholds"]) if t >= threshold - 1e-9]
    if not up:
        return None
    i = min(up, key=lambda k: c["thresholds"][k])
    return c["thresholds"][i], c["precision"][i], c["recall"][i]


def _curve_rows(m: str, c: dict, default: float, used: float) -> str:
    rows = ""
    for which, t in (("default", default), ("this run", used))[:1 if abs(used - default) <= 1e-9 else 2]:
        at = curve_at(c, t)
        got = "above the curve's thresholds" if at is None else (
            f"precision {at[1]:.3f}, recall {at[2]:.3f}" + (f" (at {at[0]:.3f})" if abs(at[0] - t) > 1e-9 else ""))
        rows += f"<tr><td>{html.escape(m)}</td><td>{which}</td><td>{t:.3f}</td><td>{got}</td></tr>"
    return rows


def _curves_section(curves: dict, used: dict) -> str:
    from mmbatch.dedup.signatures import THRESHOLDS

    mods = [m for m in curves if m in THRESHOLDS]
    imgs = "".join(f"<img alt='{html.escape(m)} precision and recall against the threshold' "
                   f"src='{_curve_png(m, curves[m], THRESHOLDS[m], used.get(m, THRESHOLDS[m]))}'/>" for m in mods)
    rows = "".join(_curve_rows(m, curves[m], THRESHOLDS[m], used.get(m, THRESHOLDS[m])) for m in mods)
    return ("<h2>Precision and recall against the threshold</h2><p>" + imgs + "</p><p><em>" + CURVE_CAPTION
            + ": precision and recall of the verified candidate pairs at each threshold, the default "
            "threshold dashed, this run's dotted where it differs.</em></p><table><tr><th>modality</th>"
            "<th>threshold</th><th>value</th><th>on the held-out corpus</th></tr>" + rows + "</table>")


def render_report(pairs: pa.Table, summary: dict, shards, curves: dict | None = None) -> str:
    """The page, with per modality the precision/recall curve of ``curves`` (modality -> thresholds,
    precision, recall; default: the held-out benchmark corpus's, :func:`heldout_curves`), the
    default threshold and this run's (``summary["thresholds"]``) marked."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mmbatch duplicates</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:middle}</style></head><body>",
             "<h1>Duplicates and leakage</h1>", "<table><tr><th>modality</th><th>rows</th><th>exact pairs</th>"
             "<th>near pairs</th><th>rows involved</th><th>test rows with a train duplicate</th>"
             "<th>validation rows with a train duplicate</th></tr>"]
    for m, s in summary["modalities"].items():
        parts.append(f"<tr><td>{html.escape(m)}</td><td>{s['rows']}</td><td>{s['exact']}</td><td>{s['near']}</td>"
                     f"<td>{s['rows_involved']}</td><td>{s['test_rows_with_train_duplicate']}</td>"
                     f"<td>{s['validation_rows_with_train_duplicate']}</td></tr>")
    parts.append("</table><p>Thresholds: " + html.escape(", ".join(
        f"{m} {t:.3f}" for m, t in summary.get("thresholds", {}).items())) + ". Each member of a group is paired "
        "with the group's first row (groups.parquet has every row's group).</p>")
    parts.append(_curves_section(heldout_curves() if curves is None else curves, summary.get("thresholds", {})))
    for m, render in (("image", _thumb), ("audio", _spectrogram)):
        top = _top(pairs, m)
        if not top:
            continue
        parts.append(f"<h2>Top {m} pairs</h2><table><tr><th>a</th><th>b</th><th>kind</th><th>similarity</th>"
                     "<th>signals</th></tr>")
        for r in top:
            cells = []
            for side in ("a", "b"):
                data = _media(shards, r[f"{side}_dataset"], r[f"{side}_sample_id"], m)
                img = f"<img src='{render(data)}'/><br>" if data else ""
                cells.append(f"<td>{img}{_cell(r, side)}</td>")
            parts.append(f"<tr>{''.join(cells)}<td>{html.escape(r['kind'])}</td><td>{r['similarity']:.3f}</td>"
                         f"<td>{html.escape(_signals(r))}</td></tr>")
        parts.append("</table>")
    top = _top(pairs, "text")
    if top:
        parts.append("<h2>Top text pairs</h2><table><tr><th>a</th><th>b</th><th>kind</th><th>similarity</th></tr>")
        for r in top:
            parts.append(f"<tr><td>{_cell(r, 'a')}</td><td>{_cell(r, 'b')}</td><td>{html.escape(r['kind'])}</td>"
                         f"<td>{r['similarity']:.3f}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
