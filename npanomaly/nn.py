"""Layers with hand-written backward passes, in torch.nn's image.

Every layer computes its forward pass with the kernels of ``npanomaly.kernels`` and, in training
mode only, keeps exactly what its backward pass needs. ``backward(grad_out)`` returns the gradient
with respect to the layer's input and *adds* the parameter gradients into ``param.grad`` (as torch's
``.backward()`` accumulates), then releases what it kept: a second ``backward`` needs a new forward.
In evaluation mode nothing is kept, so inference holds no activations.

Names, parameter layouts, initialisation and state-dict keys follow torch.nn, so weights can be
copied across in either direction and every number cross-checked.
"""

import math
import weakref

import numpy as np

from npanomaly import kernels
from npanomaly.kernels import _config, blas
from npanomaly.kernels.winograd import filter_reversal
from npanomaly._validation import (
    check_array,
    check_batch,
    check_finite,
    check_float_dtype,
    check_nonnegative_float,
    check_positive_int,
    pair,
)

__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential",
           "set_conv_algorithm"]


def _generator(seed):
    """A numpy Generator from an int seed, a Generator (used as is) or None (fresh OS entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


# id(array) -> array: the read-only copies that frozen parameters hold (_read_only_copy). Only
# arrays made here are trusted to keep their values: a read-only view of someone else's array, or
# an array that had writable views before it was marked, can still change behind it.
_FROZEN_ARRAYS = weakref.WeakValueDictionary()


def _mark_frozen(array):
    """Mark a fresh array, which nothing else refers to yet, read-only and trusted (is_frozen)."""
    array.flags.writeable = False
    _FROZEN_ARRAYS[id(array)] = array
    return array


def _read_only_copy(array):
    return _mark_frozen(np.array(array, order="C", copy=True))


def _is_frozen(array):
    """Whether ``array`` is the read-only copy held by a frozen parameter (or made from frozen ones,
    as a folded batch norm's weights): its values cannot change while it lives, so what is derived
    from it (transformed Winograd filters, folded weights) may be kept and reused by identity,
    without reading the array again on every call."""
    return _FROZEN_ARRAYS.get(id(array)) is array and not array.flags.writeable


class Parameter:
    """A learnable array and the gradient accumulated for it.

    ``data`` is the value; ``grad`` is None until a backward pass adds to it; a parameter with
    ``requires_grad=False`` (a frozen network) never receives a gradient, and its ``data`` is a
    read-only copy of the array given (that array is not changed): a frozen network can then keep
    what it derives from its weights (Winograd's transformed filters, batch norms folded into
    convolutions) without reading every weight again on each call to check it is unchanged. To
    change a frozen parameter, assign a new array to ``data``, or unfreeze it first
    (``requires_grad = True`` makes ``data`` a writable copy again).
    """

    def __init__(self, data, requires_grad=True):
        self._requires_grad = bool(requires_grad)
        self.data = data
        self.grad = None

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value if self._requires_grad else _read_only_copy(value)

    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, flag):
        flag = bool(flag)
        if flag != self._requires_grad:
            self._requires_grad = flag
            self._data = np.array(self._data, copy=True) if flag else _read_only_copy(self._data)

    @property
    def shape(self):
        return self.data.shape

    def accumulate(self, grad):
        """Add grad into .grad (the first contribution is stored as is)."""
        if not self.requires_grad:
            return
        if self.grad is None:
            self.grad = grad
        else:
            self.grad += grad

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}, requires_grad={self.requires_grad})"


class Module:
    """Base class: forward/backward plumbing, parameters, modes, dtype and state dicts.

    Subclasses implement ``_check_input`` (cheap structural checks, returns a contiguous array),
    ``_forward`` and ``_backward``; they list their parameter and buffer attribute names in
    ``_parameter_names`` and ``_buffer_names``.
    """

    _parameter_names = ()
    _buffer_names = ()
    kernels = kernels  # the kernel table (CPU); to_device("cuda") swaps in the numba.cuda twins

    def __init__(self):
        self.training = True
        self._saved = None  # what backward needs; set by a training-mode forward, freed by backward

    # ----------------------------------------------------------------- forward / backward
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """Apply the layer to a batch x [N, C, H, W] and return its output."""
        x = self._check_input(x)
        check_finite(x, "x")
        return self._forward(x)

    def backward(self, grad_out, input_grad=True):
        """Back-propagate grad_out = dL/dy through the last training-mode forward.

        Adds dL/dparam into each parameter's ``.grad`` and returns dL/dx, or None with
        ``input_grad=False`` (the first layer of a network fed with images never needs it, and
        skipping it saves a whole transposed convolution).
        """
        if self._saved is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() needs a preceding forward() in training mode "
                "(call .train() before forward; each forward allows one backward)"
            )
        grad_out = check_array(grad_out, "grad_out", len(self._saved_output_shape), self._saved_output_dtype)
        if grad_out.shape != self._saved_output_shape:
            raise ValueError(
                f"grad_out must have the shape of the forward output {self._saved_output_shape}, got {grad_out.shape}"
            )
        return self._backward(grad_out, input_grad)

    def _save(self, output, *tensors):
        """Keep what backward needs (and the output's shape and dtype to check grad_out), in training mode only."""
        if self.training:
            self._saved = tensors
            self._saved_output_shape = output.shape
            self._saved_output_dtype = output.dtype

    def _takes_activation(self):
        """Whether _forward(x, ..., lower, upper) can fuse a following ReLU (see Sequential._fused_activation)."""
        return False

    def _take_saved(self):
        """Hand the saved tensors to backward and forget them."""
        saved, self._saved = self._saved, None
        return saved

    # ----------------------------------------------------------------- structure
    def named_children(self):
        return []

    def named_parameters(self, prefix=""):
        """(name, Parameter) pairs with torch's dotted names, e.g. '0.weight'."""
        for name in self._parameter_names:
            param = getattr(self, name)
            if param is not None:
                yield prefix + name, param
        for child_name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{child_name}.")

    def parameters(self):
        """All parameters, in registration order (as torch's Module.parameters)."""
        return [param for _, param in self.named_parameters()]

    def _named_buffers(self, prefix=""):
        for name in self._buffer_names:
            yield prefix + name, name, self
        for child_name, child in self.named_children():
            yield from child._named_buffers(f"{prefix}{child_name}.")

    def state_shapes(self):
        """{state-dict key: shape} of every parameter and buffer, without copying any of them."""
        shapes = {name: param.data.shape for name, param in self.named_parameters()}
        shapes.update((name, np.shape(getattr(owner, attribute))) for name, attribute, owner in self._named_buffers())
        return shapes

    def zero_grad(self, set_to_none=True):
        """Clear the accumulated gradients (None, as torch >= 2.0 does, or zeros)."""
        for param in self.parameters():
            param.grad = None if set_to_none or param.grad is None else np.zeros_like(param.grad)

    def train(self, mode=True):
        """Training mode: batch norm uses batch statistics and layers keep what backward needs."""
        self.training = bool(mode)
        if not self.training:
            self._saved = None
        for _, child in self.named_children():
            child.train(mode)
        return self

    def eval(self):
        """Evaluation mode: running statistics, nothing kept for backward."""
        return self.train(False)

    def to_device(self, device):
        """Run this module and its children on "cpu" or "cuda" kernels (one table, chosen here once)."""
        table = kernels.for_device(device)
        self.kernels = table
        for _, child in self.named_children():
            child.to_device(device)
        return self

    def requires_grad_(self, requires_grad=True):
        """Freeze (False) or unfreeze every parameter (Parameter: a frozen one holds a read-only copy)."""
        for param in self.parameters():
            param.requires_grad = requires_grad
        return self

    def to(self, dtype):
        """Convert parameters, gradients and float buffers to float32 or float64, in place; returns self."""
        dtype = check_float_dtype(dtype)
        for param in self.parameters():
            param.data = param.data.astype(dtype)
            if param.grad is not None:
                param.grad = param.grad.astype(dtype)
        for _, attribute, owner in self._named_buffers():
            value = getattr(owner, attribute)
            if value.dtype.kind == "f":
                setattr(owner, attribute, value.astype(dtype))
        return self

    def state_dict(self, prefix=""):
        """Copies of every parameter and buffer under torch's state-dict keys, in torch's order."""
        state = {}
        for name in self._parameter_names:
            param = getattr(self, name)
            if param is not None:
                state[prefix + name] = param.data.copy()
        for name in self._buffer_names:
            state[prefix + name] = np.array(getattr(self, name), copy=True)
        for child_name, child in self.named_children():
            state.update(child.state_dict(f"{prefix}{child_name}."))
        return state

    def load_state_dict(self, state, strict=True):
        """Copy arrays from a state dict; keys and shapes are checked and mismatches named.

        With ``strict=False`` missing and unexpected keys are tolerated (shapes are still checked).
        Returns (missing_keys, unexpected_keys).
        """
        params = dict(self.named_parameters())
        buffers = {name: (attribute, owner) for name, attribute, owner in self._named_buffers()}
        expected = set(params) | set(buffers)
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if strict and (missing or unexpected):
            raise ValueError(
                f"state dict does not match {type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}"
            )
        for name in sorted(expected & set(state)):
            value = np.asarray(state[name])
            if name in params:
                target = params[name].data
            else:
                attribute, owner = buffers[name]
                target = np.asarray(getattr(owner, attribute))
            if value.shape != target.shape:
                raise ValueError(f"state dict entry {name!r} has shape {value.shape}, expected {target.shape}")
            # C order whatever the source's layout: kernels and BLAS see one layout, so results
            # do not depend on where the weights came from
            converted = np.array(value, dtype=target.dtype, order="C")
            if name in params:
                params[name].data = converted
            else:
                setattr(owner, attribute, converted if target.ndim else target.dtype.type(converted))
        return missing, unexpected

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self):
        return ""


#: Conv2d(algorithm="auto") runs Winograd from this many input and output channels and this many
#: 2 x 2 output tiles per image, whatever tile size it then uses: outputs of 7 x 7 and more (all of
#: ResNet's stages at 224 x 224). Counted per image, so that an image's result never depends on
#: how many others share its batch. Measured (docs/speed.md), batch 8 x 224^2, 2 threads:
#: ResNet-18's 512-channel 7 x 7 layer took 11.1 ms by F(2x2) against 25.9 ms by im2col (torch
#: 10.0 ms).
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_TILES = 16

#: In training, output sides from which Winograd uses 4 x 4 tiles, F(4x4, 3x3) (36 multiplications
#: per 16 outputs instead of F(2x2)'s 16 per 4); below it 2 x 2 tiles, F(2x2, 3x3), which is as
#: exact as im2col: a training step transforms its filters anew (36 against 16 alpha^2 x C x O
#: values), and 4 x 4 tiles waste 31% on 14 x 14 and 7 x 7. In evaluation mode the filters are
#: transformed once, and F(4x4) is faster on every ResNet and WideResNet shape, 7 x 7 included
#: (where the threads share the output channels, kernels/winograd.py). Measured, batch 8, 2
#: threads, over torch's time, forward with filters transformed once (evaluation) F(4x4) / F(2x2):
#: 0.77-0.81x / 0.98-1.06x at 64 @56, 0.56-0.58x / 0.78-0.81x at 128 @56, 0.59-0.63x / 0.82-0.85x at
#: 128 @28, 0.52-0.55x / 0.69-0.76x at 256 @28, 0.65-0.73x / 0.75-0.86x at 256 @14, 0.57-0.60x /
#: 0.78-0.83x at 512 @14, 0.74-0.77x / 0.92-0.95x at 512 @7 (2-7 runs each); with the filter
#: transform (training) 0.96-0.97x / 0.92-0.93x at 256 @14, 1.79-1.80x / 1.45-1.52x at 512 @7,
#: 0.66-0.68x / 0.85-0.89x at 128 @28.
WINOGRAD_LARGE_TILE_SIZE = 28


class Conv2d(Module):
    """2-D convolution, as torch.nn.Conv2d (dilation 1, zero padding).

    weight [out_channels, in_channels // groups, kh, kw] and bias [out_channels] are initialised as
    torch does: uniform in +-1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5), the same bound for the
    bias). groups = in_channels = out_channels runs the depthwise kernels; other groups run the
    dense kernels group by group. padding="same" is TensorFlow's SAME, computed for each input size
    (EfficientNet's checkpoints were trained with it).
    """

    _parameter_names = ("weight", "bias")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=np.float32, seed=None, groups=1, algorithm="auto"):
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.groups = check_positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = stride
        self.padding = padding
        self._stride = pair(stride, "stride")
        # padding="same": TensorFlow's SAME, computed for each input size; when the total is odd the
        # extra row/column goes after (bottom/right), which a symmetric padding cannot express.
        self._same = padding == "same"
        self._padding = (0, 0) if self._same else pair(padding, "padding")
        for name, values, minimum in (("kernel_size", self.kernel_size, 1), ("stride", self._stride, 1),
                                      ("padding", self._padding, 0)):
            for value in values:
                check_positive_int(value, name, minimum)
        dtype = check_float_dtype(dtype)
        rng = _generator(seed)
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        self.weight = Parameter(rng.uniform(-bound, bound, size=shape).astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, size=self.out_channels).astype(dtype)) if bias else None
        self.algorithm = algorithm
        self._winograd_filters = None  # (the weight they came from, tile size m, U), reused in evaluation mode

    @property
    def algorithm(self):
        """How a dense 3x3 stride-1 convolution is computed: "auto" (the measured rule of
        _winograd_tile), "im2col" (one product per image over unfolded columns: the same sums as
        other frameworks, for exact cross-checks) or "winograd" (kernels/winograd.py, F(4x4, 3x3)
        or F(2x2, 3x3) by the mode and size rule of _winograd_tile: 4x or 2.25x fewer
        multiplications, float32 error 20x or 1x im2col's). Other convolutions always use im2col
        (or the depthwise kernels), and so does device="cuda"."""
        return self._algorithm

    @algorithm.setter
    def algorithm(self, value):
        if value not in ("auto", "im2col", "winograd"):
            raise ValueError(f"algorithm must be 'auto', 'im2col' or 'winograd', got {value!r}")
        if value == "winograd" and not self._winograd_shape():
            raise ValueError(f"algorithm='winograd' needs a dense 3x3 stride-1 convolution with padding <= 2, got "
                             f"kernel_size={self.kernel_size}, stride={self._stride}, padding={self.padding}, "
                             f"groups={self.groups}")
        self._algorithm = value

    def _check_input(self, x):
        # in evaluation a channels-last view stays one: a Winograd call reads it without a copy
        # (_convolve copies it for the other kernels)
        x = check_batch(x, "x", self.in_channels, self.weight.data.dtype, keep_channels_last=not self.training)
        for axis, size, kernel, pad in zip(("height", "width"), x.shape[2:], self.kernel_size, self._padding):
            if size + 2 * pad < kernel and not self._same:
                raise ValueError(
                    f"x {axis} {size} plus padding 2*{pad} is smaller than the kernel ({kernel}): input shape {x.shape}"
                )
        return x

    def _same_padding(self, size, kernel, stride):
        """(before, after) zeros of TensorFlow's SAME: the output has ceil(size / stride) positions."""
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def _forward(self, x, weight=None, bias=None, lower=-np.inf, upper=np.inf, residual=None, channels_last=False):
        """The convolution; weight and bias replace the layer's own when given (a folded batch norm).

        (lower, upper) = (0, upper) fuses a following ReLU into the output pass (evaluation mode
        only, for dense and depthwise convolutions: Sequential decides, see _fused_activation).
        ``residual``: an array of the output's shape added before that clamp, a residual block's
        shortcut (only where _takes_residual). ``channels_last``: where this call runs Winograd,
        its output in channels-last memory, as an [N, O, H, W] view (Sequential asks for it when
        the next layer is a Winograd convolution, which then reads it without a copy).
        """
        height, width = x.shape[2:]
        pads, crop = self._padding, None
        if self._same:
            (top, bottom), (left, right) = (self._same_padding(n, k, s) for n, k, s in
                                            zip(x.shape[2:], self.kernel_size, self._stride))
            pads = (top, left)
            if (top != bottom or left != right) and not self._depthwise():
                # asymmetric: pad explicitly, and remember where the image sits for backward (the
                # depthwise kernel takes the output size instead and needs no padded copy)
                x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
                pads, crop = (0, 0), (slice(top, top + height), slice(left, left + width))
        if weight is None:
            weight, bias = self.weight.data, (None if self.bias is None else self.bias.data)
        y, filters = self._convolve(x, weight, bias, pads, lower, upper, residual, channels_last)
        self._save(y, x, pads, crop, filters)
        return y

    def _depthwise(self):
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    def _group_slices(self):
        c_in, c_out = self.in_channels // self.groups, self.out_channels // self.groups
        return [(slice(g * c_in, (g + 1) * c_in), slice(g * c_out, (g + 1) * c_out)) for g in range(self.groups)]

    def _takes_activation(self):
        """Whether _forward can fuse a ReLU (the dense and depthwise kernels can; grouped ones are concatenated)."""
        return self.groups == 1 or self._depthwise()

    def _takes_residual(self):
        """Whether _forward can add a residual block's shortcut in its output pass: dense
        convolutions on the CPU kernels, in evaluation mode (training keeps the sum for the ReLU's
        backward pass)."""
        return self.groups == 1 and not self.training and self.kernels is kernels

    def _winograd_output_shape(self, shape, pads):
        """[N, O, Ho, Wo] of this 3x3 stride-1 convolution on an input of ``shape`` with ``pads``."""
        return (shape[0], self.out_channels, *(n + 2 * p - 2 for n, p in zip(shape[2:], pads)))

    def _winograd_shape(self):
        return (self.kernel_size == (3, 3) and self._stride == (1, 1) and self.groups == 1
                and (self._same or max(self._padding) <= 2))

    def _winograd_tile(self, x, pads):
        """The output tile size m of this call's Winograd F(m x m, 3 x 3), or None for im2col.

        algorithm="winograd" always runs Winograd, "im2col" never; "auto" runs it when the input is
        float32 and the layer is a dense 3x3 stride-1 convolution with at least WINOGRAD_MIN_CHANNELS
        input and output channels and the call has at least WINOGRAD_MIN_TILES output tiles per
        image: below those the products are too narrow for BLAS and im2col is faster; and not
        where NumPy's BLAS is not an OpenBLAS that kernels can call (kernels/blas.py). The tile size:
        m = 4 in evaluation mode, and in training when both output sides are at least
        WINOGRAD_LARGE_TILE_SIZE, else m = 2 (measured in docs/speed.md). Counted per image, so an
        image's result never depends on its batch mates."""
        if self._algorithm == "im2col" or not hasattr(self.kernels, "winograd_conv2d_forward"):
            return None
        out_h, out_w = self._winograd_output_shape(x.shape, pads)[2:]
        m = 4 if min(out_h, out_w) >= WINOGRAD_LARGE_TILE_SIZE or not self.training else 2
        if self._algorithm == "winograd":
            return m
        if not self._winograd_shape() or max(pads) > 2 or x.dtype != np.float32:
            return None  # float64 is for exact cross-checks: it keeps im2col's sums (and compiles less)
        if blas.BACKEND != "openblas":
            return None  # Winograd's products would go through kernels/blas.py's slow NumPy callback
        tiles = -(-out_h // 2) * -(-out_w // 2)
        wide = min(self.in_channels, self.out_channels) >= WINOGRAD_MIN_CHANNELS
        return m if wide and tiles >= WINOGRAD_MIN_TILES else None

    def _winograd_backward(self, out_shape, m, reused_filters=False):
        """(weight gradient by Winograd, input gradient by Winograd) for a Winograd layer's
        backward pass: the weight gradient when the batch has at least a quarter as many m x m
        tiles as the smaller channel count, the input gradient when it has at least half as many,
        or an eighth as many where it reuses the forward pass's filters (``reused_filters``,
        _reuses_forward_filters); else each by im2col. With few tiles, the weight gradient's alpha^2
        products, [O, tiles] @ [tiles, C], write alpha^2 O x C matrices for little work, and the
        input gradient's transform of the (rotated) filters, alpha^2 O x C values, is most of its
        time. Reusing the forward pass's filters (F(2x2) only) skips that transform, at the price of
        products against transposed filters, 10-25% slower (input gradient, 2 threads, ms, im2col /
        rotated filters / forward filters reused: 8 x 512 x 7 x 7 11.5 / 12.3 / 8.8, 4 x 6.3 / 9.0 /
        5.1, 2 x 3.3 / 7.2 / 3.2, 1 x 2.1 / 6.3 / 2.3; 8 x 256 x 14 x 14 11.3 / 7.3 / 7.5, 1 x 1.5 /
        1.6 / 1.0). Measured before the reuse,
        2 threads, in turns (docs/speed.md): at 8 x 512 x 7 x 7 (128 tiles of 2 x 2) the weight
        gradient by F(2x2) took 9.6-12.0 ms against im2col's 13.6-13.7, the input gradient
        12.3-12.4 against 11.7: both by Winograd 25.0-25.5 ms, this rule's mix 22.7-23.4, both by
        im2col 25.1-25.7 (torch 20.2-20.6); at 4 x 512 x 7 x 7 17.4-18.3 / 14.8-15.8 / 14.8-15.4 ms,
        at 2 x 512 x 7 x 7 14.4-14.9 / 9.7-11.4 / 8.1-8.5. With the reuse, both by Winograd: from
        64 channels at 56 x 56 to 512 at 14 x 14 (batch 8) 0.51-1.18x torch, 8 x 512 x 7 x 7
        1.18-1.24x (bench_layers.py, docs/speed.md)."""
        tiles = out_shape[0] * -(-out_shape[2] // m) * -(-out_shape[3] // m)
        channels = min(self.in_channels, self.out_channels)
        return 4 * tiles >= channels, 2 * tiles >= channels or (reused_filters and 8 * tiles >= channels)

    def _reuses_forward_filters(self, out_shape, m):
        """Whether a training forward pass keeps its transformed filters U for the input gradient:
        where F(m x m) allows it (kernels.winograd.filter_reversal: m = 2) and _winograd_backward
        would run the input gradient by Winograd only with them (fewer than half as many tiles as
        channels, at least an eighth). Elsewhere U is not kept: alpha^2 C O values per layer."""
        if filter_reversal(m) is None:
            return False
        rotated, reused = (self._winograd_backward(out_shape, m, flag)[1] for flag in (False, True))
        return reused and not rotated

    def _winograd_filters_for(self, weight, m):
        """U for weight, kept between calls in evaluation mode, so that a backbone transforms its
        filters once per weight version and tile size; in training they change every step.
        A frozen weight (Parameter; _is_frozen, which a batch norm folded into frozen weights is
        too) is known by identity. Any other is compared by value with a copy of the one U came
        from, which reads the weight twice per call: 0.8-1.7 ms at 512 x 512 x 3 x 3, a quarter
        of the convolution's time at 8 x 7 x 7 (measured in bench_layers.py, docs/speed.md)."""
        if self.training:
            return None
        cached = self._winograd_filters
        frozen = _is_frozen(weight)
        if (cached is None or cached[1] != m or cached[0].dtype != weight.dtype
                or not ((frozen and cached[0] is weight) or np.array_equal(cached[0], weight))):
            cached = (weight if frozen else weight.copy(), m, self.kernels.winograd_filters(weight, m))
        elif frozen and cached[0] is not weight:  # the same values, now frozen: known by identity from here on
            cached = (weight, m, cached[2])
        self._winograd_filters = cached
        return cached[2]

    def _convolve(self, x, weight, bias, pads, lower, upper, residual=None, channels_last=False):
        """(y, the transformed filters U that backward reuses, or None)."""
        if residual is not None and not self._takes_residual():
            raise ValueError("a residual can only be added by a dense convolution in evaluation mode on the CPU")
        extra = {} if residual is None else {"residual": residual}
        if channels_last and self._takes_residual():  # the same condition: CPU kernels, evaluation
            extra["channels_last"] = True
        if self.groups == 1:
            m = self._winograd_tile(x, pads)
            if m is not None:
                out_shape = self._winograd_output_shape(x.shape, pads)
                kept = self.training and weight is self.weight.data and self._reuses_forward_filters(out_shape, m)
                filters = self.kernels.winograd_filters(weight, m) if kept else self._winograd_filters_for(weight, m)
                y = self.kernels.winograd_conv2d_forward(x, weight, bias, *pads, m, lower, upper, filters, **extra)
                return y, (filters if kept else None)
            extra.pop("channels_last", None)
            return self.kernels.conv2d_forward(np.ascontiguousarray(x), weight, bias, *self._stride, *pads, lower,
                                               upper, **extra), None
        x = np.ascontiguousarray(x)
        if self._depthwise():
            zeros = np.zeros(self.out_channels, x.dtype) if bias is None else bias
            out_size = [-(-n // s) if self._same else kernels.conv2d_output_size(n, k, s, p) for n, k, s, p in
                        zip(x.shape[2:], self.kernel_size, self._stride, pads)]
            return self.kernels.depthwise_conv2d_forward(x, weight, zeros, *self._stride, *pads, *out_size, lower,
                                                         upper), None
        return np.concatenate([self.kernels.conv2d_forward(np.ascontiguousarray(x[:, gi]), weight[go],
                                                      None if bias is None else bias[go], *self._stride, *pads)
                               for gi, go in self._group_slices()], axis=1), None

    def _backward(self, grad_out, input_grad):
        x, pads, crop, filters = self._take_saved()
        stride, kernel = self._stride, self.kernel_size
        m = self._winograd_tile(x, pads) if self.groups == 1 else None
        weight_by_winograd, input_by_winograd = ((False, False) if m is None else
                                                 self._winograd_backward(grad_out.shape, m, filters is not None))
        input_by_winograd = input_by_winograd and input_grad
        grad_x = None
        if weight_by_winograd and input_by_winograd:  # both gradients from one channels-last copy of dL/dy
            grad_w, grad_x = self.kernels.winograd_conv2d_backward(grad_out, x, self.weight.data, *pads, m,
                                                                   forward_filters=filters)
        elif weight_by_winograd:
            grad_w = self.kernels.winograd_conv2d_backward_weight(grad_out, x, *pads, m)
        elif self.groups == 1:
            grad_w = self.kernels.conv2d_backward_weight(grad_out, x, *kernel, *stride, *pads)
        elif self._depthwise():
            grad_w = self.kernels.depthwise_conv2d_backward_weight(grad_out, x, *kernel, *stride, *pads)
        else:
            grad_w = np.concatenate([self.kernels.conv2d_backward_weight(np.ascontiguousarray(grad_out[:, go]),
                                                                    np.ascontiguousarray(x[:, gi]), *kernel,
                                                                    *stride, *pads)
                                     for gi, go in self._group_slices()])
        self.weight.accumulate(grad_w)
        if self.bias is not None:
            self.bias.accumulate(self.kernels.conv2d_backward_bias(grad_out))
        if not input_grad:
            return None
        if grad_x is None and input_by_winograd:
            grad_x = self.kernels.winograd_conv2d_backward_input(grad_out, self.weight.data, *pads, m,
                                                                 forward_filters=filters)
        elif grad_x is None:
            grad_x = self._input_gradient(grad_out, *x.shape[2:], pads)
        if crop is not None:  # the gradient of the explicit padding's zeros is dropped
            grad_x = np.ascontiguousarray(grad_x[:, :, crop[0], crop[1]])
        return grad_x

    def _input_gradient(self, grad_out, height, width, pads):
        """dL/dx by im2col, the depthwise kernels or per group (everything but Winograd)."""
        stride = self._stride
        if self.groups == 1:
            return self.kernels.conv2d_backward_input(grad_out, self.weight.data, height, width, *stride, *pads)
        if self._depthwise():
            return self.kernels.depthwise_conv2d_backward_input(grad_out, self.weight.data, height, width, *stride,
                                                                *pads)
        return np.concatenate([self.kernels.conv2d_backward_input(np.ascontiguousarray(grad_out[:, go]),
                                                                 self.weight.data[go], height, width, *stride, *pads)
                               for gi, go in self._group_slices()], axis=1)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self._stride}, "
                f"padding={'same' if self._same else self._padding}, groups={self.groups}, "
                f"bias={self.bias is not None}"
                f"{'' if self._algorithm == 'auto' else f', algorithm={self._algorithm!r}'}")


def _may_run_winograd(module):
    """Whether module (or a layer inside it) is a convolution that Winograd may run."""
    if isinstance(module, Conv2d):
        return (module.algorithm != "im2col" and module._winograd_shape()
                and module.weight.data.dtype == np.float32
                and min(module.in_channels, module.out_channels) >= WINOGRAD_MIN_CHANNELS)
    return any(_may_run_winograd(child) for _, child in module.named_children())


def set_conv_algorithm(module, algorithm):
    """Set Conv2d.algorithm on every convolution in module (recursively) that can take it:
    "im2col" everywhere (exact cross-checks against other frameworks), "winograd" on the dense
    3x3 stride-1 ones, "auto" everywhere. Returns module."""
    for _, child in module.named_children():
        set_conv_algorithm(child, algorithm)
    if isinstance(module, Conv2d) and (algorithm != "winograd" or module._winograd_shape()):
        module.algorithm = algorithm
    return module


class BatchNorm2d(Module):
    """Batch normalisation over channels, as torch.nn.BatchNorm2d (affine, with running statistics).

    Training mode normalises with the batch's mean and biased variance and updates
    running_mean <- (1 - momentum) * running_mean + momentum * mean and running_var likewise with the
    *unbiased* variance (M / (M - 1) times the biased one, M = N*H*W). ``momentum=None`` gives the
    cumulative average over all batches seen, as in torch. Evaluation mode uses the running statistics.
    """

    _parameter_names = ("weight", "bias")
    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = check_nonnegative_float(eps, "eps")
        self.momentum = None if momentum is None else check_nonnegative_float(momentum, "momentum")
        dtype = check_float_dtype(dtype)
        self.weight = Parameter(np.ones(num_features, dtype=dtype))
        self.bias = Parameter(np.zeros(num_features, dtype=dtype))
        self.running_mean = np.zeros(num_features, dtype=dtype)
        self.running_var = np.ones(num_features, dtype=dtype)
        self.num_batches_tracked = np.int64(0)
        self._folded = None  # (frozen conv weight, the vectors folded with it, W', b'): folded_into

    def _check_input(self, x):
        x = check_batch(x, "x", self.num_features, self.weight.data.dtype)
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] < 2:
            raise ValueError(
                f"BatchNorm2d in training mode needs more than 1 value per channel, got input shape {x.shape}"
            )
        return x

    def _forward(self, x, lower=-np.inf, upper=np.inf):
        """Normalise x; (lower, upper) = (0, upper) fuses a following ReLU (Sequential decides)."""
        if not self.training:
            return self.kernels.batchnorm2d_eval_forward(x, self.weight.data, self.bias.data, self.running_mean,
                                                         self.running_var, self.eps, lower, upper)
        y, mean, var = self.kernels.batchnorm2d_train_forward(x, self.weight.data, self.bias.data, self.eps, lower,
                                                              upper)
        self.num_batches_tracked = np.int64(self.num_batches_tracked + 1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        count = x.shape[0] * x.shape[2] * x.shape[3]
        dtype = self.running_mean.dtype
        self.running_mean = ((1.0 - factor) * self.running_mean + factor * mean).astype(dtype)
        self.running_var = ((1.0 - factor) * self.running_var + factor * var * (count / (count - 1))).astype(dtype)
        # the output is kept only when a ReLU is fused: backward needs it to know where the gradient passes
        fused = lower > -np.inf or upper < np.inf
        self._save(y, x, mean, var, y if fused else None, lower, upper)
        return y

    def _takes_activation(self):
        return True

    def folded_into(self, conv):
        """(weight, bias) of one convolution equal to conv followed by this batch norm in eval mode.

        Math: bn(conv(x)) = s * (W * x + b - running_mean) + beta with s = gamma / sqrt(running_var + eps),
        so W' = s[o] * W[o] and b' = s * (b - running_mean) + beta (s and b' computed in float64, W'
        in the weight's dtype). Frozen networks run this way: one memory pass fewer per layer.
        When conv's weight is frozen (Parameter), W' is made once and kept, frozen too, while the
        batch norm's vectors and conv's bias keep their values (compared on each call: O values
        each, against a read and a write of all O*C*k*k weights to fold them again).
        """
        source = conv.weight.data
        vectors = (None if conv.bias is None else conv.bias.data, self.weight.data, self.bias.data,
                   self.running_mean, self.running_var, self.eps)
        cached = self._folded
        if (cached is not None and cached[0] is source and _is_frozen(source) and len(cached[1]) == len(vectors)
                and all(np.array_equal(a, b) if a is not None else b is None for a, b in zip(cached[1], vectors))):
            return cached[2], cached[3]
        dtype = source.dtype
        scale = self.weight.data / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        conv_bias = 0.0 if conv.bias is None else conv.bias.data.astype(np.float64)
        weight = source * scale.astype(dtype).reshape(-1, 1, 1, 1)  # one pass, in the weight's dtype
        bias = ((conv_bias - self.running_mean) * scale + self.bias.data).astype(dtype)
        if _is_frozen(source):  # kept, and frozen itself, so that the convolution's filter cache knows it
            self._folded = (source, tuple(None if v is None else np.array(v, copy=True) for v in vectors),
                            _mark_frozen(weight), bias)
        return weight, bias

    def _backward(self, grad_out, input_grad):
        x, mean, var, activated, lower, upper = self._take_saved()
        # without a fused ReLU every finite gradient passes the (-inf, inf) test; grad_out stands
        # in for the output so that no other array is read
        activated = grad_out if activated is None else activated
        grad_x, grad_weight, grad_bias = self.kernels.batchnorm2d_backward(grad_out, x, self.weight.data, mean, var,
                                                                           self.eps, activated, lower, upper)
        self.weight.accumulate(grad_weight)
        self.bias.accumulate(grad_bias)
        return grad_x if input_grad else None

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ReLU(Module):
    """max(x, 0), elementwise, as torch.nn.ReLU."""

    upper = np.inf

    def _check_input(self, x):
        return check_array(x, "x", 4)

    def _forward(self, x):
        y = self.kernels.relu_forward(x, self.upper)
        # The output lies inside (0, upper) exactly where the input does, so keeping y (which the
        # next layer keeps anyway) costs no extra memory.
        self._save(y, y)
        return y

    def _absorbed(self, y):
        """The layer before computed this ReLU (its output y): in training mode, backward passes
        the gradient through and the layer before applies the ReLU's mask with its own."""
        self._save(y, None)

    def _backward(self, grad_out, input_grad):
        (y,) = self._take_saved()
        if not input_grad:
            return None
        return grad_out if y is None else self.kernels.relu_backward_input(grad_out, y, self.upper)


class ReLU6(ReLU):
    """min(max(x, 0), 6), as torch.nn.ReLU6 (MobileNet, EfficientNet-Lite)."""

    upper = 6.0


class _Pool2d(Module):
    """Shared checks of the pooling layers (floor mode, padding at most half the kernel, like torch)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self._kernel = pair(kernel_size, "kernel_size")
        self._stride = pair(self.stride, "stride")
        self._padding = pair(padding, "padding")
        for name, values, minimum in (("kernel_size", self._kernel, 1), ("stride", self._stride, 1),
                                      ("padding", self._padding, 0)):
            for value in values:
                check_positive_int(value, name, minimum)
        if any(2 * p > k for p, k in zip(self._padding, self._kernel)):
            raise ValueError(f"padding {self._padding} must be at most half of kernel_size {self._kernel}")

    def _check_input(self, x):
        x = check_batch(x, "x")
        for axis, size, kernel, pad in zip(("height", "width"), x.shape[2:], self._kernel, self._padding):
            if size + 2 * pad < kernel:
                raise ValueError(
                    f"x {axis} {size} plus padding 2*{pad} is smaller than the kernel ({kernel}): input shape {x.shape}"
                )
        return x

    def extra_repr(self):
        return f"kernel_size={self._kernel}, stride={self._stride}, padding={self._padding}"


class MaxPool2d(_Pool2d):
    """Max pooling, as torch.nn.MaxPool2d (dilation 1, floor mode)."""

    def _forward(self, x):
        y, argmax = self.kernels.max_pool2d_forward(x, *self._kernel, *self._stride, *self._padding,
                                                    with_argmax=self.training)
        self._save(y, argmax, x.shape)
        return y

    def _backward(self, grad_out, input_grad):
        argmax, in_shape = self._take_saved()
        if not input_grad:
            return None
        return self.kernels.max_pool2d_backward_input(grad_out, argmax, in_shape[2], in_shape[3])


class AvgPool2d(_Pool2d):
    """Average pooling, as torch.nn.AvgPool2d (floor mode; padding zeros count when count_include_pad)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)

    def _forward(self, x):
        y = self.kernels.avg_pool2d_forward(x, *self._kernel, *self._stride, *self._padding, self.count_include_pad)
        self._save(y, x.shape)
        return y

    def _backward(self, grad_out, input_grad):
        (in_shape,) = self._take_saved()
        if not input_grad:
            return None
        return self.kernels.avg_pool2d_backward_input(grad_out, in_shape[2], in_shape[3], *self._kernel, *self._stride,
                                                 *self._padding, self.count_include_pad)


class _Batch:
    """The shape and dtype of a batch not computed yet, for the layers' rules that read only those."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


def _worth_folding(layer, following, x):
    """Whether layer + following can run as one convolution on x, and whether that is cheaper.

    A frozen convolution (Parameter) is always folded: its folded weights are made once and kept.
    Otherwise folding costs a pass over the weights on every call (recomputed, so it can never go stale);
    the batch norm it replaces costs a pass over the output. Deep layers of small images have
    more weights than outputs (ResNet-18's layer4 at 224: 2.4M weights, 25k outputs per image),
    and there the batch norm is the cheaper one. The test counts one image's outputs, not the
    batch's: folding changes the rounding, and an image's result must not depend on its batch.
    """
    if not (isinstance(layer, Conv2d) and isinstance(following, BatchNorm2d) and not layer.training
            and not following.training and following.num_features == layer.out_channels
            and following.weight.data.dtype == layer.weight.data.dtype):
        return False
    if _is_frozen(layer.weight.data):
        return True  # folded once and kept (BatchNorm2d.folded_into): only the batch norm's pass is left to save
    outputs_per_image = layer.out_channels * x.shape[2] * x.shape[3] // (layer._stride[0] * layer._stride[1])
    return layer.weight.data.size < outputs_per_image


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers, names=None):
        super().__init__()
        for index, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential layer {index} must be an npanomaly.nn.Module, got {type(layer).__name__}")
        self.layers = list(layers)
        if names is not None and len(names) != len(self.layers):
            raise ValueError(f"names must name every layer: {len(names)} names for {len(self.layers)} layers")
        # state-dict names of the layers: "0", "1", ... as torch.nn.Sequential, or given ones so that a
        # flat list of layers can carry a checkpoint's nested names ("_blocks.3", "layer2.1")
        self.names = [str(i) for i in range(len(self.layers))] if names is None else [str(n) for n in names]

    def named_children(self):
        return list(zip(self.names, self.layers))

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def _check_input(self, x):
        return self.layers[0]._check_input(x) if self.layers else check_array(x, "x", 4)

    def forward(self, x):
        """Apply the layers in order to a batch x [N, C, H, W] (in evaluation mode, a few images at a time)."""
        x = self._check_input(x)
        check_finite(x, "x")
        return self._in_chunks(x, lambda part: [self._forward(part)])[0]

    def _forward(self, x):
        return self._run(x, len(self.layers), ())[0]

    def intermediate(self, x, indices):
        """The outputs of the layers at the given ascending indices, for feature extraction.

        Runs the network only as far as the last index asked for; x must already be a checked,
        finite batch (models check their images once at their own boundary).
        """
        stop, wanted = max(indices) + 1, set(indices)
        return self._in_chunks(x, lambda part: self._run(part, stop, wanted)[1])

    def _in_chunks(self, x, run):
        """run(x) (a list of [N, ...] arrays), on EVAL_CHUNK_BYTES of input at a time in evaluation mode
        (WINOGRAD_EVAL_CHUNK_BYTES when a convolution may run by Winograd, whose products want the
        tiles of several images).

        In evaluation mode every image is computed on its own (batch norm uses running statistics;
        folding is decided per image), so the groups give bit-identical results, and their
        activations stay small enough to be cached and reused by the allocator. Training mode runs
        the whole batch: its batch statistics span every image.
        """
        step = x.shape[0]
        if step > 1 and not self.training and not any(layer.training for layer in self.layers):
            budget = _config.WINOGRAD_EVAL_CHUNK_BYTES if _may_run_winograd(self) else _config.EVAL_CHUNK_BYTES
            step = max(1, budget // max(1, x[0].nbytes))
        if step >= x.shape[0]:
            return run(x)
        outputs = None
        for start in range(0, x.shape[0], step):
            part = run(x[start:start + step])
            if outputs is None:
                outputs = [np.empty((x.shape[0],) + out.shape[1:], dtype=out.dtype) for out in part]
            for out, piece in zip(outputs, part):
                out[start:start + step] = piece
        return outputs

    def _run(self, x, stop, wanted, residual=None):
        """Apply layers [0, stop) to x; return (the last output, [outputs of the layers in wanted]).
        With a ``residual`` (a residual block's shortcut), the last output is relu(that + residual),
        computed in the last convolution's output pass where it can take it (Conv2d._takes_residual,
        with or without a batch norm folded in), which saves a read of both and a write, and an
        allocation, per block; else as the block did it, a sum and a ReLU after.

        A Conv2d followed by a BatchNorm2d, both in eval mode, runs as one convolution with the
        batch norm folded into its weights (BatchNorm2d.folded_into), unless the convolution's own
        output is wanted or the weights outnumber the outputs (_worth_folding): frozen backbones
        and teachers save a full read and write of every feature map per layer. The input was
        checked for NaN once by forward(); between layers only the cheap structural checks run, so
        a mis-wired network still fails clearly.
        """
        outputs = []
        index = 0
        while index < stop:
            layer = self.layers[index]
            x = layer._check_input(x)
            following = self.layers[index + 1] if index + 1 < stop else None
            folded = ()
            if index not in wanted and _worth_folding(layer, following, x):
                folded = following.folded_into(layer)
                index += 1  # the batch norm runs inside the convolution
            activation = self._fused_activation(layer, index, stop, wanted)
            hand_off = {}
            if self._hands_off_channels_last(layer, x, index + (activation is not None), stop, wanted):
                hand_off = {"channels_last": True}
            if (residual is not None and index == stop - 1 and index not in wanted and isinstance(layer, Conv2d)
                    and layer._takes_residual()):
                x = layer._forward(x, *folded, lower=0.0, upper=np.inf, residual=residual)
                residual = None
            elif activation is None:
                x = layer._forward(x, *folded, **hand_off)
            else:
                x = layer._forward(x, *folded, lower=0.0, upper=activation.upper, **hand_off)
                activation._absorbed(x)
                index += 1
            if index in wanted:
                outputs.append(x)
            index += 1
        if residual is not None:
            x = self.kernels.relu_forward(x + residual)
        return x, outputs

    def _hands_off_channels_last(self, layer, x, last, stop, wanted):
        """Whether ``layer`` (run on x, its output being that of layers[last]) should write its
        output channels-last: when it runs Winograd in evaluation mode and the next layer, the
        only reader of that output, is a Winograd convolution too, which reads channels-last
        tiles (winograd.input_transform). Its output then skips the next layer's channels-last
        copy, and its stores run along the channels (ResNet-18's 64 @56, one thread: store 4.8 ->
        3.1 ms, copy 1.5 ms -> none). Not for an output that is asked for (intermediate()), which
        stays a plain C-contiguous array."""
        if not (isinstance(layer, Conv2d) and layer._takes_residual() and not layer._same and last + 1 < stop
                and last not in wanted):
            return False
        following = self.layers[last + 1]
        if not (isinstance(following, Conv2d) and following._takes_residual() and not following._same):
            return False
        if layer._winograd_tile(x, layer._padding) is None:
            return False
        out_shape = layer._winograd_output_shape(x.shape, layer._padding)
        return following._winograd_tile(_Batch(out_shape, x.dtype), following._padding) is not None

    def _fused_activation(self, layer, index, stop, wanted):
        """The ReLU after layers[index] that layer can compute in its own output pass, or None.

        layer is layers[index] or, when a batch norm was folded into it, the convolution before.
        Fused: eval-mode convolutions (with or without a folded batch norm) and batch norms in
        either mode; in training only the batch norm, whose backward applies the ReLU's mask.
        The fused output is bit-identical to the two layers' and saves a read and a write of
        every value (and, in training, the ReLU's backward pass). Not when the layer's own
        output is asked for.
        """
        following = self.layers[index + 1] if index + 1 < stop else None
        if index in wanted or not isinstance(following, ReLU) or not layer._takes_activation():
            return None
        if following.training != layer.training or (layer.training and not isinstance(layer, BatchNorm2d)):
            return None
        return following

    def backward(self, grad_out, input_grad=True):
        return self.backward_intermediate({len(self.layers) - 1: grad_out}, input_grad)

    def backward_intermediate(self, grads, input_grad=True):
        """Back-propagate losses that depend on several layers' outputs (multi-scale losses).

        grads maps a layer index to dL/d(that layer's output); each is added to the gradient
        flowing back from the layers above it. Layers above the highest index are skipped (they
        must not have kept anything from a training forward that the loss did not use).
        """
        top = max(grads)
        grad = None
        for index in range(top, -1, -1):
            if index in grads:
                grad = grads[index] if grad is None else grad + grads[index]
            grad = self.layers[index].backward(grad, input_grad=input_grad or index > 0)
        return grad

    def extra_repr(self):
        return "\n" + "".join(f"  ({i}): {layer!r}\n" for i, layer in enumerate(self.layers))


class Residual(Sequential):
    """A Sequential whose input is added to its output when ``skip`` (EfficientNet's MBConv block).

    Gradient: dL/dx = body's dL/dx + dL/dy through the identity path.
    """

    def __init__(self, *layers, names=None, skip=True):
        super().__init__(*layers, names=names)
        self.skip = bool(skip)

    def _forward(self, x):
        y = super()._forward(x)
        return y + x if self.skip else y

    def backward(self, grad_out, input_grad=True):
        grad = super().backward(grad_out, input_grad)
        return grad + grad_out if (input_grad and self.skip) else grad


class ResidualBlock(Module):
    """relu(body(x) + shortcut(x)), the shortcut an identity or a Sequential (ResNet's BasicBlock/Bottleneck).

    body is a Sequential whose layers carry torchvision's names (conv1, bn1, relu, conv2, ...);
    the shortcut is named "downsample". Gradient: g = relu'(s) * dL/dy with s the sum, then
    dL/dx = body's dL/dx(g) + shortcut's dL/dx(g) (or g for the identity).
    In evaluation mode the sum and the ReLU run in the body's last convolution's output pass
    where it can take them (Sequential._run), bit-identical to the separate passes.
    """

    def __init__(self, body, downsample=None):
        super().__init__()
        self.body = body
        self.downsample = downsample

    def named_children(self):
        children = self.body.named_children()
        return children + ([("downsample", self.downsample)] if self.downsample is not None else [])

    def _check_input(self, x):
        return self.body._check_input(x)

    def _forward(self, x):
        shortcut = x if self.downsample is None else self.downsample._forward(self.downsample._check_input(x))
        if not self.training:  # the sum and the ReLU in the body's last convolution where it can (Sequential._run)
            return self.body._run(x, len(self.body.layers), (), residual=shortcut)[0]
        total = self.body._forward(x) + shortcut
        y = self.kernels.relu_forward(total)
        self._save(y, y)
        return y

    def _backward(self, grad_out, input_grad):
        (y,) = self._take_saved()
        grad = self.kernels.relu_backward_input(grad_out, y)
        grad_x = self.body.backward(grad, input_grad)
        shortcut = grad if self.downsample is None else self.downsample.backward(grad, input_grad)
        return grad_x + shortcut if input_grad else None
