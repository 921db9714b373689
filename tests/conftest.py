import os

from hypothesis import HealthCheck, settings

# Numba compiles on first use: no per-example deadline. CI runs the same number of examples as
# local runs; NPANOMALY_HYPOTHESIS_EXAMPLES raises it for a deeper search.
settings.register_profile(
    "npanomaly",
    deadline=None,
    max_examples=int(os.environ.get("NPANOMALY_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("npanomaly")

# Every array of the convolution drivers goes through the recycling allocator in the tests, however
# small (by default only arrays of 1 MiB and more do): a recycled array that aliased a live one
# would then corrupt the results of every numerical test, not only of the large ones.
from npanomaly.kernels import _config

_config.RECYCLE_MIN_BYTES = 0
