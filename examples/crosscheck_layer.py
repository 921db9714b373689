"""Cross-check one npanomaly layer against torch, number for number: forward, input gradient and
parameter gradients of a Conv2d + BatchNorm2d + ReLU block with the same weights.

    pip install torch            # only for this example; npanomaly itself never imports it
    python examples/crosscheck_layer.py [--dtype float64]

Weights go from npanomaly to torch through state_dict(): the keys, layouts and initialisation are
torch's. In float64 the two agree to ~1e-15; in float32 to float32 rounding. The convolution's bias
gradient is zero in exact arithmetic (the batch norm after it removes any constant), so both sides
print rounding noise there.
"""

import argparse

import numpy as np

from npanomaly import nn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    args = parser.parse_args()
    import torch

    dtype = np.dtype(args.dtype)
    ours = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, seed=0), nn.BatchNorm2d(8), nn.ReLU()).to(dtype)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
                                 torch.nn.ReLU()).to(getattr(torch, args.dtype))
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 16, 16)).astype(dtype)
    upstream = rng.standard_normal((4, 8, 8, 8)).astype(dtype)  # dL/dy, the same for both

    ours.train()
    y = ours(x)
    grad_x = ours.backward(upstream)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = theirs(tx)
    ty.backward(torch.from_numpy(upstream))

    def report(name, a, b):
        b = b.detach().numpy()
        print(f"{name:<28} max |difference| {np.abs(a - b).max():.2e}   (values up to {np.abs(b).max():.2e})")

    report("output", y, ty)
    report("input gradient", grad_x, tx.grad)
    names = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        report(f"gradient of {name}", param.grad, names[name].grad)
    state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        if "running" in name:
            report(f"running statistic {name}", value, state[name])


if __name__ == "__main__":
    main()
