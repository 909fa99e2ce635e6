"""report.html of `mmbatch duplicates`: one self-contained page (base64 PNGs), so a person can
judge the top pairs by eye: image thumbnails side by side, audio log-mel spectrograms."""
from __future__ import annotations

import base64
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbatch.engine import storage

TOP = 12
THUMB_PX = 112


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


def _curve_png(m: str, c: dict) -> str:
    """A precision/recall curve (``c``: precision, recall, thresholds lists, threshold, corpus)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.0))
    ax.plot(c["recall"], c["precision"], lw=1.5)
    t = np.asarray(c["thresholds"])
    k = int(np.argmin(np.abs(t - c["threshold"]))) if len(t) else None
    if k is not None:
        ax.plot([c["recall"][k]], [c["precision"][k]], "o", color="crimson",
                label=f"default threshold {c['threshold']:.3f}")
        ax.legend(loc="lower left", fontsize=7)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{m} ({c.get('corpus', '')})", fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return _b64(buf.getvalue())


def render_report(pairs: pa.Table, summary: dict, shards, curves: dict | None = None) -> str:
    """The page; ``curves`` (modality -> precision/recall curve of scored candidates against a known
    truth, as benchmarks/duplicates.py makes for its held-out corpus) adds the curves with the
    default threshold marked."""
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
    if curves:
        parts.append("<h2>Precision and recall against the threshold</h2><p>"
                     + "".join(f"<img src='{_curve_png(m, c)}'/>" for m, c in curves.items()) + "</p>")
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
