"""A self-contained HTML report: metrics, ROC curve, score histogram and per-image heatmaps.

Everything is inline (PNG images as data: URIs, charts as SVG), so the one file opens offline.
"""

import base64
import html

import numpy as np

from npanomaly._files import atomic_write
from npanomaly.data import to_rgb_hwc, to_uint8
from npanomaly.metrics import roc_curve
from npanomaly.png import encode_png

# Anchor colours of a perceptually ordered map (dark blue -> cyan -> yellow -> red).
_ANCHORS = np.array([[0.05, 0.03, 0.35], [0.0, 0.45, 0.85], [0.1, 0.8, 0.8], [0.95, 0.9, 0.2], [0.85, 0.1, 0.05]])


def colormap(values):
    """Map [0, 1] values [H, W] to RGB float [H, W, 3] by piecewise-linear interpolation of the anchors."""
    position = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac


def heatmap_overlay(image, heatmap, low, high, alpha=0.5):
    """uint8 [H, W, 3]: the image [C, H, W] in [0, 1] blended with the coloured heatmap scaled to [low, high]."""
    normalised = (heatmap - low) / max(high - low, 1e-12)
    blended = (1 - alpha) * to_rgb_hwc(image) + alpha * colormap(normalised)
    return np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8)


def _image_uri(pixels):
    return "data:image/png;base64," + base64.b64encode(encode_png(pixels)).decode("ascii")


def _roc_svg(scores, labels, size=260):
    fpr, tpr, _ = roc_curve(scores, labels)
    points = " ".join(f"{20 + x * (size - 30):.1f},{size - 20 - y * (size - 30):.1f}" for x, y in zip(fpr, tpr))
    return (f'<svg width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">'
            f'<rect x="20" y="10" width="{size - 30}" height="{size - 30}" fill="none" stroke="#999"/>'
            f'<line x1="20" y1="{size - 20}" x2="{size - 10}" y2="10" stroke="#ccc" stroke-dasharray="4"/>'
            f'<polyline points="{points}" fill="none" stroke="#c0392b" stroke-width="2"/>'
            f'<text x="{size / 2}" y="{size - 4}" font-size="11" text-anchor="middle">false positive rate</text>'
            f'<text x="10" y="{size / 2}" font-size="11" transform="rotate(-90 10 {size / 2})" '
            f'text-anchor="middle">true positive rate</text></svg>')


def _histogram_svg(scores, labels, threshold, width=420, height=260, bins=20):
    low, high = float(np.min(scores)), float(np.max(scores))
    if threshold is not None and np.isfinite(threshold):
        low, high = min(low, threshold), max(high, threshold)
    edges = np.linspace(low, high if high > low else low + 1, bins + 1)
    normal, _ = np.histogram(scores[~labels], edges)
    anomalous, _ = np.histogram(scores[labels], edges)
    top = max(normal.max(), anomalous.max(), 1)
    plot_w, plot_h = width - 40, height - 40
    bar = plot_w / bins
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for counts, colour, shift in ((normal, "#2e86c1", 0.0), (anomalous, "#c0392b", 0.5)):
        for i, count in enumerate(counts):
            h = plot_h * count / top
            parts.append(f'<rect x="{30 + i * bar + shift * bar:.1f}" y="{10 + plot_h - h:.1f}" '
                         f'width="{bar / 2:.1f}" height="{h:.1f}" fill="{colour}" opacity="0.8"/>')
    if threshold is not None and np.isfinite(threshold):
        x = 30 + plot_w * (threshold - edges[0]) / (edges[-1] - edges[0])
        parts.append(f'<line x1="{x:.1f}" y1="5" x2="{x:.1f}" y2="{10 + plot_h}" stroke="#000" stroke-dasharray="5"/>'
                     f'<text x="{x + 3:.1f}" y="15" font-size="11">threshold</text>')
    parts.append(f'<text x="30" y="{height - 8}" font-size="11">{edges[0]:.3g}</text>'
                 f'<text x="{width - 10}" y="{height - 8}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text>'
                 f'<text x="{width / 2}" y="{height - 8}" font-size="11" text-anchor="middle">score '
                 '(blue: normal, red: anomalous)</text></svg>')
    return "".join(parts)


def section(title, metrics, scores, labels, threshold, images, maps, masks=None, names=None, max_images=60):
    """HTML for one model on one data set."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{v:.4f}</td></tr>" if isinstance(v, float) else
                   f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in metrics.items())
    charts = ""
    if labels.any() and not labels.all():
        charts = f'<div class="charts">{_roc_svg(scores, labels)}{_histogram_svg(scores, labels, threshold)}</div>'
    low, high = float(np.min(maps)), float(np.max(maps))
    order = np.argsort(-scores)[:max_images]
    cards = []
    for i in order:
        name = html.escape(names[i]) if names is not None else f"image {i}"
        verdict = "anomalous" if labels[i] else "normal"
        cells = [f'<img src="{_image_uri(to_uint8(images[i]))}" title="image">',
                 f'<img src="{_image_uri(heatmap_overlay(images[i], maps[i], low, high))}" title="heatmap">']
        if masks is not None:
            cells.append(f'<img src="{_image_uri(masks[i].astype(np.uint8) * 255)}" title="ground truth">')
        cards.append(f'<figure>{"".join(cells)}<figcaption>{name}: score {scores[i]:.4f} ({verdict})'
                     f'</figcaption></figure>')
    return (f"<h2>{html.escape(title)}</h2><table>{rows}</table>{charts}"
            f"<p>Test images by descending score: image, heatmap overlay (shared colour scale), "
            f"ground-truth mask.</p><div class=\"grid\">{''.join(cards)}</div>")


GENERATOR = '<meta name="generator" content="npanomaly">'


def write_report(path, title, sections):
    """Write the sections (HTML strings from section()) into one self-contained file."""
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}.charts{display:flex;gap:2em}"
             ".grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figure img{width:96px;height:96px;"
             "image-rendering:pixelated;margin-right:2px}figcaption{font-size:11px}")
    document = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">{GENERATOR}<title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")
    return atomic_write(path, lambda stream: stream.write(document.encode("utf-8")))


def is_report(path):
    """True when path is a report that write_report wrote (it may be replaced without --force)."""
    try:
        with open(path, "rb") as stream:
            return GENERATOR.encode() in stream.read(512)
    except OSError:
        return False
