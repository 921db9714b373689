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
