"""Test session setup: 8 virtual CPU devices for the sharding tests.

The flag must be set before jax initialises its backend, so it is set here, before any test
module imports jax. Single-device tests simply use the first device.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
