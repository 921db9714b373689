"""numba.cuda twins of the CPU kernels: same names, same arguments, NumPy arrays in and out.

Each host launcher copies its inputs to the device, launches, and copies the results back (in-place
arguments such as min_dist are written back into the caller's array), so a twin can replace its CPU
kernel anywhere. One GPU thread computes one output element unless the docstring says otherwise;
the math of each kernel is its CPU twin's (see npanomaly.kernels). Thread counts come from
kernels/_config.py at call time, so the tests can make tiny inputs span several blocks.
"""

import functools
import math

import numpy as np
from numba import cuda

from .. import _config
from ..conv import checked_residual, conv2d_output_size
from ._device import require


def _launcher(function):
    """A host launcher: first the one clear error when no GPU can run it (not a driver traceback)."""
    @functools.wraps(function)
    def checked(*args, **kwargs):
        require()
        return function(*args, **kwargs)
    return checked


def _blocks(total):
    """(blocks, threads) of a 1-D launch over total elements."""
    threads = _config.CUDA_THREADS_PER_BLOCK
    return max(1, (total + threads - 1) // threads), threads


def _per_output(kernel, shape, dtype, *args):
    """Launch kernel(*args, out) with one thread per element of a new device array out; return it on the host.

    NumPy array arguments are copied to the device first; scalars and device arrays pass as they are.
    """
    out = cuda.device_array(shape, dtype=dtype)
    grid, threads = _blocks(out.size)
    kernel[grid, threads](*[cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args], out)
    return out.copy_to_host()


@cuda.jit(device=True)
def _clamp(v, lower, upper):
    """The CPU kernels' activation.clamp on the device: (0, inf) a ReLU, (0, 6) a ReLU6, (-inf, inf) nothing."""
    return min(v, upper) if v > lower else lower


@cuda.jit(device=True)
def _unravel(index, d1, d2, d3):
    """(i0, i1, i2, i3) of a flat C-order index into an array of shape [*, d1, d2, d3]."""
    return index // (d3 * d2 * d1), (index // (d3 * d2)) % d1, (index // d3) % d2, index % d3


# ----------------------------------------------------------------------------- convolution

@cuda.jit
def _conv_forward(x, weight, bias, has_bias, sh, sw, ph, pw, residual, has_residual, lower, upper, y):
    index = cuda.grid(1)
    batch, out_channels, out_h, out_w = y.shape
    if index >= y.size:
        return
    n, o, oh, ow = _unravel(index, out_channels, out_h, out_w)
    channels, kernel_h, kernel_w = weight.shape[1], weight.shape[2], weight.shape[3]
    height, width = x.shape[2], x.shape[3]
    total = bias[o] if has_bias else 0.0
    for c in range(channels):
        for i in range(kernel_h):
            ih = oh * sh - ph + i
            if ih < 0 or ih >= height:
                continue
            for j in range(kernel_w):
                iw = ow * sw - pw + j
                if 0 <= iw < width:
                    total += weight[o, c, i, j] * x[n, c, ih, iw]
    if has_residual:
        total += residual[n, o, oh, ow]
    y[n, o, oh, ow] = _clamp(total, lower, upper)


@_launcher
def conv2d_forward(x, weight, bias, stride_h, stride_w, pad_h, pad_w, lower=-np.inf, upper=np.inf, residual=None):
    """GPU twin of npanomaly.kernels.conv2d_forward (direct convolution, one thread per output;
    a residual is added before the clamp)."""
    out_h = conv2d_output_size(x.shape[2], weight.shape[2], stride_h, pad_h)
    out_w = conv2d_output_size(x.shape[3], weight.shape[3], stride_w, pad_w)
    out_shape = (x.shape[0], weight.shape[0], out_h, out_w)
    has_bias = bias is not None
    bias = np.zeros(weight.shape[0], x.dtype) if bias is None else bias
    has_residual = residual is not None
    residual = (checked_residual(residual, x.dtype, out_shape) if has_residual else np.zeros((1, 1, 1, 1), x.dtype))
    return _per_output(_conv_forward, out_shape, x.dtype, x, weight, bias, has_bias, stride_h, stride_w, pad_h, pad_w,
                       residual, has_residual, lower, upper)


@cuda.jit
def _conv_backward_input(grad_out, weight, sh, sw, ph, pw, grad_x):
    index = cuda.grid(1)
    batch, channels, height, width = grad_x.shape
    if index >= grad_x.size:
        return
    n, c, ih, iw = _unravel(index, channels, height, width)
    out_channels, kernel_h, kernel_w = weight.shape[0], weight.shape[2], weight.shape[3]
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    total = 0.0
    for i in range(kernel_h):
        top = ih + ph - i
        if top < 0 or top % sh != 0 or top // sh >= out_h:
            continue
        oh = top // sh
        for j in range(kernel_w):
            left = iw + pw - j
            if left < 0 or left % sw != 0 or left // sw >= out_w:
                continue
            ow = left // sw
            for o in range(out_channels):
                total += weight[o, c, i, j] * grad_out[n, o, oh, ow]
    grad_x[n, c, ih, iw] = total


@_launcher
def conv2d_backward_input(grad_out, weight, in_h, in_w, stride_h, stride_w, pad_h, pad_w):
    """GPU twin of npanomaly.kernels.conv2d_backward_input (a gather: one thread per input pixel)."""
    return _per_output(_conv_backward_input, (grad_out.shape[0], weight.shape[1], in_h, in_w), grad_out.dtype,
                       grad_out, weight, stride_h, stride_w, pad_h, pad_w)


@cuda.jit
def _conv_backward_weight(grad_out, x, sh, sw, ph, pw, grad_w):
    index = cuda.grid(1)
    out_channels, channels, kernel_h, kernel_w = grad_w.shape
    if index >= grad_w.size:
        return
    o, c, i, j = _unravel(index, channels, kernel_h, kernel_w)
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    total = 0.0
    for n in range(batch):
        for oh in range(out_h):
            ih = oh * sh - ph + i
            if ih < 0 or ih >= height:
                continue
            for ow in range(out_w):
                iw = ow * sw - pw + j
                if 0 <= iw < width:
                    total += grad_out[n, o, oh, ow] * x[n, c, ih, iw]
    grad_w[o, c, i, j] = total


@_launcher
def conv2d_backward_weight(grad_out, x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w):
    """GPU twin of npanomaly.kernels.conv2d_backward_weight (one thread per filter weight, float64 sum)."""
    return _per_output(_conv_backward_weight, (grad_out.shape[1], x.shape[1], kernel_h, kernel_w), grad_out.dtype,
                       grad_out, x, stride_h, stride_w, pad_h, pad_w)


@cuda.jit
def _channel_sums(values, out):
    """out[c] = sum of values[:, c] (one thread per channel)."""
    c = cuda.grid(1)
    if c >= out.size:
        return
    total = 0.0
    for n in range(values.shape[0]):
        for h in range(values.shape[2]):
            for w in range(values.shape[3]):
                total += values[n, c, h, w]
    out[c] = total


@_launcher
def conv2d_backward_bias(grad_out):
    """GPU twin of npanomaly.kernels.conv2d_backward_bias."""
    return _per_output(_channel_sums, grad_out.shape[1], grad_out.dtype, grad_out)


# ----------------------------------------------------------------------------- batch norm

@cuda.jit
def _bn_statistics(x, mean, var):
    """One block per channel: shifted sums over N*H*W in float64, tree-reduced in shared memory."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    sums = cuda.shared.array(1024, dtype=np.float64)
    squares = cuda.shared.array(1024, dtype=np.float64)
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    count = batch * height * width
    shift = x[0, c, 0, 0]
    total = 0.0
    total_sq = 0.0
    for k in range(t, count, threads):
        d = x[k // (height * width), c, (k // width) % height, k % width] - shift
        total += d
        total_sq += d * d
    sums[t] = total
    squares[t] = total_sq
    cuda.syncthreads()
    step = 1
    while step < threads:
        if t % (2 * step) == 0 and t + step < threads:
            sums[t] += sums[t + step]
            squares[t] += squares[t + step]
        step *= 2
        cuda.syncthreads()
    if t == 0:
        mean_shifted = sums[0] / count
        var[c] = max(squares[0] / count - mean_shifted * mean_shifted, 0.0)
        mean[c] = shift + mean_shifted


@cuda.jit
def _bn_affine(x, scale, offset, lower, upper, y):
    index = cuda.grid(1)
    if index >= y.size:
        return
    channels, height, width = y.shape[1], y.shape[2], y.shape[3]
    n, c, h, w = _unravel(index, channels, height, width)
    y[n, c, h, w] = _clamp(x[n, c, h, w] * scale[c] + offset[c], lower, upper)


def _affine(x, scale, offset, lower, upper):
    return _per_output(_bn_affine, x.shape, x.dtype, x, scale, offset, lower, upper)


@_launcher
def batchnorm2d_train_forward(x, weight, bias, eps, lower=-np.inf, upper=np.inf):
    """GPU twin of npanomaly.kernels.batchnorm2d_train_forward (statistics in float64)."""
    channels = x.shape[1]
    mean = cuda.device_array(channels, dtype=np.float64)
    var = cuda.device_array(channels, dtype=np.float64)
    threads = min(1024, _blocks(1)[1])
    _bn_statistics[channels, threads](cuda.to_device(x), mean, var)
    mean, var = mean.copy_to_host(), var.copy_to_host()
    scale = weight / np.sqrt(var + eps)
    return _affine(x, scale.astype(x.dtype), (bias - mean * scale).astype(x.dtype), lower, upper), mean, var


@_launcher
def batchnorm2d_eval_forward(x, weight, bias, running_mean, running_var, eps, lower=-np.inf, upper=np.inf):
    """GPU twin of npanomaly.kernels.batchnorm2d_eval_forward."""
    scale = weight / np.sqrt(running_var.astype(np.float64) + eps)
    return _affine(x, scale.astype(x.dtype), (bias - running_mean * scale).astype(x.dtype), lower, upper)


@cuda.jit
def _bn_backward_sums(grad_out, x, activated, lower, upper, mean, inv_std, sum_dy, sum_dy_xhat):
    c = cuda.grid(1)
    if c >= sum_dy.size:
        return
    total = 0.0
    total_xhat = 0.0
    for n in range(x.shape[0]):
        for h in range(x.shape[2]):
            for w in range(x.shape[3]):
                dy = grad_out[n, c, h, w] if lower < activated[n, c, h, w] < upper else 0.0
                total += dy
                total_xhat += dy * (x[n, c, h, w] - mean[c]) * inv_std[c]
    sum_dy[c] = total
    sum_dy_xhat[c] = total_xhat


@cuda.jit
def _bn_backward_input(grad_out, x, activated, lower, upper, mean, inv_std, weight, mean_dy, mean_dy_xhat, grad_x):
    index = cuda.grid(1)
    if index >= grad_x.size:
        return
    channels, height, width = grad_x.shape[1], grad_x.shape[2], grad_x.shape[3]
    n, c, h, w = _unravel(index, channels, height, width)
    xhat = (x[n, c, h, w] - mean[c]) * inv_std[c]
    dy = grad_out[n, c, h, w] if lower < activated[n, c, h, w] < upper else 0.0
    grad_x[n, c, h, w] = weight[c] * inv_std[c] * (dy - mean_dy[c] - xhat * mean_dy_xhat[c])


@_launcher
def batchnorm2d_backward(grad_out, x, weight, batch_mean, batch_var, eps, activated, lower, upper):
    """GPU twin of npanomaly.kernels.batchnorm2d_backward."""
    channels = x.shape[1]
    count = x.shape[0] * x.shape[2] * x.shape[3]
    inv_std = 1.0 / np.sqrt(batch_var + eps)
    d_grad, d_x, d_activated = cuda.to_device(grad_out), cuda.to_device(x), cuda.to_device(activated)
    d_mean, d_inv = cuda.to_device(batch_mean), cuda.to_device(inv_std)
    sum_dy = cuda.device_array(channels, dtype=np.float64)
    sum_dy_xhat = cuda.device_array(channels, dtype=np.float64)
    grid, threads = _blocks(channels)
    _bn_backward_sums[grid, threads](d_grad, d_x, d_activated, lower, upper, d_mean, d_inv, sum_dy, sum_dy_xhat)
    sum_dy, sum_dy_xhat = sum_dy.copy_to_host(), sum_dy_xhat.copy_to_host()
    grad_x = _per_output(_bn_backward_input, x.shape, x.dtype, d_grad, d_x, d_activated, lower, upper, d_mean,
                         d_inv, weight.astype(np.float64), sum_dy / count, sum_dy_xhat / count)
    return grad_x, sum_dy_xhat.astype(x.dtype), sum_dy.astype(x.dtype)


# ----------------------------------------------------------------------------- ReLU

@cuda.jit
def _relu_forward(x, upper, y):
    i = cuda.grid(1)
    if i < x.size:
        y[i] = _clamp(x[i], 0.0, upper)


@cuda.jit
def _relu_backward(grad_out, x, upper, grad_x):
    i = cuda.grid(1)
    if i < x.size:
        grad_x[i] = grad_out[i] if 0 < x[i] < upper else 0


@_launcher
def relu_forward(x, upper=np.inf):
    """GPU twin of npanomaly.kernels.relu_forward."""
    return _per_output(_relu_forward, x.size, x.dtype, x.reshape(-1), upper).reshape(x.shape)


@_launcher
def relu_backward_input(grad_out, x, upper=np.inf):
    """GPU twin of npanomaly.kernels.relu_backward_input."""
    return _per_output(_relu_backward, x.size, grad_out.dtype, grad_out.reshape(-1), x.reshape(-1),
                       upper).reshape(x.shape)


# ----------------------------------------------------------------------------- search

@cuda.jit
def _block_dots(queries, bank, out):
    """out = queries @ bank.T with square shared-memory tiles: each block loads a TILE x TILE piece of
    both operands per step, so every value read from global memory is used TILE times."""
    tile = cuda.blockDim.x
    q_tile = cuda.shared.array((32, 32), dtype=np.float64)
    b_tile = cuda.shared.array((32, 32), dtype=np.float64)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row = cuda.blockIdx.y * tile + ty
    col = cuda.blockIdx.x * tile + tx
    dim = queries.shape[1]
    total = 0.0
    for start in range(0, dim, tile):
        q_tile[ty, tx] = queries[row, start + tx] if (row < queries.shape[0] and start + tx < dim) else 0.0
        b_tile[ty, tx] = bank[col - tx + ty, start + tx] if (col - tx + ty < bank.shape[0] and start + tx < dim) \
            else 0.0
        cuda.syncthreads()
        for k in range(tile):
            total += q_tile[ty, k] * b_tile[tx, k]
        cuda.syncthreads()
    if row < out.shape[0] and col < out.shape[1]:
        out[row, col] = total


@_launcher
def block_dots(queries, bank, out):
    """GPU twin of npanomaly.kernels.block_dots: out[...] = queries @ bank.T (tiled, shared memory)."""
    tile = min(32, _config.CUDA_TILE)
    grid = (math.ceil(bank.shape[0] / tile), math.ceil(queries.shape[0] / tile))
    result = cuda.device_array(out.shape, dtype=out.dtype)
    _block_dots[grid, (tile, tile)](cuda.to_device(queries), cuda.to_device(bank), result)
    out[...] = result.copy_to_host()
    return out


@cuda.jit
def _center_distances(features, selected, count, center_dist):
    t = cuda.grid(1)
    if t >= count:
        return
    new = selected[count - 1]
    total = 0.0
    for d in range(features.shape[1]):
        diff = features[new, d] - features[selected[t], d]
        total += diff * diff
    center_dist[t] = total


@cuda.jit
def _update_min_distances(features, selected, count, center_dist, slack, min_dist, nearest):
    i = cuda.grid(1)
    if i >= min_dist.size:
        return
    if center_dist[nearest[i]] > 4.0 * min_dist[i] * (1.0 + slack):
        return
    new = selected[count - 1]
    total = 0.0
    for d in range(features.shape[1]):
        diff = features[i, d] - features[new, d]
        total += diff * diff
    if total < min_dist[i]:
        min_dist[i] = total
        nearest[i] = count - 1


@_launcher
def update_min_distances(features, selected, count, min_dist, nearest):
    """GPU twin of npanomaly.kernels.update_min_distances (min_dist and nearest updated in place)."""
    from ..coreset import PRUNE_SLACK

    d_features, d_selected = cuda.to_device(features), cuda.to_device(selected)
    center_dist = cuda.device_array(count, dtype=np.float64)
    grid, threads = _blocks(count)
    _center_distances[grid, threads](d_features, d_selected, count, center_dist)
    d_min, d_nearest = cuda.to_device(min_dist), cuda.to_device(nearest)
    grid, threads = _blocks(min_dist.size)
    _update_min_distances[grid, threads](d_features, d_selected, count, center_dist, PRUNE_SLACK, d_min, d_nearest)
    min_dist[...] = d_min.copy_to_host()
    nearest[...] = d_nearest.copy_to_host()
