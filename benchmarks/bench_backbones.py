"""Feature extraction of the pretrained architectures against the same networks in torch, one process.

    python benchmarks/bench_backbones.py [--threads 2] [--repeats 5] [--batch 8] [--size 224]

EfficientNet-Lite0 (up to its stride-16 stage and whole, as PatchCore and a classifier use it), Lite1
and Lite2 up to stride16, ResNet-18 (up to layer3 and whole) and wide_resnet50_2 up to layer3
(PatchCore's layer2 + layer3 extraction, the paper's configuration) on a batch of 8 RGB 224x224
images, eval mode, random weights
(speed does not depend on them): npanomaly vs torch (the same architecture written in torch with
the checkpoint's names, tests/torch_backbones.py). Ratio = npanomaly / torch, medians of runs timed in
turns after a warm-up.
"""

import argparse
import os
import sys

from _common import add_import_order, median_times, use_threads, winograd_products

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
add_import_order(parser)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--size", type=int, default=224)
parser.add_argument("--skip-wide", action="store_true", help="leave out wide_resnet50_2 (the slowest case)")
parser.add_argument("--only", nargs="+", metavar="NAME", help="time only these backbones (e.g. efficientnet_lite1)")
ARGS = parser.parse_args()
use_threads(ARGS.threads, ARGS.import_order)

import numpy as np  # noqa: E402  (after use_threads: BLAS reads its thread variables at load time)



def main():
    import numba
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import torch_backbones as tb

    from npanomaly import backbones

    numba.set_num_threads(ARGS.threads)
    torch.set_num_threads(ARGS.threads)
    images = np.random.default_rng(0).random((ARGS.batch, 3, ARGS.size, ARGS.size), dtype=np.float32)
    print(f"threads={ARGS.threads} batch={ARGS.batch}x3x{ARGS.size}x{ARGS.size} torch={torch.__version__}")
    cases = [("efficientnet_lite0", tb.Lite("efficientnet_lite0"), ("stride16", "head")),
             ("efficientnet_lite1", tb.Lite("efficientnet_lite1"), ("stride16",)),
             ("efficientnet_lite2", tb.Lite("efficientnet_lite2"), ("stride16",)),
             ("resnet18", tb.ResNet(False, (2, 2, 2, 2)), ("layer3", "layer4")),
             ("wide_resnet50_2", tb.ResNet(True, (3, 4, 6, 3), 2), ("layer3",))]
    if ARGS.skip_wide:
        cases = cases[:-1]
    if ARGS.only:
        cases = [case for case in cases if case[0] in ARGS.only]
    for name, twin, stages in cases:
        tb.randomise(twin, seed=0)
        ours = backbones.build(name, twin.state_dict())
        ours.net.eval().requires_grad_(False)  # frozen, as PatchCore and the Student-Teacher teacher run it
        prepared = torch.from_numpy(ours.prepare(images))
        for stage in stages:
            def torch_run():
                with torch.no_grad():
                    truncated_forward(twin, prepared, name, stage)

            products, unfold_and_products = floors(ours, images, stage)
            t_ours, t_torch = median_times([lambda: ours.features(images, [stage]), torch_run], ARGS.repeats)
            t_blas, t_unfold = median_times([products, unfold_and_products], ARGS.repeats)  # not in the contenders' turns
            print(f"{name:<19} up to {stage:<9} npanomaly {t_ours * 1e3:8.1f} ms  torch {t_torch * 1e3:8.1f} ms  "
                  f"ratio {t_ours / t_torch:.2f}x  floors: BLAS {t_blas / t_torch:.2f}x, "
                  f"+ im2col {t_unfold / t_torch:.2f}x", flush=True)
    print("(floors: only the NumPy matrix products of the dense convolutions (im2col's, or Winograd's (m+2)^2 where "
          "Conv2d ran it), then those plus the im2col unfolding they need, over torch's whole time)")


def floors(backbone, images, stage):
    """Two functions: the GEMMs backbone.features(images, [stage]) makes for its dense convolutions
    (shapes recorded from one real pass) with nothing else, and the same plus the im2col unfolding
    of every convolution that needs one (into buffers allocated beforehand). A convolution that ran
    by Winograd counts its (m+2)^2 products [O, C] @ [C, tiles] instead (no transforms). No batch norm,
    no activations, no depthwise convolutions: both are lower bounds for this design."""
    from npanomaly import kernels
    from npanomaly.kernels.conv import conv2d_output_size, im2col

    recorded, winograd = [], []
    real, real_winograd = kernels.conv2d_forward, kernels.winograd_conv2d_forward

    def recording(x, weight, bias, stride_h, stride_w, pad_h, pad_w, *fused_relu, **residual):
        recorded.append((x.copy(), weight.shape, stride_h, stride_w, pad_h, pad_w))
        return real(x, weight, bias, stride_h, stride_w, pad_h, pad_w, *fused_relu, **residual)

    def recording_winograd(x, weight, bias, pad_h, pad_w, m=4, *rest, **residual):
        tiles = x.shape[0] * (-(-(x.shape[2] + 2 * pad_h - 2) // m)) * (-(-(x.shape[3] + 2 * pad_w - 2) // m))
        winograd.append(((m + 2) ** 2, tiles, weight.shape[1], weight.shape[0]))
        return real_winograd(x, weight, bias, pad_h, pad_w, m, *rest, **residual)

    kernels.conv2d_forward, kernels.winograd_conv2d_forward = recording, recording_winograd
    try:
        backbone.features(images, [stage])
    finally:
        kernels.conv2d_forward, kernels.winograd_conv2d_forward = real, real_winograd
    rng = np.random.default_rng(0)
    layers = []
    for x, (out_channels, channels, kernel_h, kernel_w), stride_h, stride_w, pad_h, pad_w in recorded:
        out_h = conv2d_output_size(x.shape[2], kernel_h, stride_h, pad_h)
        out_w = conv2d_output_size(x.shape[3], kernel_w, stride_w, pad_w)
        rows, batch = channels * kernel_h * kernel_w, x.shape[0]
        pointwise = kernel_h == kernel_w == stride_h == stride_w == 1 and pad_h == pad_w == 0
        cols = np.empty((batch, rows, out_h * out_w), np.float32)
        cols[...] = rng.random(cols.shape[1:], np.float32)
        unfold = None if pointwise else (x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, cols)
        layers.append((rng.random((out_channels, rows), np.float32), cols,
                       np.empty((batch, out_channels, out_h * out_w), np.float32), unfold))
    winograd_layers = [winograd_products(*shape, rng) for shape in winograd]

    def products():
        for a, b, out, _ in layers:
            np.matmul(a, b, out=out)
        for run in winograd_layers:
            run()

    def unfold_and_products():
        for a, b, out, unfold in layers:
            if unfold is not None:
                im2col(*unfold)
            np.matmul(a, b, out=out)
        for run in winograd_layers:
            run()
    return products, unfold_and_products


def truncated_forward(twin, x, name, stage):
    import torch.nn.functional as F

    if name in ("resnet18", "wide_resnet50_2"):
        x = F.max_pool2d(F.relu(twin.bn1(twin.conv1(x))), 3, 2, 1)
        for i in range(1, int(stage[-1]) + 1):
            x = getattr(twin, f"layer{i}")(x)
        return x
    x = F.relu6(twin._bn0(twin._conv_stem(x)))
    last = twin.taps[4] if stage == "stride16" else len(twin._blocks) - 1
    for block in twin._blocks[: last + 1]:
        x = block(x)
    if stage == "head":
        x = F.relu6(twin._bn1(twin._conv_head(x)))
    return x


if __name__ == "__main__":
    main()
