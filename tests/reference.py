"""Every kernel again, in plain, slow, obvious NumPy (float64), written for clarity.

These are the oracles of the kernel tests. They follow the textbook definitions window by window,
share no code with the package, and are only ever run on tiny shapes.
"""

import numpy as np


def pad_image(x, pad_h, pad_w, value=0.0):
    return np.pad(x, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)), constant_values=value)


def out_size(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


def conv2d(x, weight, bias, stride, pad):
    """y[n, o, i, j] = bias[o] + sum(window(n, i, j) * weight[o])."""
    (sh, sw), (ph, pw) = stride, pad
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    xp = pad_image(x.astype(np.float64), ph, pw)
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    y = np.zeros((n, o, ho, wo))
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                window = xp[b, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                for f in range(o):
                    y[b, f, i, j] = np.sum(window * weight[f])
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)[None, :, None, None]
    return y


def conv2d_grads(x, weight, grad_out, stride, pad):
    """(dL/dx, dL/dweight, dL/dbias) by sending each output's gradient back over its window."""
    (sh, sw), (ph, pw) = stride, pad
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    xp = pad_image(x.astype(np.float64), ph, pw)
    grad_xp = np.zeros_like(xp)
    grad_w = np.zeros(weight.shape)
    _, _, ho, wo = grad_out.shape
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                window = xp[b, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                for f in range(o):
                    g = grad_out[b, f, i, j]
                    grad_w[f] += g * window
                    grad_xp[b, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += g * weight[f]
    grad_x = grad_xp[:, :, ph:ph + h, pw:pw + w]
    grad_b = grad_out.sum(axis=(0, 2, 3))
    return grad_x, grad_w, grad_b


def batchnorm_train(x, weight, bias, eps):
    """(y, mean, biased var) with the batch statistics."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    xhat = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)
    return xhat * weight[None, :, None, None] + bias[None, :, None, None], mean, var


def batchnorm_eval(x, weight, bias, running_mean, running_var, eps):
    shape = (1, -1, 1, 1)
    return ((x - running_mean.reshape(shape)) / np.sqrt(running_var.reshape(shape) + eps) * weight.reshape(shape)
            + bias.reshape(shape))


def batchnorm_grads(x, weight, grad_out, eps):
    """The step-by-step chain rule through mean and variance (the classic derivation)."""
    x = x.astype(np.float64)
    axes = (0, 2, 3)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    std_inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * std_inv
    w = weight.reshape(1, -1, 1, 1)
    grad_xhat = grad_out * w
    grad_var = np.sum(grad_xhat * (x - mean) * -0.5 * std_inv**3, axis=axes, keepdims=True)
    grad_mean = np.sum(-grad_xhat * std_inv, axis=axes, keepdims=True) + grad_var * np.mean(
        -2.0 * (x - mean), axis=axes, keepdims=True)
    grad_x = grad_xhat * std_inv + grad_var * 2.0 * (x - mean) / m + grad_mean / m
    return grad_x, np.sum(grad_out * xhat, axis=axes), np.sum(grad_out, axis=axes)


def relu(x):
    return np.where(x > 0, x, 0.0)


def relu_grad(x, grad_out):
    return np.where(x > 0, grad_out, 0.0)


def max_pool2d(x, kernel, stride, pad):
    """(y, argmax as h*W + w): the first maximum of each window, padding never chosen."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    xp = pad_image(x.astype(np.float64), ph, pw, value=-np.inf)
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    y = np.zeros((n, c, ho, wo))
    argmax = np.zeros((n, c, ho, wo), dtype=np.int64)
    for b in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    window = xp[b, ch, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    flat = int(np.argmax(window))  # numpy returns the first maximum, like torch
                    wi, wj = divmod(flat, kw)
                    y[b, ch, i, j] = window[wi, wj]
                    argmax[b, ch, i, j] = (i * sh + wi - ph) * w + (j * sw + wj - pw)
    return y, argmax


def max_pool2d_grad(x_shape, argmax, grad_out):
    n, c, h, w = x_shape
    grad_x = np.zeros((n, c, h * w))
    for b in range(n):
        for ch in range(c):
            np.add.at(grad_x[b, ch], argmax[b, ch].ravel(), grad_out[b, ch].ravel())
    return grad_x.reshape(x_shape)


def avg_pool2d(x, kernel, stride, pad, count_include_pad):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    xp = pad_image(x.astype(np.float64), ph, pw)
    inside = pad_image(np.ones((1, 1, h, w)), ph, pw)
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    y = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            window = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            divisor = kh * kw if count_include_pad else inside[0, 0, i * sh:i * sh + kh, j * sw:j * sw + kw].sum()
            y[:, :, i, j] = window.sum(axis=(2, 3)) / divisor
    return y


def knn_bruteforce(queries, bank, k, exclude_self=False):
    """All Q x M distances in float64, sorted by (distance, bank index)."""
    q = queries.astype(np.float64)
    b = bank.astype(np.float64)
    d2 = ((q[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    order = np.array([np.lexsort((np.arange(len(b)), row))[:k] for row in d2])
    return np.sqrt(np.take_along_axis(d2, order, axis=1)), order


def greedy_k_center(features, n_select, start):
    """Textbook greedy k-center: add the point farthest from the selected set, first maximum wins."""
    x = features.astype(np.float64)
    selected = [start]
    min_d2 = ((x - x[start]) ** 2).sum(axis=1)
    min_d2[start] = -1.0
    while len(selected) < n_select:
        nxt = int(np.argmax(min_d2))
        selected.append(nxt)
        min_d2 = np.minimum(min_d2, ((x - x[nxt]) ** 2).sum(axis=1))
        min_d2[selected] = -1.0
    return np.array(selected)


def bilinear_resize(x, out_h, out_w):
    """Half-pixel-centre bilinear interpolation (torch's align_corners=False), one output pixel at a time."""
    n, c, h, w = x.shape
    y = np.zeros((n, c, out_h, out_w))

    def source(dst, in_size, out_size):
        src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = min(int(np.floor(src)), in_size - 1)
        return i0, min(i0 + 1, in_size - 1), src - i0

    for i in range(out_h):
        h0, h1, a = source(i, h, out_h)
        for j in range(out_w):
            w0, w1, b = source(j, w, out_w)
            y[:, :, i, j] = ((1 - a) * ((1 - b) * x[:, :, h0, w0] + b * x[:, :, h0, w1])
                             + a * ((1 - b) * x[:, :, h1, w0] + b * x[:, :, h1, w1]))
    return y


def gaussian_blur(x, sigma):
    """Direct 2-D convolution with the (2r+1)^2 Gaussian, reflect padding (edge not repeated)."""
    r = int(4 * sigma + 0.5)
    t = np.arange(-r, r + 1)
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    n, c, h, w = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    y = np.zeros((n, c, h, w))
    for i in range(2 * r + 1):
        for j in range(2 * r + 1):
            y += g[i, j] * padded[:, :, i:i + h, j:j + w]
    return y


def patchcore_eq7(test_patch, s_star, m_star_index, bank, b):
    """Eq. 7 of Roth et al. as printed: s = (1 - exp|m_test - m*| / sum_{m in N_b(m*)} exp|m_test - m|) s*."""
    bank = bank.astype(np.float64)
    d_bank = np.sqrt(((bank - bank[m_star_index]) ** 2).sum(axis=1))
    neighbourhood = np.lexsort((np.arange(len(bank)), d_bank))[:b]
    d_test = np.sqrt(((bank[neighbourhood] - test_patch.astype(np.float64)) ** 2).sum(axis=1))
    return (1.0 - np.exp(s_star) / np.exp(d_test).sum()) * s_star


def l2_normalize_channels(x, eps=1e-12):
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    return x / np.maximum(norm, eps)


def png_with_filters(image, filters, depth=8):
    """A PNG of image [H, W, C] (uint8/uint16) whose row y uses filter type filters[y]: an encoder
    written from the specification, so the decoder is tested on every filter (Pillow picks its own)."""
    import struct
    import zlib

    height, width, channels = image.shape
    samples = image.astype(">u2").view(np.uint8) if depth == 16 else image.astype(np.uint8)
    rows = samples.reshape(height, -1).astype(np.int64)
    bpp = max(1, channels * depth // 8)
    raw = bytearray()
    for y in range(height):
        kind = filters[y]
        row = rows[y]
        above = rows[y - 1] if y > 0 else np.zeros_like(row)
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int64), above[:-bpp]])
        if kind == 0:
            predictor = np.zeros_like(row)
        elif kind == 1:
            predictor = left
        elif kind == 2:
            predictor = above
        elif kind == 3:
            predictor = (left + above) // 2
        else:
            p = left + above - upper_left
            pa, pb, pc = np.abs(p - left), np.abs(p - above), np.abs(p - upper_left)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
        raw.append(kind)
        raw.extend(((row - predictor) % 256).astype(np.uint8).tobytes())
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
