"""Layer kernels against torch (CPU), side by side in one process with the same thread count.

    python benchmarks/bench_layers.py [--threads 2] [--repeats 7] [--quick] [--no-compile]

Prints, for each case, the median wall time of npanomaly and of torch over --repeats runs (after a
warm-up, the two timed in turns) and their ratio (npanomaly / torch: below 1 means npanomaly is
faster). Cases: the seed backbone's convolutions on a batch of 8 RGB 256x256 images,
WideResNet-50-2 layer2/layer3 shapes (224x224 input, batch 8), batch norm alone and with its ReLU
fused in, and a whole Conv-BN-ReLU x3 training step with SGD.
Unless --no-compile, it first measures the Numba compile time of all layer kernels in a fresh
process with an empty cache, and again in a second process that loads the cache.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

from _common import add_import_order, median_times, use_threads, winograd_products


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    add_import_order(parser)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="batch 2 instead of 8 (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile-time measurement")
    parser.add_argument("--compile-only", action="store_true", help="only the compile-time measurement")
    parser.add_argument("--only", metavar="TEXT", help="only the convolution rows whose name contains TEXT "
                        "(e.g. 'resnet18 layer4'), and none of the other tables")
    return parser.parse_args()


ARGS = parse_args()
use_threads(ARGS.threads, ARGS.import_order)

import numpy as np  # noqa: E402  (after use_threads: BLAS reads its thread variables at load time)

COMPILE_SCRIPT = textwrap.dedent("""
    import time
    t0 = time.perf_counter()
    import numpy as np
    from npanomaly import nn, optim
    t1 = time.perf_counter()
    for dtype in (np.float32, np.float64):
        net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1), nn.Conv2d(16, 16, 3, padding=1),
                            nn.Conv2d(16, 2, 1)).to(dtype)  # "auto": Winograd in float32 (16 tiles), im2col in float64
        x = np.ones((2, 3, 64, 64), dtype)
        y = net(x)
        net.backward(np.ones_like(y))
        net.eval()(x)
    print(f"{t1 - t0:.2f} {time.perf_counter() - t1:.2f}")
""")


def compile_times():
    """(import s, first-call compile s) in a fresh process with an empty cache, then with the cache."""
    results = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            results.append(tuple(float(v) for v in out))
    return results



def winograd_errors():
    """The float32 error of im2col, F(2x2, 3x3) and F(4x4, 3x3) against a float64 convolution on the
    wide_resnet50_2 3x3 shapes (2 images, post-ReLU inputs, Kaiming-scaled weights)."""
    from npanomaly import kernels as K

    rng = np.random.default_rng(0)
    shapes = [(16, 16)] if ARGS.quick else [(128, 56), (256, 28), (512, 14)]
    for channels, size in shapes:
        x = np.maximum(rng.standard_normal((2, channels, size, size)), 0.0)
        w = rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2 / (9 * channels))
        exact = K.conv2d_forward(x, w, None, 1, 1, 1, 1)
        x32, w32 = x.astype(np.float32), w.astype(np.float32)
        errors = []
        for name, y in (("im2col", K.conv2d_forward(x32, w32, None, 1, 1, 1, 1)),
                        ("F(2x2)", K.winograd_conv2d_forward(x32, w32, None, 1, 1, 2)),
                        ("F(4x4)", K.winograd_conv2d_forward(x32, w32, None, 1, 1, 4))):
            errors.append(f"{name} {np.abs(y - exact).max() / np.abs(exact).max():.1e}")
        print(f"float32 error, max |y - y64| / max |y64|, {channels}->{channels} k3 @{size}: {', '.join(errors)}")


def main():
    import numba
    import torch

    from npanomaly import kernels as K
    from npanomaly.kernels.conv import im2col
    from npanomaly import nn, optim

    numba.set_num_threads(ARGS.threads)
    torch.set_num_threads(ARGS.threads)
    batch = 2 if ARGS.quick else 8
    rng = np.random.default_rng(0)
    rows = []

    def compare(name, ours, theirs, floor=None):
        t_ours, t_torch = median_times([ours, theirs], ARGS.repeats)
        t_floor = [] if floor is None else median_times([floor], ARGS.repeats)  # not in the contenders' turns
        rows.append((name, t_ours, t_torch))
        line = f"{name:<44} {t_ours * 1e3:9.2f} ms {t_torch * 1e3:9.2f} ms   {t_ours / t_torch:5.2f}x"
        if floor is not None:
            line += f"   {t_floor[0] / t_torch:5.2f}x"
        print(line, flush=True)

    print(f"threads={ARGS.threads} batch={batch} repeats={ARGS.repeats} numpy={np.__version__} "
          f"numba={numba.__version__} torch={torch.__version__}")
    if not ARGS.no_compile:
        (imp0, cold), (imp1, warm) = compile_times()
        print(f"compile all layer kernels (float32+float64): cold {cold:.1f} s, cached {warm:.1f} s "
              f"(import {imp0:.1f} s / {imp1:.1f} s)")
        if ARGS.compile_only:
            return
    print(f"{'case':<44} {'npanomaly':>12} {'torch':>12}   ratio   BLAS floor")
    print("(BLAS floor: only the matrix products that the im2col lowering must make, as NumPy's batched "
          "products on columns unfolded beforehand, over torch's whole time (the kernels' own per-image "
          "products on one pool can beat it: no pool changes). On the winograd rows: only the 16 or 36 "
          "products of F(m x m, 3 x 3), run as the kernel runs them, on inputs transformed beforehand)")

    convs = [  # name, in, out, kernel, stride, pad, size
        ("seed conv1 3->64 k3 s2 @256", 3, 64, 3, 2, 1, 256),
        ("seed conv2 64->128 k3 s2 @128", 64, 128, 3, 2, 1, 128),
        ("seed conv3 128->256 k3 s2 @64", 128, 256, 3, 2, 1, 64),
        ("wrn layer2 conv1 512->256 k1 @28", 512, 256, 1, 1, 0, 28),
        ("wrn layer2 conv2 256->256 k3 @28", 256, 256, 3, 1, 1, 28),
        ("wrn layer3 conv2 512->512 k3 @14", 512, 512, 3, 1, 1, 14),
        ("wrn layer3 conv3 512->1024 k1 @14", 512, 1024, 1, 1, 0, 14),
        ("wrn layer1 conv2 128->128 k3 @56", 128, 128, 3, 1, 1, 56),
        ("resnet18 layer1 64->64 k3 @56", 64, 64, 3, 1, 1, 56),
        ("resnet18 layer2 128->128 k3 @28", 128, 128, 3, 1, 1, 28),
        ("resnet18 layer3 256->256 k3 @14", 256, 256, 3, 1, 1, 14),
        ("resnet18 layer4 512->512 k3 @7", 512, 512, 3, 1, 1, 7),
    ]
    if ARGS.only:
        convs = [conv for conv in convs if ARGS.only in conv[0]]
    for name, cin, cout, k, s, p, size in convs:
        x = rng.standard_normal((batch, cin, size, size), dtype=np.float32)
        w = (rng.standard_normal((cout, cin, k, k), dtype=np.float32) / np.sqrt(cin * k * k)).astype(np.float32)
        b = rng.standard_normal(cout, dtype=np.float32)
        y = K.conv2d_forward(x, w, b, s, s, p, p)
        g = rng.standard_normal(y.shape, dtype=np.float32)
        xt, wt, bt, gt = (torch.from_numpy(a) for a in (x, w, b, g))

        def torch_forward():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, wt, bt, stride=s, padding=p)

        def our_backward():
            K.conv2d_backward_input(g, w, size, size, s, s, p, p)
            K.conv2d_backward_weight(g, x, k, k, s, s, p, p)
            K.conv2d_backward_bias(g)

        def torch_backward():  # what autograd runs for a conv whose input needs a gradient
            torch.ops.aten.convolution_backward(gt, xt, wt, [cout], [s, s], [p, p], [1, 1], False, [0, 0], 1,
                                                [True, True, True])

        out_size = y.shape[2]
        cols = np.empty((batch, cin * k * k, out_size * out_size), np.float32)
        im2col(x, k, k, s, s, p, p, out_size, out_size, cols)
        w2 = w.reshape(cout, -1)
        g3 = g.reshape(batch, cout, -1)
        products = np.empty((batch, cout, out_size * out_size), np.float32)
        grad_cols, grad_w2t = np.empty_like(cols), np.empty_like(w2.T)

        def forward_floor():
            np.matmul(w2, cols, out=products)

        def backward_floor():
            np.matmul(w2.T, g3, out=grad_cols)
            for image in range(batch):
                np.matmul(cols[image], g3[image].T, out=grad_w2t)

        if k == 3 and s == 1:  # what Conv2d(algorithm="auto") runs here: Winograd F(m x m, 3 x 3)
            layer = nn.Conv2d(cin, cout, 3, padding=p).eval()
            layer.weight.data, layer.bias.data = w, b
            layer.requires_grad_(False)  # frozen, as a backbone under PatchCore: its filters are known by identity
            m = layer._winograd_tile(x, (p, p)) or 4  # (or 4: the tile size where auto runs im2col)
            tiles = batch * (-(-(size + 2 * p - 2) // m)) ** 2
            winograd_floor = winograd_products((m + 2) ** 2, tiles, cin, cout, np.random.default_rng(1))
            compare(f"conv fwd  {name} (im2col)", lambda: K.conv2d_forward(x, w, b, s, s, p, p), torch_forward,
                    forward_floor)
            compare(f"conv fwd  {name} (winograd F({m}x{m}), eval)", lambda: layer(x), torch_forward, winograd_floor)

            layer.train()
            m = layer._winograd_tile(x, (p, p)) or 4  # training's tile size
            # as Conv2d decides; filters the training forward pass made and keeps for the input gradient
            reused = layer._reuses_forward_filters(g.shape, m)
            filters = K.winograd_filters(w, m) if reused else None
            weight_by_winograd, input_by_winograd = layer._winograd_backward(g.shape, m, reused)

            def our_backward():  # noqa: F811 - each gradient by Winograd where it wins, else im2col
                if weight_by_winograd and input_by_winograd:
                    K.winograd_conv2d_backward(g, x, w, p, p, m, forward_filters=filters)
                else:
                    if input_by_winograd:
                        K.winograd_conv2d_backward_input(g, w, p, p, m, forward_filters=filters)
                    else:
                        K.conv2d_backward_input(g, w, size, size, s, s, p, p)
                    if weight_by_winograd:
                        K.winograd_conv2d_backward_weight(g, x, p, p, m)
                    else:
                        K.conv2d_backward_weight(g, x, k, k, s, s, p, p)
                K.conv2d_backward_bias(g)

            how = ("im2col" if not (weight_by_winograd or input_by_winograd) else
                   f"winograd F({m}x{m})" if weight_by_winograd and input_by_winograd else
                   f"weight {'winograd' if weight_by_winograd else 'im2col'}, "
                   f"input {'winograd' if input_by_winograd else 'im2col'} F({m}x{m})")
            how += ", forward filters reused" if reused else ""
            compare(f"conv bwd  {name} ({how})", our_backward, torch_backward, backward_floor)
            continue
        compare(f"conv fwd  {name}", lambda: K.conv2d_forward(x, w, b, s, s, p, p), torch_forward, forward_floor)
        compare(f"conv bwd  {name}", our_backward, torch_backward, backward_floor)
    if ARGS.only:
        return

    winograd_errors()

    x = rng.standard_normal((batch, 128, 64, 64), dtype=np.float32)
    ones, zeros = np.ones(128, np.float32), np.zeros(128, np.float32)
    y, mean, var = K.batchnorm2d_train_forward(x, ones, zeros, 1e-5)
    g = rng.standard_normal(x.shape, dtype=np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    bn_t = torch.nn.BatchNorm2d(128)
    with torch.no_grad():
        compare("bn train fwd 128ch @64", lambda: K.batchnorm2d_train_forward(x, ones, zeros, 1e-5),
                lambda: bn_t(xt))
    yt = bn_t(xt)
    gt = torch.from_numpy(g)
    compare("bn bwd 128ch @64", lambda: K.batchnorm2d_backward(g, x, ones, mean, var, 1e-5, g, -np.inf, np.inf),
            lambda: torch.autograd.grad(yt, xt, gt, retain_graph=True))
    # batch norm with the ReLU after it fused in (as Sequential runs them) vs torch's two layers
    with torch.no_grad():
        compare("bn+relu train fwd 128ch @64", lambda: K.batchnorm2d_train_forward(x, ones, zeros, 1e-5, 0.0, np.inf),
                lambda: torch.relu(bn_t(xt)))
    activated = K.batchnorm2d_train_forward(x, ones, zeros, 1e-5, 0.0, np.inf)[0]
    rt = torch.relu(bn_t(xt))
    compare("bn+relu bwd 128ch @64",
            lambda: K.batchnorm2d_backward(g, x, ones, mean, var, 1e-5, activated, 0.0, np.inf),
            lambda: torch.autograd.grad(rt, xt, gt, retain_graph=True))

    # One training step of the seed backbone: three Conv-BN-ReLU blocks, SGD with momentum.
    net = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1, seed=0), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.Conv2d(64, 128, 3, 2, 1, seed=1), nn.BatchNorm2d(128), nn.ReLU(),
                        nn.Conv2d(128, 256, 3, 2, 1, seed=2), nn.BatchNorm2d(256), nn.ReLU())
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, 2, 1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                               torch.nn.Conv2d(64, 128, 3, 2, 1), torch.nn.BatchNorm2d(128), torch.nn.ReLU(),
                               torch.nn.Conv2d(128, 256, 3, 2, 1), torch.nn.BatchNorm2d(256), torch.nn.ReLU())
    opt = optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    topt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    images = rng.random((batch, 3, 256, 256), dtype=np.float32)
    timages = torch.from_numpy(images)

    def our_step():
        opt.zero_grad()
        out = net(images)
        net.backward(out * (2.0 / out.size), input_grad=False)  # d/dy of mean(y^2)
        opt.step()

    def torch_step():
        topt.zero_grad()
        torch.mean(twin(timages) ** 2).backward()
        topt.step()

    def our_inference():
        net.eval()(images)
        net.train()

    def torch_inference():
        twin.eval()
        with torch.no_grad():
            twin(timages)
        twin.train()

    compare("seed backbone forward (eval)", our_inference, torch_inference)
    compare("seed backbone train step (SGD)", our_step, torch_step)

    forward = [r[1] / r[2] for r in rows if "fwd" in r[0] or "forward" in r[0]]
    backward = [r[1] / r[2] for r in rows if "bwd" in r[0] or "step" in r[0]]
    print(f"geometric mean ratio: forward {np.exp(np.mean(np.log(forward))):.2f}x, "
          f"backward/step {np.exp(np.mean(np.log(backward))):.2f}x")


if __name__ == "__main__":
    main()
