"""2-D convolution (cross-correlation, as in torch.nn.Conv2d) lowered to BLAS matrix products.

Each image is unfolded into a column matrix (im2col) so that the convolution becomes one GEMM
per image: ``y[n] = W2 @ cols[n]`` with ``W2 = weight.reshape(O, C*kh*kw)``. The unfolding and its
adjoint (col2im) are Numba loops; the products go to NumPy's BLAS. Numba's own ``np.dot`` needs
SciPy at run time, which npanomaly does not depend on, so the GEMM is called from these thin
Python drivers instead of from inside ``@njit``.

Shapes used throughout:
    x        [N, C, H, W]        input
    weight   [O, C, kh, kw]      torch layout
    bias     [O] or None
    y        [N, O, Ho, Wo]      Ho = (H + 2*pad_h - kh) // stride_h + 1, likewise Wo
    cols     [B, C*kh*kw, Ho*Wo] unfolded chunk of B images; row r = (c*kh + i)*kw + j
"""

import numba
import numpy as np
from numba import njit, prange

from npanomaly import threads

from . import blas, memory
from ._config import (CONV_MIN_PRODUCT_COLUMNS, GRADIENT_SHARES, IM2COL_BUDGET_BYTES, JIT_OPTIONS, PARALLEL_JIT_OPTIONS,
                      SERIAL_REDUCTION_JIT_OPTIONS)
from .activation import clamp
from .blas import gemm


def conv2d_output_size(in_size, kernel, stride, pad):
    """Length of the output along one axis: (in + 2*pad - kernel) // stride + 1."""
    return (in_size + 2 * pad - kernel) // stride + 1


# Index with U(i) in the innermost loops. Numba wraps negative indices around (a[-1] is the last
# element), and that per-access test stops LLVM from vectorising the loop; these indices are
# non-negative by construction (_valid_outputs clips the ranges), and an unsigned integer says so.
# Measured: im2col 1.4-4x and the depthwise convolution 2x faster.
U = np.uint64


@njit(**JIT_OPTIONS)
def _valid_outputs(out_len, in_len, stride, pad, offset):
    """Range [lo, hi) of output positions o whose input position o*stride - pad + offset is inside [0, in_len).

    Computing the range once removes the bounds test from the innermost loops.
    """
    first = pad - offset  # o*stride >= first
    lo = 0 if first <= 0 else (first + stride - 1) // stride
    last = in_len - 1 + pad - offset  # o*stride <= last
    hi = 0 if last < 0 else min(out_len, last // stride + 1)
    return lo, max(lo, hi)


@njit(**JIT_OPTIONS)
def _phase_columns(out_w, width, stride_w, pad_w, j):
    """For kernel column j: the valid outputs [lo, hi), and where their inputs sit among the stride phases.

    Input column ow*sw - pw + j is column ow + shift of phase q (see _split_phases), the same q for
    every ow, which is what turns the strided access into a contiguous one.
    """
    lo, hi = _valid_outputs(out_w, width, stride_w, pad_w, j)
    first = lo * stride_w - pad_w + j
    return lo, hi, first % stride_w, first // stride_w - lo


@njit(**JIT_OPTIONS)
def _split_phases(plane, phases):
    """phases[p, q, r, t] = plane[r*sh + p, t*sw + q]: the plane split by row and column stride phase."""
    stride_h, stride_w = phases.shape[0], phases.shape[1]
    height, width = plane.shape
    for h in range(height):
        line = plane[h]
        for q in range(stride_w):
            phase_line = phases[h % stride_h, q, h // stride_h]
            for t in range((width - q + stride_w - 1) // stride_w):
                phase_line[U(t)] = line[U(t * stride_w + q)]


@njit(**JIT_OPTIONS)
def _phase_buffer(height, width, stride_h, stride_w, dtype):
    """Scratch for _split_phases of one [H, W] plane: [sh, sw, ceil(H / sh), ceil(W / sw)]."""
    return np.empty((stride_h, stride_w, (height + stride_h - 1) // stride_h, (width + stride_w - 1) // stride_w),
                    dtype=dtype)


@njit(**JIT_OPTIONS)
def _share(jobs, shares, share):
    """(first, stop) of share number ``share`` of ``shares`` contiguous shares of range(jobs)."""
    return jobs * share // shares, jobs * (share + 1) // shares


@njit(**JIT_OPTIONS)
def _unfold_plane(plane, c, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, phases, cols, offset):
    """The kh*kw rows of channel c of one image's column matrix, from its plane [H, W]: see im2col;
    written to columns [offset, offset + out_h*out_w) of cols (several images side by side).

    Shapes: plane [H, W], phases [sh, sw, ceil(H / sh), ceil(W / sw)] (scratch),
    cols [C*kh*kw, >= offset + out_h*out_w].
    """
    height, width = plane.shape
    _split_phases(plane, phases)
    for i in range(kernel_h):
        oh_lo, oh_hi = _valid_outputs(out_h, height, stride_h, pad_h, i)
        for j in range(kernel_w):
            ow_lo, ow_hi, q, shift = _phase_columns(out_w, width, stride_w, pad_w, j)
            row = cols[(c * kernel_h + i) * kernel_w + j]
            if oh_lo > 0 or oh_hi < out_h or ow_lo > 0 or ow_hi < out_w:
                for p in range(offset, offset + out_h * out_w):
                    row[U(p)] = 0
            for oh in range(oh_lo, oh_hi):
                ih = oh * stride_h - pad_h + i
                phase_line = phases[ih % stride_h, q, ih // stride_h]
                base = offset + oh * out_w
                for ow in range(ow_lo, ow_hi):
                    row[U(base + ow)] = phase_line[U(ow + shift)]


@njit(**PARALLEL_JIT_OPTIONS)
def _column_planes(fold, x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, cols):
    """im2col (fold False: cols from x) or its adjoint, col2im_add (fold True: x += the fold of
    cols), on every (b, c) plane: one parallel loop for the pair, which compiles once per dtype
    instead of twice (a parallel loop costs ~0.55 s of compile however small).

    Shapes: x [B, C, H, W], cols [B, C*kh*kw, out_h*out_w].
    Parallel: over (b, c) planes. Unfolding, an iteration writes only the kh*kw rows of its own
    channel; folding, every row that adds into plane (b, c) belongs to channel c, so no two
    iterations write the same element.
    """
    batch, channels, height, width = x.shape
    for job in prange(batch * channels):
        b = job // channels
        c = job % channels
        if fold:
            _fold_plane(cols[b], c, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, np.int64(0),
                        x[b, c])
        else:
            phases = _phase_buffer(height, width, stride_h, stride_w, x.dtype)
            _unfold_plane(x[b, c], c, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, phases,
                          cols[b], np.int64(0))


def im2col(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, cols):
    """Unfold the patches of x into cols, zeros where a patch overlaps the padding.

    Shapes: x [B, C, H, W] -> cols [B, C*kh*kw, out_h*out_w] (written in place).
    Math: cols[b, (c*kh + i)*kw + j, oh*out_w + ow] = x[b, c, oh*sh - ph + i, ow*sw - pw + j], or 0 outside.
    Each plane is first split into its stride phases (_split_phases; for stride 1, a copy), so that
    every row of cols is filled by contiguous copies: the strided gather of a stride-2 convolution
    does not vectorise, a copy does (measured: stride-2 unfolds up to 2x faster, stride-1 unchanged).
    Parallel: over (b, c) planes (_column_planes).
    """
    _column_planes(False, x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, cols)


@njit(**JIT_OPTIONS)
def _columns_view(flat, rows, columns):
    """The first rows * columns values of a flat scratch buffer as a C-contiguous [rows, columns]."""
    return flat[:rows * columns].reshape((rows, columns))


@njit(**JIT_OPTIONS)
def _unfold_images(x, first, count, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, phases, cols):
    """The column matrices of images first .. first + count - 1 side by side: image first + k in
    columns [k*P, (k+1)*P) of cols (P = out_h*out_w).

    Shapes: x [N, C, H, W] -> cols [C*kh*kw, count*P] (written in place).
    """
    positions = out_h * out_w
    for k in range(count):
        for c in range(x.shape[1]):
            _unfold_plane(x[first + k, c], c, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w,
                          phases, cols, k * positions)


@njit(**JIT_OPTIONS)
def _group_scratch_sizes(rows, out_channels, group, positions, pointwise, height, width, stride_h, stride_w):
    """The values in one thread's _group_scratch: (columns, gathered gradients, stride phases)."""
    return (0 if pointwise else rows * group * positions, 0 if group == 1 else out_channels * group * positions,
            stride_h * stride_w * ((height + stride_h - 1) // stride_h) * ((width + stride_w - 1) // stride_w))


@njit(**JIT_OPTIONS)
def _group_scratch(scratch, rows, out_channels, group, positions, pointwise, height, width, stride_h, stride_w):
    """One thread's scratch for a group of ``group`` images, cut from its row of the caller's
    scratch: flat buffers for their column matrices [rows, group*P] and their gathered output
    gradients [O, group*P], and the stride phases of one plane. A pointwise convolution needs no
    columns (its image is its column matrix, and its groups are single images), a single image no
    gathered gradients: its own arrays are used in place."""
    columns, gradients, phases = _group_scratch_sizes(rows, out_channels, group, positions, pointwise, height, width,
                                                      stride_h, stride_w)
    phase_shape = (stride_h, stride_w, (height + stride_h - 1) // stride_h, (width + stride_w - 1) // stride_w)
    return (scratch[:columns], scratch[columns:columns + gradients],
            scratch[columns + gradients:columns + gradients + phases].reshape(phase_shape))


def _thread_scratch(shares, rows, out_channels, group, positions, pointwise, height, width, stride_h, stride_w, dtype):
    """Scratch [shares, values] for conv2d_forward_images and conv2d_backward_images, one row per
    thread (_group_scratch), on recycled memory (kernels/memory.py). Allocated inside the kernels,
    the columns (7.4 MB per thread for ResNet's stem on 8 x 224 x 224) were fresh pages from
    malloc on every call once other code in the process (torch, in the benchmarks) had made glibc
    hand its heap top back: ~1,400 page faults per call of the stem."""
    values = sum(_group_scratch_sizes(rows, out_channels, group, positions, pointwise, height, width, stride_h,
                                      stride_w))
    return memory.empty((shares, values), dtype)


@njit(**PARALLEL_JIT_OPTIONS)
def conv2d_forward_images(x, w2, bias, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, pointwise,
                          scratch, residual, lower, upper, y):
    """y[n] = clamp(W2 @ im2col(x[n]) + bias + residual[n]) image by image: the image's columns
    (none for a 1x1 stride-1 unpadded convolution, whose image is its column matrix), one gemm on
    this thread, then the bias, a residual network's shortcut and a fused ReLU while y[n] is in cache.

    Shapes: x [N, C, H, W], w2 [O, C*kh*kw], bias [O], residual [N, O, out_h*out_w] or [0, 0, 0]
    (none), scratch [shares, values] (_thread_scratch) -> y [N, O, out_h*out_w] (in place).
    Parallel: over ``shares`` contiguous shares of the images, one per thread, each image start to
    end on one thread. One gemm per image, never several images side by side as the backward pass
    does: BLAS may round an output column differently in a wider product, and an image's output
    must not depend on the batch it came in (Sequential's evaluation chunks are bit-identical to
    the whole batch). Used where every thread gets an image (conv2d_forward).
    """
    batch, channels, height, width = x.shape
    out_channels, rows = w2.shape
    positions = out_h * out_w
    shares = scratch.shape[0]
    for share in prange(shares):
        one = np.int64(1)  # not a literal 1, which would compile _group_scratch and _unfold_images again
        col_scratch, _, phases = _group_scratch(scratch[share], rows, out_channels, one, positions, pointwise, height,
                                                width, stride_h, stride_w)
        first, stop = _share(batch, shares, share)
        for n in range(first, stop):
            if pointwise:
                cols = x[n].reshape((channels, positions))
            else:
                cols = _columns_view(col_scratch, rows, positions)
                _unfold_images(x, n, one, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, phases,
                               cols)
            gemm(w2, cols, y[n], np.bool_(False), np.float64(0.0), np.bool_(False))
            for o in range(out_channels):
                row = y[n, o]
                if residual.shape[0] == 0:
                    for p in range(positions):
                        row[p] = clamp(row[p] + bias[o], lower, upper)
                else:
                    shortcut = residual[n, o]
                    for p in range(positions):
                        row[p] = clamp(row[p] + bias[o] + shortcut[p], lower, upper)


@njit(**JIT_OPTIONS)
def _fold_plane(cols, c, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, offset, plane):
    """plane += the kh*kw rows of channel c of one image's column gradients, read from columns
    [offset, offset + out_h*out_w) of cols: see col2im_add.

    Shapes: cols [C*kh*kw, >= offset + out_h*out_w], plane [H, W] (accumulated in place).
    """
    height, width = plane.shape
    for i in range(kernel_h):
        oh_lo, oh_hi = _valid_outputs(out_h, height, stride_h, pad_h, i)
        for j in range(kernel_w):
            ow_lo, ow_hi = _valid_outputs(out_w, width, stride_w, pad_w, j)
            row = cols[(c * kernel_h + i) * kernel_w + j]
            for oh in range(oh_lo, oh_hi):
                line = plane[oh * stride_h - pad_h + i]
                base = offset + oh * out_w
                for ow in range(ow_lo, ow_hi):
                    line[U(ow * stride_w - pad_w + j)] += row[U(base + ow)]


def col2im_add(cols, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, x):
    """Fold column gradients back onto the image: the adjoint of im2col, accumulated into x.

    Shapes: cols [B, C*kh*kw, out_h*out_w], x [B, C, H, W] (accumulated in place).
    Math: x[b, c, oh*sh - ph + i, ow*sw - pw + j] += cols[b, (c*kh + i)*kw + j, oh*out_w + ow]
          over every (i, j, oh, ow) that lands inside the image.
    (Adding into stride phases first, as im2col reads from them, made stride-2 folds ~20% faster
    and stride-1 folds ~30% slower: not worth a second code path.)
    Parallel: over (b, c) planes (_column_planes).
    """
    _column_planes(True, x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, cols)


@njit(**PARALLEL_JIT_OPTIONS)
def conv2d_backward_images(grad_out, x, w2, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_w, pointwise,
                           group, weight_grad, grad_w2, input_grad, scratch, grad_x):
    """A convolution's gradients for groups of ``group`` consecutive images (the last one may be
    shorter), each group on one thread of one pool (as conv2d_forward_images), with G the group's
    dL/dy side by side [O, group*P]: when weight_grad, grad_w2[share] += G @ cols^T (the group's
    column matrices side by side, then one gemm that accumulates); when input_grad, grad_x[n] =
    col2im(W2^T @ G) (one gemm into the column buffer, then each image's fold). A single image's
    dL/dy is used in place; a pointwise convolution (1x1, stride 1, unpadded) runs single images,
    each its own column matrix (grouping them saved ~10% on 1 ms layers, for copies in both
    directions and 0.6 s more compile time).

    Shapes: grad_out [N, O, P], x [N, C, H, W], w2 [O, C*kh*kw], scratch [shares, values]
    (_thread_scratch) -> grad_w2 [shares, O, C*kh*kw] (zeros on entry, a partial sum per share)
    and grad_x [N, C, H, W] (zeros on entry). x and
    grad_w2 are not read without weight_grad, nor grad_x written without input_grad (the callers
    pass empty arrays there).
    Parallel: over grad_w2.shape[0] contiguous shares of the groups. The groups and, for the
    weight gradient, the shares never depend on the thread count (the caller adds the shares' sums
    in order; GRADIENT_SHARES), so neither gradient's rounding does.
    """
    batch, out_channels, positions = grad_out.shape
    rows = w2.shape[1]
    shares = grad_w2.shape[0]
    channels, height, width = grad_x.shape[1:] if input_grad else x.shape[1:]
    out_h = positions // out_w
    for share in prange(shares):
        col_scratch, grad_scratch, phases = _group_scratch(scratch[share], rows, out_channels, group, positions,
                                                           pointwise, height, width, stride_h, stride_w)
        first, stop = _share(-(-batch // group), shares, share)
        for start in range(first * group, min(batch, stop * group), group):
            count = min(group, batch - start)
            if count == 1:
                grads = grad_out[start]
            else:
                grads = _columns_view(grad_scratch, out_channels, count * positions)
                for k in range(count):
                    for o in range(out_channels):
                        row, source = grads[o], grad_out[start + k, o]
                        for p in range(positions):
                            row[U(k * positions + p)] = source[U(p)]
            if weight_grad:
                if pointwise:
                    cols = x[start].reshape((channels, positions))
                else:
                    cols = _columns_view(col_scratch, rows, count * positions)
                    _unfold_images(x, start, count, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h,
                                   out_w, phases, cols)
                gemm(grads, cols, grad_w2[share], np.bool_(False), np.float64(1.0), np.bool_(True))
            if input_grad:
                if pointwise:
                    gemm(w2, grads, grad_x[start].reshape((channels, positions)), np.bool_(True), np.float64(0.0),
                         np.bool_(False))
                    continue
                cols = _columns_view(col_scratch, rows, count * positions)
                gemm(w2, grads, cols, np.bool_(True), np.float64(0.0), np.bool_(False))
                for k in range(count):
                    for c in range(channels):
                        _fold_plane(cols, c, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w,
                                    k * positions, grad_x[start + k, c])


def _backward_by_image(grad_out, x, weight, stride_h, stride_w, pad_h, pad_w, weight_grad, in_shape):
    """conv2d_backward_images for one of the two gradients: dL/dweight when weight_grad, else
    dL/dx of shape in_shape."""
    batch, out_channels, out_h, out_w = grad_out.shape
    _, channels, kernel_h, kernel_w = weight.shape
    rows = channels * kernel_h * kernel_w
    dtype = grad_out.dtype
    pointwise = _is_pointwise(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
    group = 1 if pointwise else _images_per_product(out_h * out_w, batch)
    groups = -(-batch // group)
    if weight_grad:
        shares = _gradient_shares(groups, out_channels * rows * dtype.itemsize)
    else:
        shares = min(numba.get_num_threads(), groups)  # each image's gradient is its own: any split
    grad_w2 = memory.zeros((shares, out_channels, rows) if weight_grad else (shares, 0, 0), dtype)
    grad_x = memory.zeros((0, 0, 0, 0) if weight_grad else in_shape, dtype)
    x = np.ascontiguousarray(x) if weight_grad else np.empty((0, 0, 0, 0), dtype)
    height, width = x.shape[2:] if weight_grad else in_shape[2:]
    scratch = _thread_scratch(shares, rows, out_channels, group, out_h * out_w, pointwise, height, width, stride_h,
                              stride_w, dtype)
    with threads.single_threaded_blas():
        conv2d_backward_images(np.ascontiguousarray(grad_out).reshape(batch, out_channels, out_h * out_w), x,
                               np.ascontiguousarray(weight).reshape(out_channels, rows), kernel_h, kernel_w,
                               stride_h, stride_w, pad_h, pad_w, out_w, pointwise, group, weight_grad, grad_w2,
                               not weight_grad, scratch, grad_x)
    return _sum_in_order(grad_w2).reshape(weight.shape) if weight_grad else grad_x


def _sum_in_order(partials):
    """partials[0] + partials[1] + ... added one after the other (in place, into partials[0]): a
    sum whose rounding depends only on how many partials there are, never on the threads."""
    summed = partials[0]
    for part in partials[1:]:
        summed += part
    return summed


@njit(**PARALLEL_JIT_OPTIONS)
def add_channel_bias(y, bias, lower, upper):
    """y[n, o, :] = clamp(y[n, o, :] + bias[o]), in place: the bias and, fused with it, a ReLU.

    Shapes: y [N, O, P], bias [O].
    Math: y = clamp(y + bias[o], lower, upper) (activation.clamp): (lower, upper) = (-inf, inf) is
          the plain bias, (0, inf) a ReLU and (0, 6) a ReLU6, bit-identical to the two passes.
    Parallel: over (n, o) rows, which are disjoint.
    """
    batch, out_channels, positions = y.shape
    for job in prange(batch * out_channels):
        o = job % out_channels
        row = y[job // out_channels, o]
        for p in range(positions):
            row[p] = clamp(row[p] + bias[o], lower, upper)


@njit(**SERIAL_REDUCTION_JIT_OPTIONS)
def conv2d_backward_bias(grad_out):
    """Gradient of the loss with respect to the bias.

    Shapes: grad_out [N, O, Ho, Wo] -> grad_bias [O].
    Gradient: dL/db[o] = sum over n, oh, ow of dL/dy[n, o, oh, ow] (accumulated in float64).
    Serial: a sum that streams its input once at vector speed (8 x 64 x 128 x 128 in ~1 ms, 0.5 in
    parallel; 8 x 256 x 32 x 32 faster serial, 0.15 against 0.33 ms); as a parallel loop it had cost
    1.2 s of cold compile per dtype.
    """
    batch, out_channels, out_h, out_w = grad_out.shape
    planes = np.ascontiguousarray(grad_out).reshape((batch, out_channels, out_h * out_w))
    grad_bias = np.empty(out_channels, dtype=grad_out.dtype)
    for o in range(out_channels):
        total = 0.0
        for n in range(batch):
            plane = planes[n, o]
            for p in range(plane.size):
                total += plane[p]
        grad_bias[o] = total
    return grad_bias


def _is_pointwise(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w):
    """A 1x1 stride-1 unpadded convolution needs no unfolding: the image already is its column matrix."""
    return kernel_h == kernel_w == stride_h == stride_w == 1 and pad_h == pad_w == 0


def _chunks(batch, rows, positions, itemsize):
    """Split the batch into runs of images whose column matrices fit IM2COL_BUDGET_BYTES together."""
    per_image = max(1, rows * positions * itemsize)
    step = max(1, min(batch, IM2COL_BUDGET_BYTES // per_image))
    return step, [(start, min(batch, start + step)) for start in range(0, batch, step)]


def _unfolded_chunks(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w):
    """Yield (start, stop, cols) with cols = im2col(x[start:stop]), one bounded chunk at a time.

    The column buffer is allocated once and reused, so a call holds at most one chunk of columns.
    """
    batch, channels = x.shape[:2]
    rows = channels * kernel_h * kernel_w
    positions = out_h * out_w
    if _is_pointwise(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w):
        yield 0, batch, x.reshape(batch, channels, positions)
        return
    step, chunks = _chunks(batch, rows, positions, x.itemsize)
    cols = memory.empty((step, rows, positions), x.dtype)
    for start, stop in chunks:
        part = cols[: stop - start]
        im2col(x[start:stop], kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, part)
        yield start, stop, part


def _gradient_shares(jobs, partial_bytes):
    """How many partial sums a weight gradient over ``jobs`` images or tiles adds up: GRADIENT_SHARES,
    at most one per job, fewer where the partials of partial_bytes each would pass IM2COL_BUDGET_BYTES."""
    return max(1, min(jobs, GRADIENT_SHARES, IM2COL_BUDGET_BYTES // max(1, partial_bytes)))


def _images_per_product(positions, batch):
    """How many consecutive images one gemm of conv2d_backward_images covers: enough for
    CONV_MIN_PRODUCT_COLUMNS columns side by side, but no more than leaves GRADIENT_SHARES groups
    to share out. A function of the shapes alone, never of the thread count."""
    wanted = -(-CONV_MIN_PRODUCT_COLUMNS // max(1, positions))
    return max(1, min(wanted, -(-batch // GRADIENT_SHARES)))


def _by_image(x, rows, positions, shares):
    """Whether a convolution runs image by image (or by groups of images, _images_per_product) on
    the kernels' threads (conv2d_forward_images, conv2d_backward_images): in float32 (float64
    keeps the batched products, and one kernel less to compile), where kernels can call OpenBLAS
    (kernels/blas.py), when every thread gets an image, and when a group's column matrices per
    thread stay within IM2COL_BUDGET_BYTES."""
    group = _images_per_product(positions, x.shape[0])
    return (x.dtype == np.float32 and blas.BACKEND == "openblas" and x.shape[0] >= shares
            and shares * rows * group * positions * x.itemsize <= IM2COL_BUDGET_BYTES)


def conv2d_forward(x, weight, bias, stride_h, stride_w, pad_h, pad_w, lower=-np.inf, upper=np.inf, residual=None):
    """Cross-correlate a batch with a filter bank, as torch.nn.functional.conv2d, optionally then a ReLU.

    Shapes: x [N, C, H, W], weight [O, C, kh, kw], bias [O] or None, residual [N, O, Ho, Wo] or
    None -> y [N, O, Ho, Wo].
    Math: y[n, o, oh, ow] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * x[n, c, oh*sh - ph + i, ow*sw - pw + j]
          (x taken as 0 outside the image), computed per image as W2 @ im2col(x[n]); then clamped
          as add_channel_bias does: (lower, upper) = (0, inf) fuses a following ReLU into the
          bias pass, which saves the ReLU's own read and write of the output. ``residual`` is
          added before the clamp, (conv + bias) + residual: a residual block's shortcut and its
          ReLU in the same pass, bit-identical to the separate sum and ReLU.
    Parallel: im2col over (image, row); the GEMM inside BLAS; the bias over (image, channel).
    """
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h = conv2d_output_size(height, kernel_h, stride_h, pad_h)
    out_w = conv2d_output_size(width, kernel_w, stride_w, pad_w)
    w2 = weight.reshape(out_channels, channels * kernel_h * kernel_w)
    positions = out_h * out_w
    y = memory.empty((batch, out_channels, positions), x.dtype)
    shares = numba.get_num_threads()
    if _by_image(x, w2.shape[1], positions, shares):
        w2 = np.ascontiguousarray(w2)
        zeros = np.zeros(out_channels, y.dtype) if bias is None else bias
        pointwise = _is_pointwise(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
        shortcut = _residual_rows(residual, y, (batch, out_channels, out_h, out_w))
        scratch = _thread_scratch(shares, w2.shape[1], out_channels, 1, positions, pointwise, height, width, stride_h,
                                  stride_w, x.dtype)
        with threads.single_threaded_blas():
            conv2d_forward_images(np.ascontiguousarray(x), w2, zeros, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                  pad_w, out_h, out_w, pointwise, scratch, shortcut, lower, upper, y)
        return y.reshape(batch, out_channels, out_h, out_w)
    for start, stop, cols in _unfolded_chunks(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w):
        np.matmul(w2, cols, out=y[start:stop])
    zeros = np.zeros(out_channels, y.dtype)
    if residual is not None:  # (conv + bias) + residual, then the clamp (a bias of zeros adds nothing)
        add_channel_bias(y, zeros if bias is None else bias, -np.inf, np.inf)
        y += _residual_rows(residual, y, (batch, out_channels, out_h, out_w))
        bias = None
    if bias is not None or lower > -np.inf or upper < np.inf:
        add_channel_bias(y, zeros if bias is None else bias, lower, upper)
    return y.reshape(batch, out_channels, out_h, out_w)


def checked_residual(residual, dtype, out_shape):
    """residual as a C-contiguous array, refused by name unless it is a ``dtype`` array of the
    convolution's output shape (CPU kernels and their GPU twins)."""
    if not isinstance(residual, np.ndarray) or residual.dtype != dtype or residual.shape != tuple(out_shape):
        raise ValueError(f"residual must be a {np.dtype(dtype)} array of the output's shape {tuple(out_shape)}, "
                         f"got {getattr(residual, 'dtype', type(residual).__name__)} {np.shape(residual)}")
    return np.ascontiguousarray(residual)


def _residual_rows(residual, y, out_shape):
    """residual [N, O, Ho, Wo] (out_shape) as y's [N, O, Ho*Wo] rows, C-contiguous, or an empty
    [0, 0, 0] for none: the kernels take one array type either way, so a residual compiles nothing new."""
    if residual is None:
        return np.empty((0, 0, 0), y.dtype)
    return checked_residual(residual, y.dtype, out_shape).reshape(y.shape)


def conv2d_backward_input(grad_out, weight, in_h, in_w, stride_h, stride_w, pad_h, pad_w):
    """Gradient of the loss with respect to the convolution's input.

    Shapes: grad_out [N, O, Ho, Wo], weight [O, C, kh, kw] -> grad_x [N, C, in_h, in_w].
    Gradient: dL/dx = col2im(W2^T @ dL/dy[n]) per image: every input pixel collects
              weight[o, c, i, j] * dL/dy[n, o, oh, ow] from each output position whose window covered it.
    Parallel: the GEMM inside BLAS; col2im over (image, input channel) planes.
    """
    batch, out_channels, out_h, out_w = grad_out.shape
    _, channels, kernel_h, kernel_w = weight.shape
    rows = channels * kernel_h * kernel_w
    positions = out_h * out_w
    if _by_image(grad_out, rows, positions, numba.get_num_threads()):
        return _backward_by_image(grad_out, None, weight, stride_h, stride_w, pad_h, pad_w, False,
                                  (batch, channels, in_h, in_w))
    w2t = weight.reshape(out_channels, rows).T
    g = grad_out.reshape(batch, out_channels, positions)
    if _is_pointwise(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w):
        grad_x = memory.empty((batch, channels, positions), grad_out.dtype)
        np.matmul(w2t, g, out=grad_x)
        return grad_x.reshape(batch, channels, in_h, in_w)
    grad_x = memory.zeros((batch, channels, in_h, in_w), grad_out.dtype)
    step, chunks = _chunks(batch, rows, positions, grad_out.itemsize)
    cols = memory.empty((step, rows, positions), grad_out.dtype)
    for start, stop in chunks:
        part = cols[: stop - start]
        np.matmul(w2t, g[start:stop], out=part)
        col2im_add(part, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, grad_x[start:stop])
    return grad_x


def conv2d_backward_weight(grad_out, x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w):
    """Gradient of the loss with respect to the filter bank.

    Shapes: grad_out [N, O, Ho, Wo], x [N, C, H, W] -> grad_weight [O, C, kh, kw].
    Gradient: dL/dW2 = sum_n dL/dy[n] @ im2col(x[n])^T, i.e.
              dL/dweight[o, c, i, j] = sum_{n, oh, ow} dL/dy[n, o, oh, ow] * x[n, c, oh*sh - ph + i, ow*sw - pw + j].
    Parallel: im2col over (image, row); the GEMMs inside BLAS. The columns are recomputed here
    rather than kept from the forward pass, trading one cheap unfold for 9x the input's memory.
    """
    batch, out_channels, out_h, out_w = grad_out.shape
    channels = x.shape[1]
    rows = channels * kernel_h * kernel_w
    if _by_image(x, rows, out_h * out_w, min(batch, GRADIENT_SHARES)):  # never by the thread count
        filters = np.empty((out_channels, channels, kernel_h, kernel_w), x.dtype)  # their shape; values unread
        return _backward_by_image(grad_out, x, filters, stride_h, stride_w, pad_h, pad_w, True, None)
    g = grad_out.reshape(batch, out_channels, out_h * out_w)
    # Accumulated transposed, (dL/dW2)^T = sum_n cols[n] @ dL/dy[n]^T: OpenBLAS runs this
    # orientation 35% faster for first layers (27 rows, 16k positions) and within 5% elsewhere.
    grad_w2t = np.zeros((rows, out_channels), dtype=grad_out.dtype)
    partial = np.empty_like(grad_w2t)
    for start, stop, cols in _unfolded_chunks(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w):
        for b in range(stop - start):
            np.matmul(cols[b], g[start + b].T, out=partial)
            grad_w2t += partial
    return np.ascontiguousarray(grad_w2t.T).reshape(out_channels, channels, kernel_h, kernel_w)
