"""The backbones written again in plain torch (torchvision is not installable beside torch 2.13 here),
with the checkpoints' parameter names, for the oracle tests."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class SameConv(nn.Conv2d):
    """TensorFlow SAME padding, computed from the input size (extra row/column at the end)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    def __init__(self, c_in, c_out, expand, kernel, stride):
        super().__init__()
        hidden = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = SameConv(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=1e-3)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.skip else h


class Lite(nn.Module):
    """EfficientNet-Lite0..4 from the published per-stage tables (repeats, kernel, stride, expand,
    output channels), written out by hand rather than derived with the scaling rule under test."""

    TABLES = {
        "efficientnet_lite0": ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                               (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)),
        "efficientnet_lite1": ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
                               (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320)),
        "efficientnet_lite2": ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
                               (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)),
        "efficientnet_lite3": ((1, 3, 1, 1, 24), (3, 3, 2, 6, 32), (3, 5, 2, 6, 48), (5, 3, 2, 6, 96),
                               (5, 5, 1, 6, 136), (6, 5, 2, 6, 232), (1, 3, 1, 6, 384)),
        "efficientnet_lite4": ((1, 3, 1, 1, 24), (4, 3, 2, 6, 32), (4, 5, 2, 6, 56), (6, 3, 2, 6, 112),
                               (6, 5, 1, 6, 160), (8, 5, 2, 6, 272), (1, 3, 1, 6, 448)),
    }

    def __init__(self, name="efficientnet_lite0"):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, c_in = [], 32
        self.taps = []
        for repeats, kernel, stride, expand, c_out in self.TABLES[name]:
            for r in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if r == 0 else 1))
                c_in = c_out
            self.taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        """{stage name: map} for stride4/8/16/32 and the head."""
        out = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        names = {self.taps[1]: "stride4", self.taps[2]: "stride8", self.taps[4]: "stride16", self.taps[6]: "stride32"}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in names:
                out[names[i]] = x
        out["head"] = F.relu6(self._bn1(self._conv_head(x)))
        return out


class Block(nn.Module):
    def __init__(self, inplanes, planes, stride, bottleneck, widen):
        super().__init__()
        out = planes * (4 if bottleneck else 1)
        width = planes * widen
        self.bottleneck = bottleneck
        if bottleneck:
            self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        else:
            self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.bottleneck:
            h = self.bn3(self.conv3(F.relu(h)))
        return F.relu(h + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self, bottleneck, counts, widen=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        inplanes = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for b in range(count):
                blocks.append(Block(inplanes, planes, 2 if (b == 0 and i > 0) else 1, bottleneck, widen))
                inplanes = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(inplanes, 1000)

    def forward(self, x):
        out = {}
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out[f"layer{i}"] = x
        return out


def randomise(model, seed):
    """Random weights and batch-norm statistics (fresh BN would hide mistakes in their handling)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point:
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model.eval()
