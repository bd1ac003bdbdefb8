"""Named model configurations.

`tiny` is the CPU demo model; `llama_small` is the shared benchmark model of
`shared/peers/workloads.json`; the rest are shape-only presets of released checkpoints
(weights come from `load_hf` / `load_gguf`), used by TPU configs and abstract-shape tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scalign.models.config import ModelConfig


def tiny(vocab_size: int = 256) -> ModelConfig:
    """~0.6M params plus embeddings: what a 2-core CPU trains in minutes."""
    return ModelConfig(vocab_size=vocab_size, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2,
                       head_dim=32, mlp_dim=384, tie_embeddings=True, family="llama")


def llama_small(vocab_size: int = 8192) -> ModelConfig:
    """The `llama_small` benchmark model (~25M matmul params)."""
    return ModelConfig(vocab_size=vocab_size, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                       head_dim=64, mlp_dim=1536, norm_eps=1e-6, rope_theta=10_000.0,
                       tie_embeddings=False, family="llama")


def llama3_2_1b() -> ModelConfig:
    """Llama-3.2-1B (Meta 2024): 16 layers, d 2048, 32 query / 8 KV heads, tied 128k embeddings,
    RoPE base 5e5 with llama3 scaling (factor 32). ~1.24B params; the GPU step-efficiency check
    (`tools/gpu_check.sh`) measures MFU on it."""
    return ModelConfig(
        vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
        mlp_dim=8192, norm_eps=1e-5, rope_theta=500_000.0, tie_embeddings=True,
        rope_scaling=(("type", "llama3"), ("factor", 32.0), ("low_freq_factor", 1.0),
                      ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)),
        max_position_embeddings=131_072, family="llama")


def llama2_7b() -> ModelConfig:
    """Llama-2-7B (Touvron et al. 2023)."""
    return ModelConfig(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                       head_dim=128, mlp_dim=11_008, norm_eps=1e-5, rope_theta=10_000.0,
                       tie_embeddings=False, family="llama")


def llemma_7b() -> ModelConfig:
    """Llemma-7B (Azerbayev et al. 2023): Code Llama 7B shapes, RoPE base 1e6, 32016 tokens."""
    return llama2_7b().replace(vocab_size=32_016, rope_theta=1_000_000.0)


def gemma2_9b() -> ModelConfig:
    """Gemma-2-9B(-it) (Gemma Team 2024): local/global alternation, soft-caps, post-norms."""
    n = 42
    return ModelConfig(
        vocab_size=256_000, d_model=3584, n_layers=n, n_heads=16, n_kv_heads=8, head_dim=256,
        mlp_dim=14_336, activation="gelu_tanh", norm_eps=1e-6, norm_offset=1.0, embed_scale=True,
        tie_embeddings=True, rope_theta=10_000.0, attn_softcap=50.0, final_softcap=30.0,
        query_scale=256 ** -0.5, post_norms=True, sliding_window=4096,
        layer_types=tuple("local" if i % 2 == 0 else "global" for i in range(n)), family="gemma2")


def gemma3_270m() -> ModelConfig:
    """Gemma-3-270M: 5 local (window 512, theta 1e4) : 1 global (theta 1e6) layers, q/k norms."""
    n = 18
    return ModelConfig(
        vocab_size=262_144, d_model=640, n_layers=n, n_heads=4, n_kv_heads=1, head_dim=256,
        mlp_dim=2048, activation="gelu_tanh", norm_eps=1e-6, norm_offset=1.0, embed_scale=True,
        tie_embeddings=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        query_scale=256 ** -0.5, post_norms=True, qk_norm=True, sliding_window=512,
        layer_types=tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(n)),
        family="gemma3")


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "tiny": tiny,
    "llama_small": llama_small,
    "llama3_2_1b": llama3_2_1b,
    "llama2_7b": llama2_7b,
    "llemma_7b": llemma_7b,
    "gemma2_9b": gemma2_9b,
    "gemma3_270m": gemma3_270m,
}


def get(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides (e.g. `get("tiny", vocab_size=100, dtype="bfloat16")`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    fn = PRESETS[name]
    ctor_args = {k: overrides.pop(k) for k in list(overrides) if k == "vocab_size"
                 and name in ("tiny", "llama_small")}
    config = fn(**ctor_args)
    return config.replace(**overrides) if overrides else config


def names() -> list[str]:
    return sorted(PRESETS)
