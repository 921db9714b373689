"""The numba.cuda twins on a real GPU: each checked against its CPU kernel on real shapes, then timed.

    pip install "npanomaly[cuda]"     # numba-cuda; torch with CUDA is optional (adds a column)
    python benchmarks/bench_gpu.py [--repeats 5]

For every twin: the largest relative difference from the CPU kernel, the median time of the CPU
kernel and of the twin (host launchers: the copies to and from the device are included, as a caller
of the NumPy-in, NumPy-out twin pays them), the speed-up, and where torch sees a GPU the time of the
equivalent torch call on device tensors. Exits with a message when no GPU is usable. Under 5 minutes.
"""

import argparse
import sys
import time

import numpy as np

from _common import describe_threads, median_time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true",
                        help="toy shapes: a smoke run of this script under NUMBA_ENABLE_CUDASIM=1")
    args = parser.parse_args()
    # (batch, channels, size) of the convolution, batch-norm channels and size, knn block, coreset points
    conv_n, conv_c, conv_s, bn_c, bn_s, q_n, b_n, dim, points = (
        (1, 2, 8, 4, 4, 8, 8, 8, 64) if args.tiny else (8, 64, 128, 128, 64, 4096, 2048, 1024, 100000))
    from npanomaly import kernels as cpu
    from npanomaly.kernels import cuda as gpu_module

    print(describe_threads())

    if not gpu_module.is_available():
        print("no usable CUDA GPU here (numba.cuda.is_available() is False); nothing to measure")
        return 0
    gpu = cpu.for_device("cuda")
    try:
        import torch
        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    rng = np.random.default_rng(0)

    def arr(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    x, w, b = arr(conv_n, conv_c, conv_s, conv_s), arr(2 * conv_c, conv_c, 3, 3) * 0.05, arr(2 * conv_c)
    y = cpu.conv2d_forward(x, w, b, 2, 2, 1, 1)
    g = arr(*y.shape)
    xb = arr(conv_n, bn_c, bn_s, bn_s)
    gb = arr(*xb.shape)  # a random upstream gradient (dL/dy = x would cancel to nearly nothing)
    ones, zeros = np.ones(bn_c, np.float32), np.zeros(bn_c, np.float32)
    _, mean, var = cpu.batchnorm2d_train_forward(xb, ones, zeros, 1e-5)
    queries, bank = arr(q_n, dim), arr(b_n, dim)
    features = arr(points, 128)
    selected = rng.choice(points, 64, replace=False).astype(np.int64)

    def coreset(table):
        min_dist, nearest = np.full(points, np.inf), np.zeros(points, np.int64)
        for count in range(1, 65):
            table.update_min_distances(features, selected, count, min_dist, nearest)
        return min_dist

    cases = [
        ("conv2d_forward 8x64x128x128 k3 s2", lambda t: t.conv2d_forward(x, w, b, 2, 2, 1, 1)),
        ("conv2d_backward_input", lambda t: t.conv2d_backward_input(g, w, conv_s, conv_s, 2, 2, 1, 1)),
        ("conv2d_backward_weight", lambda t: t.conv2d_backward_weight(g, x, 3, 3, 2, 2, 1, 1)),
        ("batchnorm2d_train_forward 8x128x64x64", lambda t: t.batchnorm2d_train_forward(xb, ones, zeros, 1e-5)[0]),
        ("batchnorm2d_backward",
         lambda t: t.batchnorm2d_backward(gb, xb, ones, mean, var, 1e-5, gb, -np.inf, np.inf)[0]),
        ("relu_forward 8x128x64x64", lambda t: t.relu_forward(xb)),
        ("block_dots 4096x2048x1024", lambda t: t.block_dots(queries, bank, np.empty((q_n, b_n), np.float32))),
        ("update_min_distances 100000x128, 64 steps", coreset),
    ]
    torch_calls = {}
    if has_torch:
        import torch.nn.functional as F
        dev = torch.device("cuda")
        tx, tw, tb, txb = (torch.from_numpy(a).to(dev) for a in (x, w, b, xb))
        tq, tbank = torch.from_numpy(queries).to(dev), torch.from_numpy(bank).to(dev)
        torch_calls = {
            "conv2d_forward 8x64x128x128 k3 s2": lambda: F.conv2d(tx, tw, tb, stride=2, padding=1),
            "batchnorm2d_train_forward 8x128x64x64": lambda: F.batch_norm(txb, None, None, training=True),
            "relu_forward 8x128x64x64": lambda: torch.relu(txb),
            "block_dots 4096x2048x1024": lambda: tq @ tbank.T,
        }
    print(f"{'twin':<44} {'max rel diff':>12} {'CPU ms':>9} {'GPU ms':>9} {'speed-up':>9} {'torch ms':>9}")
    start = time.perf_counter()
    for name, call in cases:
        want, got = call(cpu), call(gpu)
        diff = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
        t_cpu = median_time(lambda: call(cpu), args.repeats)
        t_gpu = median_time(lambda: call(gpu), args.repeats)
        t_torch = ""
        if name in torch_calls:
            def timed():
                torch_calls[name]()
                torch.cuda.synchronize()
            t_torch = f"{median_time(timed, args.repeats) * 1e3:9.2f}"
        print(f"{name:<44} {diff:>12.2e} {t_cpu * 1e3:>9.2f} {t_gpu * 1e3:>9.2f} {t_cpu / t_gpu:>8.1f}x {t_torch:>9}",
              flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
