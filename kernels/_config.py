"""The knobs of the kernel library, and nothing else.

Every block size, memory budget and compiler flag that a kernel uses lives here, so that tuning
for a machine is a one-file change and no kernel hides a magic number.
"""

# Compile options shared by every @njit kernel. ``cache=True`` writes the machine code next to the
# source (or to NUMBA_CACHE_DIR), so only the first process on a machine pays for compilation.
# fastmath stays off: the kernels are cross-checked bit-for-bit-ish against plain NumPy and torch,
# and reassociating float sums would make those comparisons depend on the compiler's mood.
JIT_OPTIONS = {"cache": True, "fastmath": False, "nogil": True}
PARALLEL_JIT_OPTIONS = dict(JIT_OPTIONS, parallel=True)
# In a parallel kernel, np.zeros (like any array expression) becomes a parallel loop of its own,
# compiled as a second gufunc: the kernels allocate np.empty and zero each plane inside their own
# loop instead (max_pool2d_backward_input compiled in 1.9 s with np.zeros, 1.0 s without).

# Long sums (batch-norm statistics, bias gradients) accumulate in float64, where letting LLVM
# reassociate the additions changes the result by a few float64 ulps and nothing at float32
# precision, but lets it vectorise the loop and break the add-latency chain: ~4x faster sums.
# Only reassociation is allowed: no NaN/inf assumptions, no approximate functions.
REDUCTION_JIT_OPTIONS = dict(PARALLEL_JIT_OPTIONS, fastmath={"reassoc"})
# the same for serial helpers called from inside parallel kernels
SERIAL_REDUCTION_JIT_OPTIONS = dict(JIT_OPTIONS, fastmath={"reassoc"})

# Convolution lowers each image to a column matrix [C*kh*kw, Ho*Wo] and multiplies it with BLAS.
# Images are processed in chunks whose column matrices together stay under this many bytes, so the
# extra memory of im2col is bounded whatever the batch size. (Before kernels/memory.py recycled the
# column matrices, 8 and 16 MiB made three times the page faults per training step and were 7-20%
# slower; with recycling, 5 MiB and 32 MiB train the Student-Teacher benchmark equally fast within
# the machine's noise, 131-160 vs 123-135 ms, and 32 MiB predicts ~10% faster.)
IM2COL_BUDGET_BYTES = 32 * 1024 * 1024

# Arrays of at least RECYCLE_MIN_BYTES made by the convolution drivers live on recycled memory
# (kernels/memory.py): when one dies its pages wait, up to RECYCLE_LIMIT_BYTES in all, for the next
# request of the same size instead of going back to the kernel and being faulted in again.
# RECYCLE_LIMIT_BYTES = 0 turns recycling off (plain np.empty). The limit holds a training step's
# arrays: an STFPM ResNet-18 step on 8 x 256 x 256 leaves ~350 MiB idle between steps, and with a
# limit of 256 MiB the least recently returned were dropped and faulted in again, ~9,000 page faults
# per step (docs/speed.md).
RECYCLE_MIN_BYTES = 1024 * 1024
RECYCLE_LIMIT_BYTES = 1024 * 1024 * 1024

# Networks in evaluation mode (frozen backbones and teachers, scoring) run as many images at a time
# as fit this many bytes of input: one RGB image of 224x224 or 256x256 in float32, ten of 64x64.
# Their activations then stay small enough for the allocator to recycle, where a fresh array over
# glibc's 32 MiB mmap threshold is page-faulted in anew on every call. Measured in separate
# processes (an in-process A/B shares the heap and misleads): the Student-Teacher training step
# 153-164 -> 138-141 ms with its page faults 6,000 -> 900 per step, ResNet-18 to layer3 206-257 ->
# 181-192 ms, EfficientNet-Lite0 unchanged. Training runs whole batches (batch statistics).
EVAL_CHUNK_BYTES = 512 * 1024
# A network with Winograd convolutions (nn.Conv2d's "auto" rule) runs eight 224 x 224 RGB images at a
# time instead: its 36 products per layer are [O, C] @ [C, tiles], too narrow for BLAS with one
# image's tiles. Measured with torch imported first, batch 8 x 224^2: ResNet-18 to layer3 320 ->
# 205 ms and wide_resnet50_2 to layer3 1714 -> 1110 ms against one image at a time (EfficientNet-Lite0,
# which has no dense 3x3 stride-1 convolutions, keeps the small chunks: 101 against 151 ms).
WINOGRAD_EVAL_CHUNK_BYTES = 8 * 3 * 224 * 224 * 4

# Winograd convolutions run each thread's share of the tiles in blocks whose transformed inputs and
# products (36 * tiles * (C + O) floats for F(4x4)) take about WINOGRAD_BLOCK_BYTES, a core's L2
# cache here, and at least WINOGRAD_MIN_BLOCK_TILES tiles, below which the products of wide layers
# run far below BLAS's speed and the filters (36 * C * O floats) are read again too often. Measured
# on the ResNet-18 and WideResNet-50 3x3 layers, batch 8, 2 threads (torch's time = 1.0x):
# 1 MiB / 64 tiles gave 0.63-1.37x; 4 MiB / 1 tile 0.70-1.52x; 16 MiB 0.73-1.75x; 1 MiB / 128
# tiles 0.68-1.23x, slower on 5 of 7 layers.
WINOGRAD_BLOCK_BYTES = 1024 * 1024
WINOGRAD_MIN_BLOCK_TILES = 64
# Where a Winograd forward pass has fewer tiles than that per thread, its threads share out the
# output channels instead, if each gets at least this many: every thread reads only its columns of
# U (36 x 512 x 512 floats, 38 MB, at ResNet's 7 x 7 stage: more than the L3 cache) instead of all
# of it. Measured, the 36 products alone at 8 x 512 x 7 x 7 (32 tiles of 4 x 4), 2 threads: 6.1-6.2
# ms by tiles, 5.2-5.3 by channels (torch's whole convolution 8.1-8.2 ms).
WINOGRAD_MIN_SHARE_CHANNELS = 64
# The weight gradient's blocks are shared by the threads (the tiles transformed in parts, then each
# point's product on one thread, winograd.weight_gradient_points) and longer: each block's products
# accumulate into the alpha^2 x O x C sums (16 MB at 512 channels), read and written once per
# block. Measured, batch 8, 2 threads, 4 / 16 / 32 MiB: 512 @14 44.5 / 44.3 / 45.3 ms, 256 @28
# 22.5 / 23.2 / 23.4, 128 @56 22.0 / 24.0 / 25.7, 64 @56 9.9 / 12.5 / 13.2, 256 @14 and 128 @28
# within 10%.
WINOGRAD_GRADIENT_BLOCK_BYTES = 4 * 1024 * 1024

# An im2col weight gradient that runs on the kernels' threads (conv2d_backward_weight by groups of
# images) sums one partial gradient per share of the images, then adds the partials in order. The
# number of shares is this (fewer where the partials would pass IM2COL_BUDGET_BYTES), never the
# thread count: threads.share_cores changes that from call to call on a busy machine, and a
# gradient must not depend on it (two fits in one process would differ in the last bits).
# (Winograd's weight gradient needs no partials: each point's sum is one thread's.) Measured, when
# Winograd's used shares, at 256 channels @14, batch 8, 2 threads: 2 / 4 / 8 shares took 28-33 /
# 15-21 / 24-70 ms.
GRADIENT_SHARES = 4

# The squared-difference loss sums its elements in this many fixed shares (kernels/reduce.py), so
# its total has the same bits whatever the thread count; several per thread keep both cores busy.
LOSS_SHARES = 16

# Nearest-neighbour search screens distances one [query block, bank block] matrix at a time
# (float32: 4096 x 2048 x 4 bytes = 32 MiB), so memory never grows with Q x M. Tall query blocks
# keep the BLAS product efficient; the shape was the fastest of five tried in bench_patchcore.
KNN_QUERY_BLOCK = 4096
KNN_BANK_BLOCK = 2048
# Each query keeps this many screening candidates beyond k for the exact float64 refinement; a
# query whose list might have missed a neighbour falls back to an exhaustive float64 scan.
KNN_EXTRA_CANDIDATES = 8
# The candidate merge counts the hits of a row this many columns at a time and walks only the
# chunks that have one; 64 and 128 were ~2x faster than whole rows, 512 no better than them.
KNN_SCREEN_CHUNK = 64

# CUDA twins: threads per block of the 1-D launches and the side of the square tiles of block_dots
# (at most 32). The simulator tests shrink both so that tiny inputs still span several blocks.
CUDA_THREADS_PER_BLOCK = 128
CUDA_TILE = 16

# The per-image convolution kernels (conv.conv2d_forward_images, conv2d_backward_images) put the
# column matrices of several images side by side until one gemm has at least this many columns:
# a 7 x 7 output gives 49 per image, too few for BLAS's kernels (and each image's weight-gradient
# product would re-read and re-write the whole [O, C*9] partial sum).
CONV_MIN_PRODUCT_COLUMNS = 256
