"""npanomaly.kernels: the flat library of pure Numba kernels under every layer and model.

Each kernel is a pure function on NCHW arrays (float32 on the fast path, float64 for gradient
checks). Kernels assume clean input: shapes, dtypes and contiguity are checked once at the public
boundary (``npanomaly._validation``), never here. See each function's docstring for its shapes, its
math and, for backward kernels, the gradient it computes.
"""

from .activation import relu_backward_input, relu_forward
from .batchnorm import (
    batchnorm2d_backward,
    batchnorm2d_eval_forward,
    batchnorm2d_train_forward,
)
from .coreset import update_min_distances
from .conv import (
    conv2d_backward_bias,
    conv2d_backward_input,
    conv2d_backward_weight,
    conv2d_forward,
    conv2d_output_size,
)
from .depthwise import (
    depthwise_conv2d_backward_input,
    depthwise_conv2d_backward_weight,
    depthwise_conv2d_forward,
)
from .distance import (
    block_dots,
    dot_error_bound,
    exact_scan,
    merge_block_candidates,
    refine_candidates,
    squared_norms,
)
from .normalize import l2_normalize_channels_backward, l2_normalize_channels_forward
from .pooling import (
    avg_pool2d_backward_input,
    avg_pool2d_forward,
    max_pool2d_backward_input,
    max_pool2d_forward,
    pool2d_output_size,
)
from .reduce import all_below, all_finite, channel_mean_squared_difference, squared_difference_loss
from .resize import bilinear_resize, gaussian_blur, gaussian_kernel1d
from .winograd import (
    winograd_conv2d_backward,
    winograd_conv2d_backward_input,
    winograd_conv2d_backward_weight,
    winograd_conv2d_forward,
    winograd_filters,
)



#: Kernels with no numba.cuda twin: nn.Conv2d finds them missing on the "cuda" table and runs its
#: 3x3 convolutions by im2col there (the GPU products are tiled kernels, not BLAS calls).
CPU_ONLY = ("winograd_conv2d_backward", "winograd_conv2d_backward_input", "winograd_conv2d_backward_weight",
            "winograd_conv2d_forward", "winograd_filters")


def for_device(device):
    """The kernel table for "cpu" (this package) or "cuda" (npanomaly.kernels.cuda, same names)."""
    if device == "cpu":
        import sys

        return sys.modules[__name__]
    if device == "cuda":
        from . import cuda

        cuda.require()
        return cuda
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


__all__ = [
    "all_below",
    "all_finite",
    "bilinear_resize",
    "block_dots",
    "channel_mean_squared_difference",
    "depthwise_conv2d_backward_input",
    "depthwise_conv2d_backward_weight",
    "depthwise_conv2d_forward",
    "dot_error_bound",
    "exact_scan",
    "for_device",
    "gaussian_blur",
    "gaussian_kernel1d",
    "l2_normalize_channels_backward",
    "l2_normalize_channels_forward",
    "merge_block_candidates",
    "refine_candidates",
    "squared_difference_loss",
    "squared_norms",
    "update_min_distances",
    "avg_pool2d_backward_input",
    "avg_pool2d_forward",
    "batchnorm2d_backward",
    "batchnorm2d_eval_forward",
    "batchnorm2d_train_forward",
    "conv2d_backward_bias",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv2d_forward",
    "conv2d_output_size",
    "max_pool2d_backward_input",
    "max_pool2d_forward",
    "pool2d_output_size",
    "relu_backward_input",
    "relu_forward",
    "winograd_conv2d_backward",
    "winograd_conv2d_backward_input",
    "winograd_conv2d_backward_weight",
    "winograd_conv2d_forward",
    "winograd_filters",
]
