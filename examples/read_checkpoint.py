"""Read a torchvision checkpoint without torch and run the network it holds.

    python examples/read_checkpoint.py resnet18-f37072fd.pth [--arch resnet18] [--image photo.png]

The reader never runs pickled code: it resolves only what a state dict needs and checks every
tensor against its storage before reading it (docs/bad-input.md). The ResNet is rebuilt from
npanomaly's own layers with torchvision's parameter names, so the keys load one for one.
"""

import argparse

import numpy as np

from npanomaly import backbones, data
from npanomaly.checkpoint import load_torch_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50", "wide_resnet50_2"))
    parser.add_argument("--image", help="an image to describe (default: random noise)")
    args = parser.parse_args()

    state = load_torch_checkpoint(args.checkpoint)
    total = sum(value.size for value in state.values())
    print(f"{len(state)} tensors, {total:,} numbers; the first three:")
    for name in list(state)[:3]:
        print(f"  {name:<24} {state[name].shape} {state[name].dtype}")

    net = backbones.build(args.arch, weights=args.checkpoint)
    images = (data.load_images([args.image], size=(224, 224)) if args.image
              else np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32))
    for stage, features in zip(("layer2", "layer3"), net.features(images, ["layer2", "layer3"])):
        print(f"{stage}: features {features.shape}, mean {features.mean():.4f}")
    if net.classifier is not None:
        print(f"ImageNet class with the highest score: {int(np.argmax(net.logits(images)))}")


if __name__ == "__main__":
    main()
