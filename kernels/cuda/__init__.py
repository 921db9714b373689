"""numba.cuda twins of the kernels, one table with the CPU table's names and arguments.

``npanomaly.kernels.for_device("cuda")`` returns this module; layers and models take
``device="cuda"`` and call through it, never branching per call. Kernels without a GPU twin
(pooling, depthwise convolution, resizing, the knn merge and refinement, ...) are the CPU ones,
re-exported here so the two tables have the same names. Host launchers take and return NumPy
arrays. Without an NVIDIA GPU and driver, ``require()`` (called by for_device) raises a clear error;
``NUMBA_ENABLE_CUDASIM=1`` (set before Numba is imported) runs the twins in Numba's simulator.
"""

from .. import (  # noqa: F401  (CPU kernels without a twin: same table, same names)
    all_below,
    all_finite,
    avg_pool2d_backward_input,
    avg_pool2d_forward,
    bilinear_resize,
    channel_mean_squared_difference,
    conv2d_output_size,
    depthwise_conv2d_backward_input,
    depthwise_conv2d_backward_weight,
    depthwise_conv2d_forward,
    dot_error_bound,
    exact_scan,
    gaussian_blur,
    gaussian_kernel1d,
    l2_normalize_channels_backward,
    l2_normalize_channels_forward,
    max_pool2d_backward_input,
    max_pool2d_forward,
    merge_block_candidates,
    pool2d_output_size,
    refine_candidates,
    squared_difference_loss,
    squared_norms,
)
from ._device import is_available, require  # noqa: F401
from .ops import (  # noqa: F401
    batchnorm2d_backward,
    batchnorm2d_eval_forward,
    batchnorm2d_train_forward,
    block_dots,
    conv2d_backward_bias,
    conv2d_backward_input,
    conv2d_backward_weight,
    conv2d_forward,
    relu_backward_input,
    relu_forward,
    update_min_distances,
)

TWINS = ("batchnorm2d_backward", "batchnorm2d_eval_forward", "batchnorm2d_train_forward", "block_dots",
         "conv2d_backward_bias", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_forward",
         "relu_backward_input", "relu_forward", "update_min_distances")
