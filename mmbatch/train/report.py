"""Training / evaluation report: metrics.json, PNG plots and one self-contained HTML page.

Input is a plain summary dict (see ``run.make_summary`` / ``evaluate.evaluate_cli``):
``metrics`` (test split), optional ``history`` (per-epoch records), ``baselines``
(modality -> metrics), ``data`` (split sizes, class balance), ``model``.
Plots use matplotlib's Agg backend; the HTML embeds them as base64, so the page
can be mailed or attached to a CI run on its own.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Mapping

from mmbatch.engine import storage
from mmbatch.plots import no_tex, plain

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


# --- plots --------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


@no_tex
def plot_curves(history: list[dict]) -> dict[str, bytes]:
    """loss.png (train/val loss per epoch) and val_metric.png (val accuracy / macro-F1 per epoch)."""
    if not history:
        return {}
    plt = _plt()
    ep = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.plot(ep, [h["val_loss"] for h in history], "s--", label="validation loss")
    restarts = [h["epoch"] + 1 for i, h in enumerate(history) if i and h.get("attempt") != history[i - 1].get("attempt")]
    for r in restarts:
        ax.axvline(r - 0.5, color="grey", lw=1, ls=":")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title("loss" + (" (dotted: restart from checkpoint)" if restarts else ""))
    out = {"loss.png": _png(fig)}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ep, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    ax.plot(ep, [h["val_macro_f1"] for h in history], "s--", label="val macro-F1")
    ax.set_ylim(0, 1.02), ax.set_xlabel("epoch"), ax.legend(), ax.grid(alpha=0.3), ax.set_title("validation")
    out["val_metric.png"] = _png(fig)
    return out


@no_tex
def plot_confusion(metrics: Mapping) -> dict[str, bytes]:
    conf, classes = metrics.get("confusion"), metrics.get("classes")
    if not conf or not classes:
        return {}
    plt = _plt()
    k = len(classes)
    size = min(12, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(k)), ax.set_yticks(range(k))
    labels = [plain(c) for c in classes]            # class names are data, not mathtext
    ax.set_xticklabels(labels, rotation=45, ha="right"), ax.set_yticklabels(labels)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title("confusion matrix (test)")
    if k <= 20:
        top = max(max(r) for r in conf) or 1
        for i in range(k):
            for j in range(k):
                ax.text(j, i, conf[i][j], ha="center", va="center",
                        color="white" if conf[i][j] > top / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return {"confusion.png": _png(fig)}


@no_tex
def plot_bars(title: str, values: Mapping[str, float], fname: str, ylabel: str) -> dict[str, bytes]:
    if not values:
        return {}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([plain(k) for k in values], list(values.values()), color="tab:blue")
    ax.set_ylabel(plain(ylabel)), ax.set_title(plain(title)), ax.grid(axis="y", alpha=0.3)
    return {fname: _png(fig)}


# --- text ---------------------------------------------------------------------------------------
def _f(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.4f}")
    return str(x)


def fusion_gain(summary: Mapping) -> dict | None:
    """The fused model's test accuracy against the best unimodal baseline (None without baselines):
    ``gain`` (fused - best, accuracy points / 100), ``fusion_wins`` and a ``warning`` when the
    fused model does not beat the best baseline or the test split is too small to tell."""
    base = {m: b.get("accuracy") for m, b in (summary.get("baselines") or {}).items()}
    base = {m: a for m, a in base.items() if isinstance(a, (int, float)) and not math.isnan(a)}
    m = summary.get("metrics") or {}
    fused = m.get("accuracy")
    if not base or not isinstance(fused, (int, float)):
        return None
    best = max(base, key=base.get)
    fusion = ((summary.get("model") or {}).get("arch") or {}).get("fusion", "fused")
    out = {"best_baseline": best, "best_baseline_accuracy": base[best], "fused_accuracy": fused,
           "gain": fused - base[best], "fusion_wins": fused > base[best], "warning": None}
    if m.get("unscorable"):
        out.update(gain=None, fusion_wins=None,
                   warning=f"{m['unscorable']}; the comparison with the unimodal baselines is not made")
    elif fused <= base[best]:
        out["warning"] = (f"the fused model ({fusion}, test accuracy {fused:.4f}) does not beat the best single "
                          f"modality ({best} only, {base[best]:.4f}): fusion adds nothing here. Use the "
                          f"{best}-only model, or try another train.model / more data")
    return out


def comparison_rows(summary: Mapping) -> list[tuple[str, str, str, str]]:
    """(model, accuracy, macro-F1, loss) for the fused model and each baseline."""
    m = summary.get("metrics") or {}
    fusion = ((summary.get("model") or {}).get("arch") or {}).get("fusion", "fused")
    rows = [(f"fused ({fusion})", _f(m.get("accuracy")), _f(m.get("macro_f1")), _f(m.get("loss")))]
    for mod, bm in (summary.get("baselines") or {}).items():
        rows.append((f"{mod} only", _f(bm.get("accuracy")), _f(bm.get("macro_f1")), _f(bm.get("loss"))))
    return rows


def summary_table(summary: Mapping) -> str:
    """Plain-text summary printed at the end of a run."""
    rows = [("model", "accuracy", "macro-F1", "loss")] + comparison_rows(summary)
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    out = [summary.get("title", "mmbatch"), line(rows[0]), "  ".join("-" * x for x in w)]
    out += [line(r) for r in rows[1:]]
    g = summary.get("gain")
    if g and g.get("gain") is not None:
        out.append(f"gain over the best unimodal model ({g['best_baseline']} only): {100 * g['gain']:+.2f} accuracy points")
    if g and g.get("warning"):
        out.append(f"WARNING: {g['warning']}")
    for split, why in (summary.get("unscorable_splits") or {}).items():
        out.append(f"WARNING: the {split} split has {why}: its scores mean nothing")
    if summary.get("leakage"):
        from mmbatch.dedup.leakage import leakage_line
        out.append(leakage_line(summary["leakage"]))
    cb = (summary.get("data") or {}).get("class_balance") or (summary.get("metrics") or {}).get("class_balance")
    if cb:
        out.append(f"class balance (max/min rows per class): {_f(cb.get('max_min_ratio'))}")
    mw = (summary.get("metrics") or {}).get("modality_weights")
    if mw:
        out.append("modality weights: " + ", ".join(f"{k}={v:.3f}" for k, v in mw.items()))
    where = (summary.get("placement") or {}).get("where")
    if where:
        out.append(f"ranks: {where}")
    starts = summary.get("starts") or []
    if len(starts) > 1 or any(starts):
        out.append(f"resumed from checkpoint at epoch(s): {[s + 1 for s in starts if s > 0]}")
    return "\n".join(out)


def _table(header: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(_f(c) if not isinstance(c, str) else c)}</td>" for c in r)
                  + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


# what each plot shows (its caption and alt text)
CAPTIONS = {
    "loss.png": "Training and validation loss per epoch",
    "val_metric.png": "Validation accuracy and macro-F1 per epoch",
    "confusion.png": "Confusion matrix on the test split (rows: true class, columns: predicted class)",
    "baselines.png": "Test accuracy of the fused model and of each modality alone",
    "modality_weights.png": "Learned weight of each modality",
}
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "loss": "loss"}
Z95 = 1.959964                     # two-sided 95 % normal quantile
SMALL_SAMPLE_HALF_WIDTH = 0.05     # a test accuracy less certain than +-5 points gets the caveat as a warning


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy measured on ``n`` rows (a binomial proportion)."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_uncertainty(metrics: Mapping) -> str | None:
    """"test split of N rows: ±X accuracy at 95 % (a to b)", or None without an accuracy."""
    n, acc = metrics.get("n"), metrics.get("accuracy")
    if not n or not isinstance(acc, (int, float)) or math.isnan(acc):
        return None
    lo, hi = wilson_interval(float(acc), int(n))
    return f"test split of {int(n)} rows: \u00b1{(hi - lo) / 2:.2f} accuracy at 95 % ({lo:.2f} to {hi:.2f})"


def describe_model(arch: Mapping | None) -> str:
    """``arch`` in words: fusion, inputs and their sizes, layers, classes."""
    if not arch:
        return "-"
    inputs = ", ".join(f"{m} ({d} features)" for m, d in (arch.get("dims") or {}).items())
    learned = ", ".join(f"{m}: {e.get('kind')}" for m, e in (arch.get("encoders") or {}).items())
    return (f"{arch.get('fusion')} fusion of {inputs}; hidden size {arch.get('hidden')}, dropout "
            f"{arch.get('dropout')}, {arch.get('num_classes')} classes"
            + (f"; learned encoders: {learned}" if learned else ""))


def best_epoch_rule(summary: Mapping) -> str:
    """The best epoch and the rule that picked it."""
    if summary.get("best_epoch") is None:
        return "-"
    metric = METRIC_NAMES.get(summary.get("selection_metric") or "", "the validation metric")
    better = "lowest" if summary.get("selection_metric") == "loss" else "highest"
    return (f"{summary['best_epoch'] + 1} of {len(summary.get('history') or []) or '?'}: the {better} validation "
            f"{metric} (ties: the lower validation loss); the saved model is that epoch's")


def _facts(rows: list[tuple[str, str]]) -> str:
    """A two-column table of named facts, no header row."""
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + \
        "</table>"


def _figure(name: str, blob: bytes) -> str:
    caption = html.escape(CAPTIONS.get(name, name))
    b64 = base64.b64encode(blob).decode()
    return f'<figure><img alt="{caption}" src="data:image/png;base64,{b64}"/><figcaption>{caption}</figcaption></figure>'


def render_html(summary: Mapping, images: Mapping[str, bytes]) -> str:
    m = summary.get("metrics") or {}
    parts = [f"<h1>{html.escape(summary.get('title', 'mmbatch report'))}</h1>"]
    parts.append(_facts([("run", str(summary.get("run_dir") or summary.get("checkpoint") or "-")),
                         ("status", str(summary.get("status") or "-")),
                         ("model", describe_model((summary.get("model") or {}).get("arch"))),
                         ("best epoch", best_epoch_rule(summary)),
                         ("test rows", _f(m.get("n")))]))
    caveat = accuracy_uncertainty(m)
    if caveat:
        lo, hi = wilson_interval(float(m["accuracy"]), int(m["n"]))
        if (hi - lo) / 2 >= SMALL_SAMPLE_HALF_WIDTH:
            parts.append(f'<p class="warning">Small test split: {html.escape(caveat)}; accuracy differences '
                         'smaller than that are noise</p>')
        else:
            parts.append(f"<p>{html.escape(caveat)}</p>")
    parts.append("<h2>Fused model vs unimodal baselines (test split)</h2>")
    parts.append(_table(["model", "accuracy", "macro-F1", "loss"], [list(r) for r in comparison_rows(summary)]))
    g = summary.get("gain")
    if g and g.get("gain") is not None:
        parts.append(f"<p>Gain over the best unimodal model ({html.escape(g['best_baseline'])} only): "
                     f"<b>{100 * g['gain']:+.2f}</b> accuracy points</p>")
    warnings = ([g["warning"]] if g and g.get("warning") else []) + \
        [f"the {s} split has {w}: its scores mean nothing" for s, w in (summary.get("unscorable_splits") or {}).items()]
    for w in warnings:
        parts.append(f'<p class="warning">Warning: {html.escape(w)}</p>')
    if summary.get("leakage"):
        from mmbatch.dedup.leakage import leakage_line
        parts.append(f"<h2>Duplicates of train rows</h2><p>{html.escape(leakage_line(summary['leakage']))}</p>")
    if m.get("modality_weights"):
        parts.append("<h2>Learned modality weights</h2>")
        parts.append(_table(["modality", "weight"], [[k, v] for k, v in m["modality_weights"].items()]))
    if m.get("per_class"):
        parts.append("<h2>Per-class precision / recall (test)</h2>")
        parts.append(_table(["class", "precision", "recall", "F1", "support"],
                            [[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in m["per_class"].items()]))
    data = summary.get("data") or {}
    cb = data.get("class_balance") or m.get("class_balance")
    if cb:
        parts.append("<h2>Class balance</h2>")
        if data.get("counts"):
            splits = [s for s in data["counts"] if sum(data["counts"][s].values())]
            classes = list(cb["counts"])
            parts.append(_table(["class"] + splits, [[c] + [data["counts"][s].get(c, 0) for s in splits] for c in classes]))
        parts.append(f"<p>max/min rows per class (train): {_f(cb.get('max_min_ratio'))}</p>")
    parts += [_figure(name, blob) for name, blob in images.items()]
    if summary.get("history"):
        parts.append("<h2>Epochs</h2>")
        hist = summary["history"]
        parts.append(_table(["epoch", "train loss", "val loss", "val acc", "val macro-F1", "lr", "time (s)", "attempt"],
                            [[h["epoch"] + 1, h["train_loss"], h["val_loss"], h["val_accuracy"], h["val_macro_f1"],
                              h.get("lr"), h.get("epoch_time_s"), h.get("attempt")] for h in hist]))
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}figure{display:inline-block;margin:.5em}"
             ".warning{background:#fde2e1;border:1px solid #c0392b;padding:.5em;font-weight:bold}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(summary.get('title', ''))}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


# --- everything at once ---------------------------------------------------------------------------
def write_report(out_dir: str, summary: Mapping) -> str:
    """metrics.json + PNGs + report.html under ``out_dir`` (local or URI). Returns the HTML path."""
    m = summary.get("metrics") or {}
    images: dict[str, bytes] = {}
    images.update(plot_curves(summary.get("history") or []))
    images.update(plot_confusion(m))
    if summary.get("baselines"):
        acc = {"fused": m.get("accuracy", 0.0)}
        acc.update({f"{k} only": v.get("accuracy", 0.0) for k, v in summary["baselines"].items()})
        images.update(plot_bars("test accuracy: fused vs unimodal", acc, "baselines.png", "accuracy"))
    if m.get("modality_weights"):
        images.update(plot_bars("learned modality weights", m["modality_weights"], "modality_weights.png", "weight"))
    fs, path = storage.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    storage.write_json(fs, storage.join(path, METRICS_FILE), storage.jsonable(summary))   # strict JSON: inf/nan as strings
    for name, blob in images.items():
        storage.atomic_write_bytes(fs, storage.join(path, name), blob)
    storage.atomic_write_bytes(fs, storage.join(path, REPORT_FILE), render_html(summary, images).encode())
    storage.clean_tmp(fs, path)
    return storage.join(out_dir.rstrip("/"), REPORT_FILE)


__all__ = ["write_report", "summary_table", "render_html", "fusion_gain", "wilson_interval", "accuracy_uncertainty"]
