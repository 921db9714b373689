"""3x3 stride-1 convolution by Winograd's minimal filtering (Lavin & Gray, CVPR 2016).

**The idea, in one dimension.** F(m, r) computes m outputs of an r-tap correlation,
y[i] = sum_j g[j] d[i + j] (i < m, j < r), from alpha = m + r - 1 inputs with alpha
multiplications instead of m * r:

    y = A^T [ (G g) * (B^T d) ]        (* elementwise; A^T is m x alpha, G alpha x r, B^T alpha x alpha)

**Where the matrices come from (Toom-Cook).** Read g and h as polynomials g(x) = sum g_j x^j and
h(x) = sum h_i x^i (degrees r - 1 and m - 1). Their product s = g h has alpha coefficients, and a
polynomial of degree alpha - 1 is fixed by its values at alpha points: alpha - 1 finite points
p_k and the point at infinity (whose "value" is the leading coefficient). So

    s = V_alpha^{-1} [ (V_r g) * (V_m h) ]

where V_n is the alpha x n Vandermonde matrix of the points (row k = [1, p_k, p_k^2, ...], the
infinity row = [0, ..., 0, 1]). That is linear convolution: the matrix taking h to s is
C_g = V_alpha^{-1} diag(V_r g) V_m. Correlation is its transpose (y_i = sum_k C_g[k, i] d_k =
sum_j g_j d_{i+j}), so

    y = V_m^T [ (V_r g) * (V_alpha^{-T} d) ]:   A^T = V_m^T,  G = V_r,  B^T = V_alpha^{-T}.

Any diagonal scaling S may move between G and B^T (y = A^T[(S^{-1} G g) * (S B^T d)]). Row k of
V_alpha^{-T} holds the coefficients of the Lagrange polynomial prod_{l != k} (x - p_l) / N_k with
N_k = prod_{l != k} (p_k - p_l) (the infinity row: prod_l (x - p_l)), so S = diag(N_k) leaves B^T
with the small integers of those products and G with the 1/N_k. With the points 0, 1, -1 this is
F(2, 3) and with 0, 1, -1, 2, -2 it is F(4, 3), Lavin & Gray's matrices up to the signs of rows.
``transform_matrices(m)`` builds them this way; tests/test_winograd.py checks them against a
direct correlation.

**Two dimensions.** Nesting the 1-D algorithm in rows and columns, an m x m output tile comes from
an alpha x alpha input tile d and the 3 x 3 filter g as

    Y = A^T [ (G g G^T) * (B^T d B) ] A,

alpha^2 multiplications per tile and channel pair instead of 9 m^2: 16 instead of 36 for m = 2
(2.25x fewer), 36 instead of 144 for m = 4 (4x fewer). Summed over input channels c, the
elementwise products become, for each of the alpha^2 transform points xi, one matrix product

    M[xi] = U[xi] @ V[xi],   U[xi] [O, C] the transformed filters, V[xi] [C, tiles] the transformed
    inputs, M[xi] [O, tiles],

which goes to BLAS (one call per point). The transforms are matrix products too: B^T d B is
B^T times d, then that times B, and with the tiles unfolded side by side each half is one product
of the small transform matrix with a long matrix of all the tiles' and channels' values
(input_transform, output_transform); filter_transform is a Numba loop.

**Running it.** The tiles are cut into blocks of consecutive tiles small enough for one core's
cache, and each block runs start to end on one thread of a parallel loop: input transform, the
alpha^2 products (OpenBLAS's gemm called from the kernel on that thread, kernels/blas.py, which
says why), output transform. Where there are fewer tiles than a block per thread (ResNet's 7 x 7
stage), every thread runs every tile instead, for its share of the output channels. The products
write each M[xi] as [O, tiles] (U [O, C] times the transpose of the block's V [tiles, C]), so that
each channel's tiles are contiguous and the output transform's last product leaves each output
row's values in the image's own order: the stores into [N, O, Ho, Wo] then run along image rows
(output_transform says what that saved).

Larger m means fewer products but larger transform coefficients (up to 8 and 1/24 for m = 4): the
float32 error grows with m (measured in docs/speed.md).

**Gradients.** The input gradient of a 3 x 3 stride-1 convolution with padding p is the same
convolution of dL/dy with the filters flipped in both axes and transposed (in and out channels
swapped), padding 2 - p: each input pixel collects w[o, c, i, j] dL/dy[o, h - i + p, w - j + p]
(filter_transform reads the filters rotated in place). For F(2x2) even that transform can be
skipped: its points 0, 1, -1 and infinity are closed under p -> 1/p, so the rotated filters'
transform is the forward pass's U with its points permuted and signed (filter_reversal), and a
training layer that keeps U from its forward pass runs the input gradient on it, with permuted
transform matrices and each point's product against U's transpose. The weight gradient is Winograd's
F(3 x 3, m x m) with the tiles of dL/dy as filters (winograd_conv2d_backward_weight), each
transform point summed over all tiles on one thread. nn.Conv2d runs each gradient this way where
the batch has enough tiles for it to beat im2col (fewer for the weight gradient than for the
input gradient, Conv2d._winograd_backward), both from one channels-last copy of dL/dy when both
run by Winograd (winograd_conv2d_backward).

Shapes: x [N, C, H, W], weight [O, C, 3, 3], tiles T = ceil(Ho / m) * ceil(Wo / m) per image.
"""

import functools

import numba
import numpy as np
from numba import njit, prange

from npanomaly import threads

from . import _config, memory
from ._config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS
from .blas import gemm
from .activation import clamp
from .conv import _share, checked_residual, conv2d_output_size

#: Tile-channels per chunk of the input and output transforms (input_transform): 512 to 8,192 ran
#: within the noise of each other on the ResNet layers, one thread.
TRANSFORM_CHUNK_VALUES = 1024

#: The finite interpolation points for alpha = m + r - 1 (alpha - 1 of them, and infinity): F(2, 3)
#: and the weight gradient's F(3, 2) use alpha = 4, F(4, 3) and F(3, 4) alpha = 6.
POINTS = {4: (0.0, 1.0, -1.0), 6: (0.0, 1.0, -1.0, 2.0, -2.0)}


def transform_matrices(m, r=3):
    """(A^T [m, alpha], G [alpha, r], B^T [alpha, alpha]) of F(m, r) in float64, by the Toom-Cook
    construction of the module docstring (points POINTS[alpha] and infinity, scaled by N_k)."""
    alpha = m + r - 1
    points = np.array(POINTS[alpha])

    def vandermonde(columns):
        v = np.zeros((alpha, columns))
        v[:-1] = points[:, None] ** np.arange(columns)[None, :]
        v[-1, -1] = 1.0  # the point at infinity: the leading coefficient
        return v

    scale = np.ones(alpha)
    for k, p in enumerate(points):
        scale[k] = np.prod([p - q for q in np.delete(points, k)])
    a_t = vandermonde(m).T
    g = vandermonde(r) / scale[:, None]
    b_t = scale[:, None] * np.linalg.inv(vandermonde(alpha)).T
    return a_t, g + 0.0, np.round(b_t) + 0.0  # integers; rounding removes the inverse's error, + 0.0 the -0.0s


@njit(**JIT_OPTIONS)
def filter_transform(weight, g, rotated, u):
    """U[xi, o, c] = (G w[o, c] G^T)[xi // alpha, xi % alpha]: the transformed filters. When
    rotated, those of the input gradient's convolution instead, whose filters are w'[c, o] = w[o, c]
    turned by 180 degrees (winograd_conv2d_backward_input): U[xi, c, o] = (G w'[c, o] G^T)[...],
    w'[c, o, i, j] = w[o, c, 2 - i, 2 - j].

    Shapes: weight [O, C, 3, 3], g [alpha, 3] -> u [alpha^2, O, C], or [alpha^2, C, O] when
    rotated (written in place): each point's matrix is [outputs, inputs] of the convolution U is
    for, the left operand of forward_blocks' products.
    For each output channel of the convolution U is for, its filter taps are first gathered into
    a [3, 3, inputs] slab, so that the transform's inner loops run along the input channels
    (contiguous, vectorised). Gathering in place replaces transposed NumPy copies of the whole
    bank (and, for the input gradient, a rotated copy first), which took longer than the transform:
    at 512 x 512 x 3 x 3, F(2x2), 11.5 ms became 7.5 ms (rotated: 14.6 ms), of which the gather is
    2-2.5 ms, and 4.2 ms with G in the data's dtype (_matrices). (Gathering 8 channels at a
    time, to read 72 consecutive taps instead of 9, was slower: 10.7-11.4 ms.)
    Serial: a frozen layer runs it once (Conv2d caches U in evaluation mode), and a parallel loop
    took 3 s more of compile time (measured: 30.4 against 27.6 s for the cold compile of all
    kernels, whose budget is 30 s).
    """
    alpha = g.shape[0]
    outputs, inputs = u.shape[1], u.shape[2]
    taps = np.empty((3, 3, inputs), dtype=u.dtype)
    left = np.empty((alpha, 3, inputs), dtype=u.dtype)
    for o in range(outputs):
        for c in range(inputs):
            for i in range(3):
                for j in range(3):
                    taps[i, j, c] = weight[c, o, 2 - i, 2 - j] if rotated else weight[o, c, i, j]
        for a in range(alpha):  # left = G w
            for j in range(3):
                for c in range(inputs):  # a loop: slice assignment compiles to far more code
                    left[a, j, c] = 0.0
                for i in range(3):
                    coefficient = g[a, i]
                    if coefficient != 0.0:
                        for c in range(inputs):
                            left[a, j, c] += coefficient * taps[i, j, c]
        for a in range(alpha):  # (G w) G^T
            for b in range(alpha):
                point = a * alpha + b
                for c in range(inputs):
                    u[point, o, c] = 0.0
                for j in range(3):
                    coefficient = g[b, j]
                    if coefficient != 0.0:
                        for c in range(inputs):
                            u[point, o, c] += coefficient * left[a, j, c]


@njit(**JIT_OPTIONS)
def input_transform(x_nhwc, b_t, m, pad_h, pad_w, tiles_h, tiles_w, first, rows_from, rows_to, scratch, v):
    """V[xi, row, c] = (B^T d B)[xi // alpha, xi % alpha] for rows_from <= row < rows_to: channel c
    of the size x size tile d of tile job = first + row (image n = job // T, tile t = th*tiles_w
    + tw), whose top-left pixel is (th*m - pad_h, tw*m - pad_w); zeros outside the image. b_t is
    [alpha, size]: B^T (size = alpha) for the forward pass's input tiles, or G (size = m) for the
    weight gradient's m x m tiles of dL/dy.

    Shapes: x_nhwc [N, H, W, C], b_t [alpha, size], scratch at least _transform_scratch(alpha^2,
    C) values -> v [alpha^2, rows, C] (rows rows_from to rows_to written in place): one block of
    consecutive tiles.
    Steps, for chunks of the rows of about TRANSFORM_CHUNK_VALUES tile-channels each (so that
    what a chunk writes and reads again stays in the core's first caches):
      1. unfold: D[i, j, row, c] = d[i, j] of channel c of the row's tile (zeros outside the image);
      2. L = B^T D, both sides of a matrix product: D is a [size, size * rows * C] matrix (rows i)
         and L[a] = (B^T d)[a, j] of every tile and channel, [size, rows * C] (rows j);
      3. for each a, V[a * alpha + b] = (L[a] B)[b], i.e. B^T L[a]: [alpha, size] @ [size, rows * C],
         stored straight into v's rows of this chunk at the points a * alpha + b.
    Both steps are gemm calls on this thread with long rows of data and alpha rows of
    coefficients: they run at about the speed of a copy. As loops along the channels, one per
    tile and coefficient (which they were), the setup of the many short loops cost more than
    their work: 64 @56, one thread, 2.3-2.6 -> 1.65 ms; at 128 channels and more the same as
    before (0.9-1.1 ms at 128 @28).
    Serial: called for (part of) one block by one thread of the callers' parallel loops.
    """
    batch, height, width, channels = x_nhwc.shape
    alpha, size = b_t.shape
    tiles = tiles_h * tiles_w
    no = np.bool_(False)
    overwrite = np.float64(0.0)
    by_point = v.reshape((alpha, alpha, v.shape[1] * channels))  # [a, b, (row, c)]
    chunk = max(1, TRANSFORM_CHUNK_VALUES // channels)
    for start in range(rows_from, rows_to, chunk):
        stop = min(start + chunk, rows_to)
        values = (stop - start) * channels
        unfolded = scratch[:size * size * values].reshape((size, size, stop - start, channels))
        left = scratch[size * size * values:(size + alpha) * size * values].reshape((alpha, size * values))
        for row in range(start, stop):
            job = first + row
            n = job // tiles
            th = (job % tiles) // tiles_w
            tw = job % tiles_w
            for i in range(size):
                h = th * m - pad_h + i
                for j in range(size):
                    w = tw * m - pad_w + j
                    if 0 <= h < height and 0 <= w < width:
                        for c in range(channels):
                            unfolded[i, j, row - start, c] = x_nhwc[n, h, w, c]
                    else:
                        for c in range(channels):
                            unfolded[i, j, row - start, c] = 0.0
        gemm(b_t, unfolded.reshape((size, size * values)), left, no, overwrite, no)
        for a in range(alpha):
            gemm(b_t, left[a].reshape((size, values)), by_point[a][:, start * channels:stop * channels], no, overwrite,
                 no)


@njit(**JIT_OPTIONS)
def output_transform(mm, a_t, tiles_h, tiles_w, first, o_first, bias, residual, channels_last, lower, upper,
                     scratch, y):
    """y[n, o_first + o, th*m + i, tw*m + j] = clamp((A^T M A)[i, j] + bias[o_first + o] (+ the
    same element of residual)) for the points M[:, o, row] of tile job = first + row (numbered as
    in input_transform), dropping the positions of the last tiles that fall outside the output.

    Shapes: mm [alpha^2, O', rows] (one block of consecutive tiles, output channels o_first to
    o_first + O', each channel's tiles contiguous), a_t [m, alpha], bias [O], residual [N, O, Ho,
    Wo] or [0, 0, 0, 0] (none: a residual block's shortcut, added before the clamp), scratch at
    least _transform_scratch(alpha^2, rows) values -> y [N, O, Ho, Wo], or [N, Ho, Wo, O] when
    channels_last (then without a residual), written in place at this block's tiles and channels
    only.
    Steps, for chunks of the channels of about TRANSFORM_CHUNK_VALUES channel-tiles each (so that
    what a chunk writes and reads again stays in the core's first caches; M[a, b] below is point
    a * alpha + b):
      1. for each b, P[:, b] = A^T M[:, b]: [m, alpha] @ [alpha, O'' * rows], so that
         P[i, b] = (A^T M)[i, b] of every channel and tile;
      2. for each i, Y[i] = P[i]^T A: [O'' * rows, alpha] @ [alpha, m], i.e. row (o, tile) of Y[i]
         holds the m outputs (A^T M A)[i, :] of that tile: each channel's outputs of image row
         th*m + i lie in Y[i] in the order of the image row, m per tile, tile after tile;
      3. for each channel and each run of the block's tiles along one tile row, that stretch of
         Y[i] + bias (+ residual), clamped, stored as one stretch of the output row; or, when
         channels_last, each output pixel's values gathered across the channels.
    Why this order: with the tiles of each channel contiguous (the products write M as U V^T,
    forward_blocks), step 2's product leaves the outputs in the output's own row order, so the
    stores run along image rows; from M [alpha^2, rows, O'] (which it was) each pixel's channels
    went to O' different planes, and the stores took more time than the two products
    (ResNet-18's 64 @56, batch 8, 2 threads: the whole convolution 4.7-5.1 -> 3.7-3.9 ms).
    Math: clamp as add_channel_bias: (lower, upper) = (0, inf) is a fused ReLU.
    Serial: called for one block by one thread of the callers' parallel loops.
    """
    out_h = y.shape[1] if channels_last else y.shape[2]
    out_w = y.shape[2] if channels_last else y.shape[3]
    _, out_channels, rows = mm.shape
    m, alpha = a_t.shape
    no, yes = np.bool_(False), np.bool_(True)
    overwrite = np.float64(0.0)
    by_point = mm.reshape((alpha, alpha, out_channels * rows))  # [a, b, (o, row)]
    tiles = tiles_h * tiles_w
    chunk = max(1, TRANSFORM_CHUNK_VALUES // rows)
    for start in range(0, out_channels, chunk):
        stop = min(start + chunk, out_channels)
        values = (stop - start) * rows
        partial = scratch[:m * alpha * values].reshape((m, alpha, values))
        result = scratch[m * alpha * values:m * (alpha + 1) * values].reshape((stop - start, rows * m))
        for b in range(alpha):
            gemm(a_t, by_point[:, b, start * rows:stop * rows], partial[:, b], no, overwrite, no)
        for i in range(m):
            gemm(partial[i], a_t, result.reshape((values, m)), yes, overwrite, yes)  # result[o, row*m + j] = Y[i, j]
            row = 0
            while row < rows:  # one run of tiles along a tile row at a time
                job = first + row
                n = job // tiles
                th = (job % tiles) // tiles_w
                tw = job % tiles_w
                run = min(rows - row, tiles_w - tw)
                h = th * m + i
                w_first = tw * m
                width = min(run * m, out_w - w_first)
                if h < out_h:
                    for o in range(start, stop):
                        channel = o_first + o
                        shift = bias[channel]
                        stretch = result[o - start, row * m:row * m + width]
                        if channels_last:
                            for k in range(width):
                                y[n, h, w_first + k, channel] = clamp(stretch[k] + shift, lower, upper)
                        elif residual.shape[0] == 0:
                            target = y[n, channel, h, w_first:w_first + width]
                            for k in range(width):
                                target[k] = clamp(stretch[k] + shift, lower, upper)
                        else:
                            target = y[n, channel, h, w_first:w_first + width]
                            shortcut = residual[n, channel, h, w_first:w_first + width]
                            for k in range(width):
                                target[k] = clamp(stretch[k] + shift + shortcut[k], lower, upper)
                row += run


@njit(**PARALLEL_JIT_OPTIONS)
def to_channels_last(x, out):
    """out[n, h, w, c] = x[n, c, h, w]: [N, C, H, W] -> [N, H, W, C].

    NumPy's copy of the transposed view runs 4-15x slower here (and slowest on power-of-two sizes,
    whose strides alias in the cache): one image row of every channel at a time instead.
    Parallel: over (n, h) rows of the output, each written by one iteration. (Serial, it took
    1.58 ms against 0.35 ms at 8 x 64 x 56 x 56 and 4.6 against 2.6 ms at 8 x 128 x 56 x 56, 2
    threads: a quarter of a ResNet-18 layer1 convolution.)
    """
    batch, channels, height, width = x.shape
    for job in prange(batch * height):
        n = job // height
        h = job % height
        for c in range(channels):
            row = x[n, c, h]
            for w in range(width):
                out[n, h, w, c] = row[w]


def _channels_last(x):
    """x [N, C, H, W] as a C-contiguous channels-last [N, H, W, C]: x's own memory where x is a
    view of such an array (a Winograd layer's channels-last output, winograd_conv2d_forward), else
    a copy."""
    view = x.transpose(0, 2, 3, 1)
    if view.flags.c_contiguous:
        return view
    out = memory.empty(view.shape, x.dtype)
    to_channels_last(np.ascontiguousarray(x), out)
    return out


@njit(**JIT_OPTIONS)
def _transform_scratch(alpha2, unit):
    """How many values of scratch input_transform and output_transform need at most, for alpha^2
    points and chunks of ``unit`` values or more (input_transform's chunks are whole tiles of C
    channels, output_transform's whole channels of a block's rows): a chunk of at most
    max(TRANSFORM_CHUNK_VALUES, unit) values, unfolded (alpha^2 values each) and once
    transformed (alpha^2 again)."""
    return 2 * alpha2 * max(TRANSFORM_CHUNK_VALUES, unit)


def _block_scratch_values(alpha2, block_rows, channels, out_channels):
    """The values of one thread's scratch in forward_blocks (the block's transformed tiles of both
    sides, then the transforms' own scratch, which between the transforms also holds one point's
    products tile by tile, [rows, O], where forward_blocks reads its filters inputs-major): what
    _block_views cuts it into."""
    return (alpha2 * block_rows * (channels + out_channels)
            + max(_transform_scratch(alpha2, max(channels, out_channels, block_rows)), block_rows * out_channels))


@njit(**JIT_OPTIONS)
def _block_views(scratch, alpha2, block_rows, rows, channels, out_channels):
    """A block's V [alpha2, rows, C] and M [alpha2, rows, O] (C-contiguous, so each kernel compiles
    once; forward_blocks reshapes M to [alpha2, O, rows]) and the transforms' scratch, cut from a
    flat scratch of _block_scratch_values(alpha2, block_rows, C, O) values or more. The scratch
    comes from the Python driver, on recycled memory (kernels/memory.py): allocated in the
    kernels, it was fresh pages on every call once other code in the process had made glibc hand
    its heap top back (page faults: see docs/speed.md)."""
    outputs = alpha2 * block_rows * channels
    transforms = outputs + alpha2 * block_rows * out_channels
    return (scratch[:alpha2 * rows * channels].reshape((alpha2, rows, channels)),
            scratch[outputs:outputs + alpha2 * rows * out_channels].reshape((alpha2, rows, out_channels)),
            scratch[transforms:])


@njit(**PARALLEL_JIT_OPTIONS)
def forward_blocks(x_nhwc, b_t, a_t, u, inputs_major, m, pad_h, pad_w, tiles_h, tiles_w, block_rows, tile_shares,
                   channel_shares, bias, residual, channels_last, lower, upper, scratch, y):
    """The Winograd forward pass of every tile, block by block: for each block of at most
    block_rows consecutive tiles, V = input_transform, M[xi] = U[xi] V[xi]^T for each of the
    alpha^2 points (gemm, on this thread; M [O', rows] holds each channel's tiles contiguous, the
    order output_transform stores fastest from), then output_transform into y.

    Shapes: x_nhwc [N, H, W, C], u [alpha^2, O, C] (or, when inputs_major, [alpha^2, C, O]: the
    forward pass's filters, reused by its input gradient, winograd_conv2d_backward_input; C is
    then this convolution's input channels, the forward pass's outputs), bias [O],
    residual [N, O, Ho, Wo] or [0, 0, 0, 0] (none; see output_transform),
    scratch [tile_shares * channel_shares, values] (a row per share, _block_views)
    -> y [N, O, Ho, Wo], or [N, Ho, Wo, O] when channels_last (in place).
    Parallel: over tile_shares x channel_shares shares, one per thread: contiguous shares of the
    N*T tiles, and for each, contiguous shares of the O output channels (the products'
    rows, U[xi][lo:hi]). Each share's blocks run start to end on its thread, so a block's V
    and M stay in that core's cache between the steps, and each output depends on nothing but its
    own tile and channel. Splitting the channels is for layers with few tiles (ResNet's 7 x 7
    stage): each thread then reads its part of U instead of all of it, and each thread
    transforms the block's input tiles itself, a small cost there.
    """
    alpha2 = u.shape[0]
    out_channels, channels = (u.shape[2], u.shape[1]) if inputs_major else (u.shape[1], u.shape[2])
    no, yes, overwrite = np.bool_(False), np.bool_(True), np.float64(0.0)
    jobs = x_nhwc.shape[0] * tiles_h * tiles_w
    for share in prange(tile_shares * channel_shares):
        first, stop = _share(jobs, tile_shares, share // channel_shares)
        o_first, o_stop = _share(out_channels, channel_shares, share % channel_shares)
        width = o_stop - o_first
        if width == 0 or stop == first:  # more shares than channels or tiles
            continue
        for start in range(first, stop, block_rows):
            rows = min(block_rows, stop - start)
            v, mm, transforms = _block_views(scratch[share], alpha2, block_rows, rows, channels, width)
            mm = mm.reshape((alpha2, width, rows))
            input_transform(x_nhwc, b_t, m, pad_h, pad_w, tiles_h, tiles_w, start, np.int64(0), rows, transforms, v)
            for xi in range(alpha2):
                if inputs_major:
                    # U^T V^T would be gemm's TT case, which gave wrong results here when two threads
                    # ran it at once (OpenBLAS 0.3.31's AVX-512 kernels; docs/speed.md): V U tile by
                    # tile instead, turned to M's layout in the core's cache.
                    by_tile = transforms[:rows * width].reshape((rows, width))
                    gemm(v[xi], u[xi][:, o_first:o_stop], by_tile, no, overwrite, no)
                    products = mm[xi]
                    for o in range(width):
                        for row in range(rows):
                            products[o, row] = by_tile[row, o]
                else:
                    gemm(u[xi][o_first:o_stop], v[xi], mm[xi], no, overwrite, yes)
            output_transform(mm, a_t, tiles_h, tiles_w, start, o_first, bias, residual, channels_last, lower, upper,
                             transforms, y)


@njit(**PARALLEL_JIT_OPTIONS)
def weight_gradient_points(x_nhwc, g_nhwc, b_t, g, m, pad_h, pad_w, tiles_h, tiles_w, block_rows, parts, scratch,
                           sums):
    """The weight gradient's sum over all tiles, per point: sums[xi] = sum over the tiles of
    (G g G^T)[xi]^T (B^T d B)[xi], block by block. For each block of at most block_rows
    consecutive tiles: the input tiles transformed by B^T and the m x m tiles of dL/dy by G, the
    tiles split among ``parts`` threads; then the alpha^2 products [O, rows] @ [rows, C], each
    point's on one thread, accumulated into that point's sum.

    Shapes: x_nhwc [N, H, W, C], g_nhwc [N, Ho, Wo, O], scratch flat, the block's transformed
    tiles (_block_views) and then one transform scratch per part (_transform_scratch(alpha^2,
    max(C, O)) values each) -> sums [alpha^2, O, C] (written in place:
    the first block's products overwrite, beta = 0, and the others add to them, beta = 1, so sums
    needs no zeroing first, which took 0.7 ms of 10.7 at 512 channels).
    Parallel: the transforms over shares of a block's tiles (a tile's transform is its own, however
    they are split), the products over the points. Each point's sum adds the blocks in order on
    one thread, so the result never depends on the thread count, and there are no per-thread
    partial sums of alpha^2 * O * C values to write and add (16 MiB each at 512 channels).
    """
    alpha2, out_channels, channels = sums.shape
    jobs = x_nhwc.shape[0] * tiles_h * tiles_w
    unpadded = np.int64(0)  # not a literal 0, which would compile input_transform a second time (blas.gemm)
    for start in range(0, jobs, block_rows):
        rows = min(block_rows, jobs - start)
        v, du, transform_scratch = _block_views(scratch, alpha2, block_rows, rows, channels, out_channels)
        for part in prange(parts):
            rows_from, rows_to = _share(rows, parts, part)
            per_part = transform_scratch.shape[0] // parts
            transforms = transform_scratch[part * per_part:(part + 1) * per_part]
            input_transform(x_nhwc, b_t, m, pad_h, pad_w, tiles_h, tiles_w, start, rows_from, rows_to, transforms, v)
            input_transform(g_nhwc, g, m, unpadded, unpadded, tiles_h, tiles_w, start, rows_from, rows_to, transforms,
                            du)
        beta = np.float64(0.0 if start == 0 else 1.0)
        for xi in prange(alpha2):
            gemm(du[xi], v[xi], sums[xi], np.bool_(True), beta, np.bool_(False))


@njit(**PARALLEL_JIT_OPTIONS)
def points_to_filters(sums, kron_t, grad_weight):
    """The weight gradient's output transform, dW[o, c] = A^T M[o, c] A for every (o, c), with
    M[o, c] the alpha x alpha points of sums[:, o, c]: as one product per output channel,
    dW[o][c, (i, j)] = sum_(a, b) sums[(a, b), o, c] (A^T kron A^T)[(i, j), (a, b)], i.e.
    sums[:, o, :]^T @ kron_t.

    Shapes: sums [alpha^2, O, C], kron_t [alpha^2, 9] = (A^T kron A^T)^T -> grad_weight [O, C, 3, 3]
    (written in place).
    Parallel: over the output channels, gemm on each thread. As one NumPy product on OpenBLAS's
    threads right after weight_gradient_points' parallel loops, the two pools took turns on the
    cores: with torch imported first (whose OpenMP threads spin ~4 ms after each loop) 8 x 512 x
    7 x 7's weight gradient took 7.2-8.8 ms against 5.9-6.4 with npanomaly first.
    """
    alpha2, out_channels, channels = sums.shape
    for o in prange(out_channels):
        gemm(sums[:, o, :], kron_t, grad_weight[o].reshape((channels, 9)), np.bool_(True), np.float64(0.0),
             np.bool_(False))


def _thread_shares(jobs):
    """How many shares a kernel splits ``jobs`` tiles into: one per Numba thread of the calling
    thread (what threads.share_cores narrows on a busy machine), at most one per tile."""
    return max(1, min(numba.get_num_threads(), jobs))


_MATRICES = {}


def _matrices(m, dtype, r=3):
    """transform_matrices(m, r) (A^T, G, B^T) in dtype, made once per process: F(m x m, 3 x 3) for
    the forward pass, F(3 x 3, m x m) (m=3, r=m) for the weight gradient."""
    key = (m, r, np.dtype(dtype))
    if key not in _MATRICES:
        # C layout for all: a kernel compiles once per layout of each argument. In the data's
        # dtype, G too: with float64 coefficients the float32 filter transform ran its sums in
        # float64, half as many per vector, plus conversions (512 x 512 filters, F(2x2): 7.3
        # against 4.2 ms); the largest forward error on the wide_resnet50_2 shapes moved within
        # its spread (F(2x2) 3.7-6.5e-7 unchanged, F(4x4) 6.9e-6-1.02e-5 -> 7.5e-6-1.08e-5).
        _MATRICES[key] = tuple(np.ascontiguousarray(t, dtype) for t in transform_matrices(m, r))
    return _MATRICES[key]


@functools.lru_cache(maxsize=None)
def filter_reversal(m, r=3):
    """(perm, signs) with (G J)[k] = signs[k] G[perm[k]], J the reversal of the r taps, when G's
    rows are closed under reversal up to sign, else None.

    Reversing the taps reverses the polynomial, g_rev(x) = x^(r-1) g(1/x), so the value at point p
    becomes p^(r-1) g(1/p): a set of points closed under p -> 1/p (0 and infinity swapping) turns
    G J into a signed permutation S = diag(signs) P of G's rows. F(2, 3)'s points 0, 1, -1 and
    infinity are; F(4, 3)'s 2 and -2 are not. Then the input gradient's filters, turned by 180
    degrees, transform to G J w J G^T = S U S^T, the forward pass's U with its points relabelled and
    signed, and since S U S^T * V = P [U * (S^T V S)] P^T,

        Y = (A^T P) [ U * ((S^T B^T) d (B S)) ] (P^T A):

    the forward pass's U itself, with A^T P and S^T B^T in place of A^T and B^T (_reversed_matrices),
    and no filter transform at all."""
    _, g, _ = transform_matrices(m, r)
    reversed_rows = g[:, ::-1]
    perm, signs = [], []
    for row in reversed_rows:
        for k, candidate in enumerate(g):
            for sign in (1.0, -1.0):
                if np.array_equal(row, sign * candidate):
                    perm.append(k)
                    signs.append(sign)
                    break
            else:
                continue
            break
        else:
            return None
    return np.array(perm), np.array(signs)


def _reversed_matrices(m, dtype):
    """(A^T P, S^T B^T) of filter_reversal, in dtype: the transforms with which the forward pass's
    filters U give the input gradient's convolution (None where F(m, 3) has no such symmetry)."""
    key = ("reversed", m, np.dtype(dtype))
    if key not in _MATRICES:
        symmetry = filter_reversal(m)
        if symmetry is None:
            _MATRICES[key] = None
        else:
            perm, signs = symmetry
            a_t, _, b_t = transform_matrices(m)
            p = np.zeros((m + 2, m + 2))
            p[np.arange(m + 2), perm] = 1.0
            s = signs[:, None] * p
            _MATRICES[key] = (np.ascontiguousarray(a_t @ p, dtype), np.ascontiguousarray(s.T @ b_t + 0.0, dtype))
    return _MATRICES[key]


def winograd_filters(weight, m=4, rotated=False):
    """The transformed filters U [alpha^2, O, C] of weight [O, C, 3, 3] for F(m x m, 3 x 3); when
    rotated, U [alpha^2, C, O] of the input gradient's filters (filter_transform): the
    convolution's [outputs, inputs] at each point."""
    weight = np.ascontiguousarray(weight)
    out_channels, channels = weight.shape[:2]
    _, g, _ = _matrices(m, weight.dtype)
    outputs, inputs = (channels, out_channels) if rotated else (out_channels, channels)
    u = memory.empty(((m + 2) ** 2, outputs, inputs), weight.dtype)
    filter_transform(weight, g, rotated, u)
    return u


def winograd_conv2d_forward(x, weight, bias, pad_h, pad_w, m=4, lower=-np.inf, upper=np.inf, filters=None,
                            x_nhwc=None, _reversed=False, residual=None, channels_last=False):
    """A 3x3 stride-1 convolution (as conv2d_forward) by Winograd's F(m x m, 3 x 3), m = 2 or 4.

    Shapes: x [N, C, H, W], weight [O, C, 3, 3] (unread, and may be None, when ``filters`` are given),
    bias [O] or None -> y [N, O, Ho, Wo], Ho = H + 2 pad_h - 2. Steps: the filter transform U
    (winograd_filters; pass ``filters`` [alpha^2, O, C] to reuse one, as a frozen layer does) and a
    channels-last copy of x; then forward_blocks runs the N*T tiles in blocks of about
    WINOGRAD_BLOCK_BYTES (kernels/_config.py), one share of them per thread (or, with fewer
    tiles than a block per thread, all of them for one share of the output channels per thread,
    _forward_shares): the block's input transform V, the alpha^2 products M[xi] = U[xi] @ V[xi]^T
    by gemm on that thread, and the output transform, which adds the bias and a fused ReLU. A
    block's V and M (alpha^2 * rows * (C + O') values, O' the thread's output channels) are what
    one core keeps in its cache between the steps.
    ``x_nhwc``: x's channels-last copy where the caller has made one already (winograd_conv2d_backward).
    ``_reversed``: ``filters`` are the forward pass's U [alpha^2, O, C] of the convolution whose input
    gradient this is (winograd_conv2d_backward_input).
    ``residual`` [N, O, Ho, Wo]: added before the clamp, (conv + bias) + residual, as conv2d_forward's.
    ``channels_last``: y's memory is channels-last, [N, Ho, Wo, O], returned as its [N, O, Ho, Wo]
    view (not C-contiguous): for a next Winograd layer, which reads it without a copy
    (_channels_last); any other reader sees the same values (a copy where it needs one).
    x may be such a view itself.
    """
    if channels_last and residual is not None:
        raise ValueError("channels_last: a residual is added to an [N, O, Ho, Wo] output only")
    batch, channels, height, width = x.shape
    u = winograd_filters(weight, m) if filters is None else filters
    out_channels = u.shape[2] if _reversed else u.shape[1]
    out_h = conv2d_output_size(height, 3, 1, pad_h)
    out_w = conv2d_output_size(width, 3, 1, pad_w)
    a_t, _, b_t = _matrices(m, x.dtype)
    if _reversed:
        a_t, b_t = _reversed_matrices(m, x.dtype)
    alpha = m + 2
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    x_nhwc = _channels_last(x) if x_nhwc is None else x_nhwc
    y = memory.empty((batch, out_h, out_w, out_channels) if channels_last else (batch, out_channels, out_h, out_w),
                     x.dtype)
    zeros = np.zeros(out_channels, x.dtype) if bias is None else bias
    jobs = batch * tiles_h * tiles_w
    tile_shares, channel_shares = _forward_shares(jobs, out_channels, numba.get_num_threads())
    block_rows = _block_rows(alpha, channels + out_channels // channel_shares, x.itemsize,
                             _config.WINOGRAD_BLOCK_BYTES)
    block_rows = min(block_rows, -(-jobs // tile_shares))
    shortcut = np.empty((0, 0, 0, 0), x.dtype) if residual is None else checked_residual(residual, x.dtype, y.shape)
    scratch = memory.empty((tile_shares * channel_shares, _block_scratch_values(
        alpha * alpha, block_rows, channels, -(-out_channels // channel_shares))), x.dtype)
    with threads.single_threaded_blas():
        forward_blocks(x_nhwc, b_t, a_t, u, _reversed, m, pad_h, pad_w, tiles_h, tiles_w, block_rows, tile_shares,
                       channel_shares, zeros, shortcut, channels_last, lower, upper, scratch, y)
    return y.transpose(0, 3, 1, 2) if channels_last else y


def _forward_shares(jobs, out_channels, workers):
    """(tile shares, channel shares) of forward_blocks for ``workers`` threads: the tiles shared
    out, unless there are fewer than WINOGRAD_MIN_BLOCK_TILES per thread and at least
    WINOGRAD_MIN_SHARE_CHANNELS output channels per thread: then every thread runs every tile, for
    its share of the output channels."""
    if (workers > 1 and jobs < workers * _config.WINOGRAD_MIN_BLOCK_TILES
            and out_channels >= workers * _config.WINOGRAD_MIN_SHARE_CHANNELS):
        return 1, workers
    return max(1, min(workers, jobs)), 1


def _block_rows(alpha, channels, itemsize, budget):
    """Tiles per block: as many as keep alpha^2 * rows * channels values within ``budget`` bytes,
    and never fewer than WINOGRAD_MIN_BLOCK_TILES (products of fewer rows run far below BLAS's speed)."""
    return max(_config.WINOGRAD_MIN_BLOCK_TILES, budget // (alpha * alpha * channels * itemsize))


def winograd_conv2d_backward_weight(grad_out, x, pad_h, pad_w, m=4, grad_out_nhwc=None):
    """Gradient of a 3x3 stride-1 convolution with respect to its filters, by Winograd F(3x3, m x m).

    Shapes: grad_out [N, O, Ho, Wo], x [N, C, H, W] -> grad_weight [O, C, 3, 3].
    Gradient: dL/dw[o, c, i, j] = sum_{n, y, x} dL/dy[n, o, y, x] x[n, c, y + i - pad_h, x + j - pad_w].
    Per m x m tile of dL/dy this is a correlation of the (m + 2) x (m + 2) input tile d with the
    tile g as the filter, 3 x 3 outputs: F(3 x 3, m x m), whose B^T is the forward pass's (the same
    points) and whose G, A^T come from transform_matrices(3, m). The sum over tiles and images
    moves inside the transforms:
        dW[o, c] = A^T [ sum_tiles (G g_o G^T) * (B^T d_c B) ] A,
    so the alpha^2 products are [O, tiles] @ [tiles, C], long in the summed dimension (BLAS's best
    case), in blocks of about WINOGRAD_GRADIENT_BLOCK_BYTES, and the input tiles are
    transformed exactly as in the forward pass. Each point's sum runs on one thread over all the
    blocks in order (weight_gradient_points): no partial sums, and no dependence on the threads.
    ``grad_out_nhwc``: dL/dy's channels-last copy where the caller has made one already.
    """
    grad_out, x = np.ascontiguousarray(grad_out), np.ascontiguousarray(x)
    batch, channels, height, width = x.shape
    out_channels, out_h, out_w = grad_out.shape[1:]
    a_t, g, b_t = _matrices(3, x.dtype, r=m)
    alpha = m + 2
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    x_nhwc = _channels_last(x)
    g_nhwc = _channels_last(grad_out) if grad_out_nhwc is None else grad_out_nhwc
    jobs = batch * tiles_h * tiles_w
    block_rows = _block_rows(alpha, channels + out_channels, x.itemsize, _config.WINOGRAD_GRADIENT_BLOCK_BYTES)
    block_rows = -(-jobs // -(-jobs // block_rows))  # blocks of equal length: no short last product
    if jobs == 0:  # an empty batch: no block overwrites sums
        return np.zeros((out_channels, channels, 3, 3), x.dtype)
    sums = memory.empty((alpha * alpha, out_channels, channels), x.dtype)
    parts = _thread_shares(block_rows)
    scratch = memory.empty((_block_scratch_values(alpha * alpha, block_rows, channels, out_channels)
                            + (parts - 1) * _transform_scratch(alpha * alpha, max(channels, out_channels)),), x.dtype)
    with threads.single_threaded_blas():
        weight_gradient_points(x_nhwc, g_nhwc, b_t, g, m, pad_h, pad_w, tiles_h, tiles_w, block_rows, parts, scratch,
                               sums)
        grad_weight = memory.empty((out_channels, channels, 3, 3), x.dtype)
        points_to_filters(sums, np.ascontiguousarray(np.kron(a_t, a_t).T), grad_weight)
    return grad_weight


def winograd_conv2d_backward_input(grad_out, weight, pad_h, pad_w, m=4, grad_out_nhwc=None, forward_filters=None):
    """Gradient of a 3x3 stride-1 convolution with respect to its input, by Winograd.

    Shapes: grad_out [N, O, Ho, Wo], weight [O, C, 3, 3] -> grad_x [N, C, Ho + 2 - 2 pad_h, ...].
    Gradient: dL/dx[n, c, h, w] = sum_{o, i, j} weight[o, c, i, j] dL/dy[n, o, h + pad_h - i, w + pad_w - j]:
              the forward convolution of dL/dy with weight[:, :, ::-1, ::-1] transposed to [C, O, 3, 3]
              and padding 2 - pad (needs pad <= 2).
    ``grad_out_nhwc``: dL/dy's channels-last copy where the caller has made one already.
    ``forward_filters``: the forward pass's U [alpha^2, O, C] of weight (winograd_filters(weight, m)),
    which a training layer keeps from its forward pass: for F(2x2) they are the rotated filters'
    transform up to a signed permutation of the points (filter_reversal), so the filter transform
    is skipped (at 512 x 512 channels 4.6 of its 12.7 ms at 8 x 7 x 7); ignored for F(4x4).
    """
    if forward_filters is not None and _reversed_matrices(m, grad_out.dtype) is not None:
        return winograd_conv2d_forward(grad_out, None, None, 2 - pad_h, 2 - pad_w, m,
                                       filters=forward_filters, x_nhwc=grad_out_nhwc, _reversed=True)
    rotated = winograd_filters(weight, m, rotated=True)  # U of weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    return winograd_conv2d_forward(grad_out, None, None, 2 - pad_h, 2 - pad_w, m, filters=rotated,
                                   x_nhwc=grad_out_nhwc)


def winograd_conv2d_backward(grad_out, x, weight, pad_h, pad_w, m=4, input_grad=True, forward_filters=None):
    """Both gradients of a 3x3 stride-1 convolution by Winograd, as Conv2d's backward pass runs
    them: (dL/dweight, dL/dx), dL/dx None unless input_grad. The same sums as
    winograd_conv2d_backward_weight and winograd_conv2d_backward_input, with one channels-last copy
    of dL/dy for the two instead of one each (1.2 of ~19 ms at 8 x 64 x 56 x 56).

    Shapes: grad_out [N, O, Ho, Wo], x [N, C, H, W], weight [O, C, 3, 3] -> ([O, C, 3, 3], [N, C, H, W]).
    """
    grad_out = np.ascontiguousarray(grad_out)
    g_nhwc = _channels_last(grad_out)
    grad_weight = winograd_conv2d_backward_weight(grad_out, x, pad_h, pad_w, m, grad_out_nhwc=g_nhwc)
    if not input_grad:
        return grad_weight, None
    return grad_weight, winograd_conv2d_backward_input(grad_out, weight, pad_h, pad_w, m, grad_out_nhwc=g_nhwc,
                                                       forward_filters=forward_filters)

