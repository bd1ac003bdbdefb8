"""Platform tuning kept out of the model: hand-written kernels that XLA calls through its FFI
(`cpu_attention`, `cpu_matmul`, built by `library`) and `decode_ops`, the CPU implementation of
the model's one injected op (`models.ops.Ops`) with its packed weight type and layout pickers."""
