"""Detection and localisation metrics: image/pixel AUROC, AUPRO (MVTec AD) and the F1-optimal threshold.

Scores follow the package's convention: higher = more anomalous; labels and masks are 1/True for
anomalous images or pixels.
"""

import numpy as np
from numba import njit

from npanomaly.kernels._config import JIT_OPTIONS

__all__ = ["auroc", "aupro", "f1_max", "pixel_auroc", "roc_curve"]


def _check_scores_labels(scores, labels, scores_name="scores", labels_name="labels"):
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biuf":
        raise TypeError(f"{labels_name} must be booleans or 0/1 numbers, got dtype {labels.dtype}")
    labels = labels.ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores_name} and {labels_name} must have the same number of elements, got "
                         f"{scores.size} and {labels.size}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{scores_name} contains NaN or infinite values")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"{labels_name} must contain only 0/1 (or False/True)")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError(f"{labels_name} must contain both classes (normal and anomalous), got only "
                         f"{'anomalous' if labels.any() else 'normal'}")
    return scores, labels


def auroc(scores, labels):
    """Area under the ROC curve = P(score of a random anomalous > score of a random normal).

    Ties count one half, exactly as the Mann-Whitney U statistic: computed from average ranks, so
    the value does not depend on the order of tied samples.
    """
    scores, labels = _check_scores_labels(scores, labels)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank of each run of equal scores (1-based)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    run_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_rank, ends - starts)
    n_pos = int(labels.sum())
    n_neg = scores.size - n_pos
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pixel_auroc(maps, masks):
    """AUROC over all pixels of all images: maps [N, H, W] scores, masks [N, H, W] ground truth."""
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if maps.shape != masks.shape:
        raise ValueError(f"maps and masks must have the same shape, got {maps.shape} and {masks.shape}")
    return auroc(maps, masks)


def roc_curve(scores, labels):
    """(false positive rates, true positive rates, thresholds) at every distinct score, descending."""
    scores, labels = _check_scores_labels(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_run = np.concatenate([np.flatnonzero(np.diff(scores)), [scores.size - 1]])
    tps = np.cumsum(labels)[last_of_run]
    fps = (last_of_run + 1) - tps
    tpr = np.concatenate([[0.0], tps / labels.sum()])
    fpr = np.concatenate([[0.0], fps / (~labels).sum()])
    return fpr, tpr, np.concatenate([[np.inf], scores[last_of_run]])


def f1_max(scores, labels):
    """(best F1 score, the threshold reaching it): predict anomalous when score >= threshold."""
    scores, labels = _check_scores_labels(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_run = np.concatenate([np.flatnonzero(np.diff(scores)), [scores.size - 1]])
    tps = np.cumsum(labels)[last_of_run].astype(np.float64)
    predicted = last_of_run + 1.0
    precision = tps / predicted
    recall = tps / labels.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tps > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(scores[last_of_run[best]])


@njit(**JIT_OPTIONS)
def _label_components(mask):
    """8-connected components of a 2-D boolean mask by flood fill: labels 1..K, 0 for background."""
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int64)
    stack = np.empty(height * width, dtype=np.int64)
    count = 0
    for start in range(height * width):
        if not mask.flat[start] or labels.flat[start]:
            continue
        count += 1
        labels.flat[start] = count
        stack[0] = start
        top = 1
        while top > 0:
            top -= 1
            y, x = divmod(stack[top], width)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and labels[ny, nx] == 0:
                        labels[ny, nx] = count
                        stack[top] = ny * width + nx
                        top += 1
    return labels, count


def connected_components(mask):
    """(labels [H, W] int64, count) of the 8-connected regions of a boolean mask (MVTec's definition)."""
    mask = np.ascontiguousarray(np.asarray(mask, dtype=bool))
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return _label_components(mask)


def aupro(maps, masks, fpr_limit=0.3):
    """Area under the per-region-overlap curve up to a false positive rate, normalised to [0, 1].

    MVTec AD's localisation metric (Bergmann et al. 2021): each 8-connected defect region of the
    ground truth counts equally, whatever its size. For a threshold t, PRO(t) is the mean over all
    regions of the fraction of the region's pixels with score >= t, and FPR(t) the fraction of normal
    pixels (all images) with score >= t. The PRO-FPR curve is integrated for FPR in [0, fpr_limit]
    (interpolated at the limit) and divided by fpr_limit, so a perfect map scores 1 and no value
    exceeds 1.

    maps: [N, H, W] scores; masks: [N, H, W] booleans with at least one defect and one normal pixel.
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must both be [N, H, W] of the same shape, got {maps.shape} and "
                         f"{masks.shape}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, truth = _check_scores_labels(maps, masks, "maps", "masks")
    # Each defect pixel carries 1 / (size of its region); regions are numbered across images.
    weight = np.zeros(scores.size, dtype=np.float64)
    offset = 0
    n_regions = 0
    per_image = maps.shape[1] * maps.shape[2]
    for i, mask in enumerate(truth.reshape(maps.shape)):
        labels, count = connected_components(mask)
        if count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            region_weight = np.concatenate([[0.0], 1.0 / sizes[1:]])
            weight[offset:offset + per_image] = region_weight[labels.ravel()]
        offset += per_image
        n_regions += count
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    last_of_run = np.concatenate([np.flatnonzero(np.diff(sorted_scores)), [scores.size - 1]])
    pro = np.concatenate([[0.0], np.cumsum(weight[order])[last_of_run] / n_regions])
    fpr = np.concatenate([[0.0], np.cumsum(~truth[order])[last_of_run] / (~truth).sum()])
    pro = np.minimum(pro, 1.0)  # guards the last ulp of the cumulative sum
    inside = fpr <= fpr_limit
    x = fpr[inside]
    y = pro[inside]
    if x[-1] < fpr_limit:
        after = np.searchsorted(fpr, fpr_limit)
        x0, x1, y0, y1 = fpr[after - 1], fpr[after], pro[after - 1], pro[after]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    area = np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0)
    return float(min(area / fpr_limit, 1.0))
