"""report.html of `mmbatch audit`: one self-contained page, ranked by score, so a person can confirm the
flagged rows in minutes: each row's labels and per-view predictions next to its image thumbnail, an
audio player and log-mel spectrogram, and its text. Media are looked up by sample_id in the canonical
datasets of the workflow (``datasets:``); a row whose media are not found there shows its scores only."""
from __future__ import annotations

import base64
import html

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbatch.dedup.report import _spectrogram, _thumb
from mmbatch.engine.manifest import data_files

TOP = 60
TEXT_CHARS = 300
MEDIA_COLUMNS = ("image", "audio", "text")


def find_media(datasets, ids: list[str]) -> dict[str, dict]:
    """sample_id -> {image: bytes, audio: bytes, text: str} from the canonical datasets (first hit)."""
    found: dict[str, dict] = {}
    want = pa.array(sorted(set(ids)), pa.string())
    for d in datasets:
        try:
            fs, files, _ = data_files(d.path, allow_incomplete=True)
        except Exception:         # a dataset that is gone or unreadable: the report shows scores only
            continue
        for f in files:
            names = pq.read_schema(f, filesystem=fs).names
            cols = ["sample_id"] + [c for c in MEDIA_COLUMNS if c in names]
            t = pq.read_table(f, filesystem=fs, columns=cols, filters=pc.is_in(pc.field("sample_id"), want))
            for r in t.to_pylist():
                rec = found.setdefault(r["sample_id"], {})
                for c in MEDIA_COLUMNS:
                    v = r.get(c)
                    if isinstance(v, dict):
                        v = v.get("bytes")
                    if v and c not in rec:
                        rec[c] = v
    return found


def _media_cell(media: dict) -> str:
    out = []
    for kind, render in (("image", _thumb), ("audio", _spectrogram)):
        if kind in media:
            try:
                out.append(f"<img src='{render(media[kind])}'/>")
            except Exception:     # undecodable media: named, not drawn
                out.append(f"<i>{kind}: not decodable</i>")
    if "audio" in media:
        out.append("<audio controls preload='none' src='data:audio/flac;base64,"
                   f"{base64.b64encode(media['audio']).decode()}'></audio>")
    if "text" in media:
        text = str(media["text"])
        out.append(html.escape(text[:TEXT_CHARS] + ("..." if len(text) > TEXT_CHARS else "")))
    return "<br>".join(out) or "<i>media not found in the workflow's datasets</i>"


def _views_cell(r: dict, views: list[str]) -> str:
    return "<br>".join(f"{html.escape(v)}: {html.escape(str(r.get(f'{v}_top')))} ({r[f'{v}_prob']:.2f})"
                       for v in views if r.get(f"{v}_prob") is not None)


def render_report(issues: pa.Table, summary: dict, wf) -> str:
    views = list(summary["views"])
    rows = issues.slice(0, TOP).to_pylist()
    media = find_media(wf.datasets, [r["sample_id"] for r in rows]) if rows else {}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mmbatch audit</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}</style></head><body>",
             f"<h1>Audit of {html.escape(str(summary['data']))}</h1>",
             "<p>Out-of-fold accuracy per view: " + ", ".join(
                 f"{html.escape(v)} {a['accuracy']:.3f} ({a['rows']} rows)" for v, a in summary["views"].items()
                 if a["accuracy"] is not None) + "</p>",
             "<table><tr><th>kind</th>" + "".join(f"<th>{html.escape(s)}</th>" for s in summary["rows"])
             + "</tr>"]
    for k, c in summary["counts"].items():
        parts.append(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{c.get(s, 0)}</td>" for s in summary["rows"])
                     + "</tr>")
    parts.append(f"</table><h2>Flagged rows, highest score first (top {min(TOP, issues.num_rows)} of "
                 f"{issues.num_rows})</h2><table><tr><th>#</th><th>sample</th><th>kind</th><th>score</th>"
                 "<th>given</th><th>suggested</th><th>views</th><th>media</th></tr>")
    for i, r in enumerate(rows, 1):
        parts.append(f"<tr><td>{i}</td><td>{html.escape(r['sample_id'])}<br>({html.escape(str(r['split']))})</td>"
                     f"<td>{html.escape(r['kind'])}</td><td>{r['score']:.3f}</td>"
                     f"<td>{html.escape(str(r['given_label']))}</td>"
                     f"<td>{html.escape(str(r['suggested_label'] or ''))}</td><td>{_views_cell(r, views)}</td>"
                     f"<td>{_media_cell(media.get(r['sample_id'], {}))}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)

