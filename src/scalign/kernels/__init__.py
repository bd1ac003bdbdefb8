"""Hand-written kernels that XLA calls through its FFI (see each module)."""
