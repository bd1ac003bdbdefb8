"""`ModelConfig`: one typed description of every decoder the project runs.

One decoder covers Llama 1/2/3, Code Llama / Llemma, Mistral, Qwen 2/3 and Gemma 1/2/3: the
families differ only in the switches below (norm offset, embedding scale, gated activation,
soft-capping, post-norms, q/k norms, q/k/v biases, sliding windows and RoPE variants).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
LAYER_TYPES = ("global", "local")
ROPE_SCALING_TYPES = ("linear", "llama3", "yarn")
# keys each rope_scaling type must carry (beyond "type")
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn", "splash")
SCAN_LAYERS_FROM = 16  # scan_layers=None scans models with at least this many layers


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a decoder-only transformer.

    Shapes: `vocab_size` V, `d_model` D, `n_layers` L, `n_heads` H, `n_kv_heads` K (grouped-query
    attention, Ainslie et al. 2023; H % K == 0), `head_dim` Dh (may differ from D/H), `mlp_dim` F.

    Switches (defaults are Llama's):
      activation: gate activation of the gated MLP: "silu" = SwiGLU (Shazeer 2020), "gelu_tanh" =
        GeGLU with tanh-approximated GELU (Gemma).
      norm_offset: RMSNorm (Zhang & Sennrich 2019) computes x / rms(x) * (norm_offset + w); Gemma
        stores w around 0 and uses offset 1.
      embed_scale: multiply input embeddings by sqrt(D) (Gemma).
      tie_embeddings: the LM head is the transposed input embedding.
      rope_theta / rope_local_theta: RoPE base (Su et al. 2021) for global / sliding-window layers.
      rope_scaling: None or a tuple of (key, value) pairs, e.g. (("type", "linear"), ("factor", 8.0))
        or Llama-3's (("type","llama3"), ("factor",8.0), ("low_freq_factor",1.0),
        ("high_freq_factor",4.0), ("original_max_position_embeddings",8192)), or YaRN's
        (("type","yarn"), ("factor",4.0), ("original_max_position_embeddings",32768)) with
        optional beta_fast (32), beta_slow (1), truncate (True) and attention_factor (default
        0.1 ln(factor) + 1, or the mscale / mscale_all_dim ratio when both are given).
      rope_scaling_local: whether rope_scaling also applies to sliding-window layers (Gemma 3 scales
        only the global ones).
      attn_softcap / final_softcap: logits -> cap * tanh(logits / cap) (Gemma 2).
      query_scale: attention logits are (q . k) * query_scale; None means Dh ** -0.5 (Gemma sets
        query_pre_attn_scalar ** -0.5).
      post_norms: extra RMSNorms on the attention and MLP outputs before the residual add
        (Gemma 2/3).
      qk_norm: RMSNorm over Dh on queries and keys before RoPE (Gemma 3, Qwen 3).
      qkv_bias: biases on the q/k/v projections (Qwen 2).
      sliding_window / layer_types: layers typed "local" attend to keys with
        q_pos - k_pos < sliding_window; empty layer_types means every layer is global.
      dtype: compute dtype of activations and matmul inputs ("float32" | "bfloat16"); matmuls
        accumulate in float32. param_dtype: storage dtype of the params.
      remat: rematerialisation of each block in the backward pass ("none" | "full" | "dots").
      attention_impl: how full-sequence attention (training, scoring, uncached prefill) is
        computed. "einsum" (default): the model's own scores / mask / softmax / values einsums
        (f32 scores; every backend). "dot_product": `jax.nn.dot_product_attention` with XLA's
        implementation. "cudnn": the same call with `implementation="cudnn"` (cuDNN's fused
        flash attention on NVIDIA GPUs; bf16/fp16 compute only). Neither of those has an
        attention soft-cap, so a config with `attn_softcap` uses "einsum" or "splash".
        "splash": the Pallas splash-attention kernel for TPUs (block-sparse causal / local
        masks, soft-cap, left padding as segment ids), under `shard_map` over the batch and
        head axes on a multi-device mesh; off a TPU it runs in Pallas' interpret mode (slow:
        for tests). Needs static windows, so a model with local layers must not be scanned.
        Cached decode steps and cached prefills always use the einsum form (or the sampler's
        kernels).
      attention_block: query block of the uncached "einsum" attention (training, scoring):
        queries are taken `attention_block` positions at a time, each block against the keys
        up to its own last position only, so the score tiles above the causal diagonal are never
        computed (T = 255 in blocks of 64: 10 of 16 tiles). 0 means one block. On CPU
        (`sft_llama_small`, 2 cores) an attention layer's forward + backward took 27 ms in
        blocks of 64 vs 61 ms as one block with a separate softmax (see `transformer`).
      scan_layers: run the L blocks as one `nn.scan` over stacked params (each block param gets
        a leading "layers" axis of size L and lives under params["layers"]) instead of L unrolled
        blocks under params["layer_i"]: the compiled program holds one block, so compile time
        and program size do not grow with L. None (default) means on for n_layers >= 16
        (`SCAN_LAYERS_FROM`). Mixed local/global layers are scanned with their window and
        RoPE table as per-layer scan inputs. A prefill scans too; one-token decode steps run
        unrolled on layer i of the params (`models.transformer.forward`).
      max_position_embeddings: the context length the checkpoint was trained for (informational:
        kept so an exported HF config says the same; None when unknown).
      family: the checkpoint family ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
        "gemma3"); it picks the HF architecture on export.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "silu"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    embed_scale: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10_000.0
    rope_local_theta: float | None = None
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rope_scaling_local: bool = True
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None
    post_norms: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "einsum"
    attention_block: int = 64
    scan_layers: bool | None = None
    max_position_embeddings: int | None = None
    family: str = "llama"

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the offending field and the fix."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "mlp_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads}) for grouped-query attention")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation must be one of {ACTIVATIONS}, "
                             f"got {self.activation!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if not isinstance(self.attention_block, int) or self.attention_block < 0:
            raise ValueError(f"ModelConfig.attention_block must be an int >= 0 (0: one block), "
                             f"got {self.attention_block!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.attention_impl in ("dot_product", "cudnn") and self.attn_softcap is not None:
            raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r} has no "
                             f"attention soft-cap; attn_softcap={self.attn_softcap} needs "
                             f"attention_impl='einsum'")
        if self.attention_impl == "splash" and "local" in self.layer_types and self.scanned:
            raise ValueError("ModelConfig.attention_impl='splash' needs static sliding windows: "
                             "set scan_layers=False for a model with local layers")
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            raise ValueError("ModelConfig.attention_impl='cudnn' needs dtype bfloat16 or "
                             "float16 (cuDNN's fused attention has no float32 kernel)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"ModelConfig.{name} must be float32/bfloat16/float16, "
                                 f"got {getattr(self, name)!r}")
        if self.scan_layers not in (None, True, False):
            raise ValueError(f"ModelConfig.scan_layers must be None, True or False, got "
                             f"{self.scan_layers!r}")
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"ModelConfig.layer_types has {len(self.layer_types)} entries "
                                 f"but n_layers is {self.n_layers}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"ModelConfig.layer_types entries must be in {LAYER_TYPES}, "
                                 f"got {bad[:3]}")
            if "local" in self.layer_types and not self.sliding_window:
                raise ValueError("ModelConfig.layer_types has 'local' layers but sliding_window "
                                 "is not set")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive, got {self.sliding_window}")
        if self.rope_scaling is not None:
            scaling = self.rope_scaling_dict
            kind = scaling.get("type")
            if kind not in ROPE_SCALING_TYPES:
                raise ValueError(f"ModelConfig.rope_scaling type must be one of "
                                 f"{ROPE_SCALING_TYPES}, got {kind!r}")
            missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
            if missing:
                raise ValueError(f"ModelConfig.rope_scaling of type {kind!r} needs key(s) "
                                 f"{missing}, got {sorted(scaling)}")

    # ------------------------------------------------------------ derived facts
    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def scanned(self) -> bool:
        """Whether the blocks are scanned (params stacked under "layers"); see `scan_layers`."""
        if self.scan_layers is None:
            return self.n_layers >= SCAN_LAYERS_FROM
        return bool(self.scan_layers)

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "global"

    def window(self, i: int) -> int | None:
        """Sliding window of layer i (None for global layers)."""
        return self.sliding_window if self.layer_type(i) == "local" else None

    def layer_rope_theta(self, i: int) -> float:
        if self.layer_type(i) == "local" and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["rope_scaling"] = self.rope_scaling_dict or None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig key(s) {unknown}")
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items()))
        return cls(**d)

    # ------------------------------------------------------------ accounting
    def num_params(self, *, include_embedding: bool = True) -> int:
        D, F, H, K, Dh = self.d_model, self.mlp_dim, self.n_heads, self.n_kv_heads, self.head_dim
        attn = D * H * Dh * 2 + D * K * Dh * 2
        if self.qkv_bias:
            attn += (H + 2 * K) * Dh
        if self.qk_norm:
            attn += 2 * Dh
        norms = D * (4 if self.post_norms else 2)
        per_layer = attn + 3 * D * F + norms
        emb = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        total = self.n_layers * per_layer + D
        return total + (emb if include_embedding else 0)

    def matmul_params(self) -> int:
        """Params that take part in a matmul per token (layers + LM head, not the input lookup)."""
        D, F, H, K, Dh = self.d_model, self.mlp_dim, self.n_heads, self.n_kv_heads, self.head_dim
        return self.n_layers * (D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F) + D * self.vocab_size

    def train_flops_per_token(self, seq_len: int) -> float:
        """6N + 12 L T H Dh (Kaplan et al. 2020 / PaLM appendix B; causal attention counted in full)."""
        return 6 * self.matmul_params() + 12 * self.n_layers * seq_len * self.n_heads * self.head_dim

    def describe(self) -> str:
        n = self.num_params()
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        return (f"{self.family} {size}: L={self.n_layers} D={self.d_model} H={self.n_heads} "
                f"K={self.n_kv_heads} Dh={self.head_dim} F={self.mlp_dim} V={self.vocab_size}")
