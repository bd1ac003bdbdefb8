"""Hugging Face checkpoints: `config.json` + `*.safetensors` <-> (`ModelConfig`, params).

Families: llama (Llama 1/2/3, Code Llama, Llemma), mistral, qwen2, qwen3, gemma, gemma2 and
gemma3 / gemma3_text (the text tower of multimodal Gemma 3 folders too).

Config mapping (HF key -> ModelConfig field; keys a config.json omits take the defaults of the
transformers 5.x config class of that family, listed in `_HF_DEFAULTS`):

  vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads (None ->
  num_attention_heads), head_dim (None -> hidden_size // num_attention_heads), intermediate_size
  -> V, D, L, H, K, Dh, F; rms_norm_eps -> norm_eps; tie_word_embeddings -> tie_embeddings;
  hidden_act / hidden_activation -> activation (silu|swish -> silu, gelu_pytorch_tanh|gelu_new ->
  gelu_tanh, gelu -> gelu except Gemma 1 where transformers reads legacy "gelu" as tanh-GELU);
  rope_parameters (transformers 5) or rope_theta + rope_scaling (+ rope_local_base_freq for
  Gemma 3) -> rope_theta, rope_local_theta, rope_scaling (types default, linear, llama3, yarn);
  a legacy rope_scaling next to rope_parameters is applied as transformers applies it (it
  replaces rope_parameters; Gemma 3 merges it into full_attention), never ignored;
  layer_types "sliding_attention"/"full_attention" -> "local"/"global", derived when absent as
  transformers does: Mistral slides every layer when sliding_window is set; Qwen 2/3 slide layers
  i >= max_window_layers when use_sliding_window; Gemma 2 slides even layers; Gemma 3 slides all
  but every sliding_window_pattern-th (6) layer. Gemma: norm_offset 1 (RMSNorm scales by 1 + w),
  sqrt(D) embedding scale; Gemma 2/3: query_scale = query_pre_attn_scalar^-1/2, post-norms,
  attn/final soft-caps; Gemma 3 and Qwen 3: q/k RMSNorm; Qwen 2: q/k/v biases.

Options the decoder does not implement raise ValueError naming the key (e.g. attention_bias on
Llama, mlp_bias, partial_rotary_factor, dynamic / longrope RoPE, bidirectional attention).

Tensor mapping (`hf_tensor_specs`): HF `nn.Linear` weights are [out, in]. q/k/v_proj [N*Dh, D]
-> [D, N, Dh]; o_proj [D, H*Dh] -> [H, Dh, D]; gate/up_proj [F, D] -> [D, F]; down_proj
[D, F] -> [F, D]; lm_head [V, D] -> [D, V]; biases [N*Dh] -> [N, Dh]; embeddings and norm
weights are copied. Llama-style blocks map post_attention_layernorm -> pre_mlp_norm; Gemma 2/3
blocks map post_attention_layernorm -> post_attn_norm and pre/post_feedforward_layernorm ->
pre/post_mlp_norm. HF's Gemma norm weights are stored as w (the 1 + w offset lives in the
module), exactly like ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy: safetensors' numpy reader needs it)
import numpy as np
from jax.sharding import Mesh

from scalign.models.config import ModelConfig
from scalign.models.transformer import init_params, param_logical_axes
from scalign.parallel import tree_shardings

PathLike = str | os.PathLike
Params = dict[str, Any]

# family -> (HF architecture class, model_type written on export)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")

# Defaults of the transformers 5.24 config classes, for keys a config.json may omit.
_COMMON_DEFAULTS: dict[str, Any] = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                                    "hidden_act": "silu", "rope_theta": 10_000.0,
                                    "num_key_value_heads": None, "head_dim": None}
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131_072, "sliding_window": 4096,
                "num_key_value_heads": 8},
    "qwen2": {"max_position_embeddings": 32_768, "sliding_window": 4096,
              "use_sliding_window": False, "max_window_layers": 28, "num_key_value_heads": 32},
    "qwen3": {"max_position_embeddings": 32_768, "sliding_window": 4096,
              "use_sliding_window": False, "max_window_layers": 28, "head_dim": 128,
              "num_key_value_heads": 32},
    "gemma": {"max_position_embeddings": 8192, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
              "tie_word_embeddings": True, "num_key_value_heads": 16},
    "gemma2": {"max_position_embeddings": 8192, "head_dim": 256, "num_key_value_heads": 4,
               "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
               "sliding_window": 4096, "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"max_position_embeddings": 131_072, "head_dim": 256, "num_key_value_heads": 4,
               "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
               "sliding_window": 4096, "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": None, "final_logit_softcapping": None,
               "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
               "sliding_window_pattern": 6},
}
_ACTIVATIONS_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                        "gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ACTIVATIONS_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu",
                      "relu": "relu"}
_LAYER_TYPES_FROM_HF = {"sliding_attention": "local", "full_attention": "global"}
_LAYER_TYPES_TO_HF = {v: k for k, v in _LAYER_TYPES_FROM_HF.items()}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: `RotaryEmbeddingConfigMixin.default_theta` of transformers 5: the base of a legacy
#: rope_scaling block that replaces rope_parameters when config.json has no rope_theta
_TRANSFORMERS_DEFAULT_THETA = 10_000.0


# =========================================================================== config
def _get(hf: Mapping[str, Any], key: str, family: str) -> Any:
    """hf[key], else the transformers default of `family` for that key."""
    if key in hf:
        return hf[key]
    fam = _HF_DEFAULTS[family]
    return fam[key] if key in fam else _COMMON_DEFAULTS.get(key)


def _require(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{source}: required key {key!r} is missing")
    return hf[key]


def _unsupported(source: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{source}: {key}={value!r} is not supported ({why})")


def _scaling_from_hf(d: Mapping[str, Any], key: str, max_pos: int | None, source: str
                     ) -> tuple[tuple[str, Any], ...] | None:
    """One HF rope-parameters dict -> our rope_scaling tuple (None for default RoPE)."""
    kind = d.get("rope_type", d.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise _unsupported(source, f"{key}.rope_type", kind,
                           f"supported RoPE types: {list(_ROPE_TYPES)}")
    prf = d.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        raise _unsupported(source, f"{key}.partial_rotary_factor", prf, "RoPE on all of head_dim")
    if kind == "default":
        return None
    out: dict[str, Any] = {"type": kind}
    if kind in ("llama3", "yarn"):
        orig = d.get("original_max_position_embeddings", max_pos)
        if orig is None:
            raise ValueError(f"{source}: {key}.original_max_position_embeddings is missing")
        out["original_max_position_embeddings"] = int(orig)
    factor = d.get("factor")
    if factor is None and kind == "yarn" and max_pos is not None:
        factor = max_pos / out["original_max_position_embeddings"]  # transformers' rule
    if factor is None:
        raise ValueError(f"{source}: {key}.factor is missing for rope_type {kind!r}")
    out["factor"] = float(factor)
    if kind == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            if d.get(k) is None:
                raise ValueError(f"{source}: {key}.{k} is missing for rope_type 'llama3'")
            out[k] = float(d[k])
    if kind == "yarn":
        for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if d.get(k) is not None:
                out[k] = float(d[k])
        if d.get("truncate") is not None:
            out["truncate"] = bool(d["truncate"])
    return tuple(sorted(out.items()))


def _rope_from_hf(hf: Mapping[str, Any], family: str, max_pos: int | None, source: str
                  ) -> dict[str, Any]:
    """rope_theta, rope_local_theta, rope_scaling, rope_scaling_local from an HF config."""
    if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise _unsupported(source, "partial_rotary_factor", hf["partial_rotary_factor"],
                           "RoPE on all of head_dim")
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if params and legacy:
        # transformers reads a legacy rope_scaling block next to rope_parameters: families
        # with one RoPE replace rope_parameters by it (its rope_theta defaulting to the
        # top-level one, else 10000); Gemma 3 merges it into full_attention. Do the same.
        nested = "full_attention" in params or "sliding_attention" in params
        if family == "gemma3":
            if not nested:
                raise _unsupported(source, "rope_scaling", legacy,
                                   "next to a flat rope_parameters, which transformers cannot "
                                   "load for Gemma 3 either; nest rope_parameters by layer type")
            params = {**params, "full_attention": {**(params.get("full_attention") or {}),
                                                   **legacy}}
        else:
            params = {**legacy}
            params.setdefault("rope_theta", hf.get("rope_theta", _TRANSFORMERS_DEFAULT_THETA))
    if params:
        key = "rope_parameters" if not (legacy and family != "gemma3") else "rope_scaling"
        nested = "full_attention" in params or "sliding_attention" in params
        full = dict(params.get("full_attention") or {}) if nested else dict(params)
        slide = params.get("sliding_attention") if nested else None
        full_key = f"{key}.full_attention" if nested else key
        full.setdefault("rope_theta", _get(hf, "rope_theta", family))
        if slide is not None:
            slide = dict(slide)
            slide.setdefault("rope_theta", _get(hf, "rope_local_base_freq", family))
    else:
        key = full_key = "rope_scaling"
        full = dict(hf.get("rope_scaling") or {})
        full["rope_theta"] = _get(hf, "rope_theta", family)
        slide = None
        if family == "gemma3":  # legacy Gemma 3: rope_scaling applies to global layers only
            slide = {"rope_theta": _get(hf, "rope_local_base_freq", family)}
    if slide is not None and family != "gemma3":
        if _scaling_from_hf(slide, key, max_pos, source) != _scaling_from_hf(
                full, key, max_pos, source) or slide["rope_theta"] != full["rope_theta"]:
            raise _unsupported(source, f"{key}.sliding_attention", slide,
                               f"family {family!r} uses one RoPE for every layer")
        slide = None
    scaling = _scaling_from_hf(full, full_key, max_pos, source)
    out = {"rope_theta": float(full["rope_theta"]), "rope_local_theta": None,
           "rope_scaling": scaling, "rope_scaling_local": True}
    if slide is not None:
        out["rope_local_theta"] = float(slide["rope_theta"])
        local_scaling = _scaling_from_hf(slide, f"{key}.sliding_attention", max_pos, source)
        if scaling is not None and local_scaling is None:
            out["rope_scaling_local"] = False
        elif local_scaling != scaling:
            raise _unsupported(source, f"{key}.sliding_attention", slide,
                               "local layers must use the global scaling or none")
    return out


def _layer_types_from_hf(hf: Mapping[str, Any], family: str, n_layers: int, source: str
                         ) -> tuple[tuple[str, ...], int | None]:
    """(layer_types, sliding_window) with transformers' derivation rules (module docstring)."""
    window = _get(hf, "sliding_window", family) if family != "llama" else None
    if family in ("llama", "gemma"):
        return (), None
    if family == "mistral":
        return (("local",) * n_layers, int(window)) if window else ((), None)
    if family in ("qwen2", "qwen3") and not _get(hf, "use_sliding_window", family):
        window = None
    hf_types = hf.get("layer_types")
    if hf_types is None:
        if family in ("qwen2", "qwen3"):
            first = int(_get(hf, "max_window_layers", family))
            hf_types = ["sliding_attention" if window is not None and i >= first
                        else "full_attention" for i in range(n_layers)]
        elif family == "gemma2":
            hf_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                        for i in range(n_layers)]
        else:  # gemma3
            pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
            hf_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                        for i in range(n_layers)]
    if len(hf_types) != n_layers:
        raise ValueError(f"{source}: layer_types has {len(hf_types)} entries but "
                         f"num_hidden_layers is {n_layers}")
    bad = sorted({t for t in hf_types if t not in _LAYER_TYPES_FROM_HF})
    if bad:
        raise _unsupported(source, "layer_types", bad, f"known: {list(_LAYER_TYPES_FROM_HF)}")
    types = tuple(_LAYER_TYPES_FROM_HF[t] for t in hf_types)
    if window is None:  # transformers attends globally in every layer then
        types = ("global",) * n_layers
    if "local" not in types:
        return (), None
    return types, int(window)


def _activation_from_hf(hf: Mapping[str, Any], family: str, source: str) -> str:
    key = "hidden_activation" if family in ("gemma2", "gemma3") else "hidden_act"
    act = _get(hf, key, family)
    if act is None and family in ("gemma2", "gemma3"):
        key, act = "hidden_act", hf.get("hidden_act", "gelu_pytorch_tanh")
    if family == "gemma" and act == "gelu":  # transformers' legacy rule for Gemma 1 configs
        act = "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS_FROM_HF:
        raise _unsupported(source, key, act, f"supported: {sorted(_ACTIVATIONS_FROM_HF)}")
    return _ACTIVATIONS_FROM_HF[act]


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """An HF config dict (config.json) -> ModelConfig; see the module docstring for the map.

    A multimodal Gemma 3 config (model_type "gemma3" with a "text_config") maps its text tower.
    """
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        hf = {"model_type": "gemma3_text", **hf["text_config"]}
        source = f"{source} (text_config)"
        model_type = "gemma3_text"
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: "
                         f"{sorted(MODEL_TYPES)}")
    family = MODEL_TYPES[model_type]
    n_heads = int(_require(hf, "num_attention_heads", source))
    d_model = int(_require(hf, "hidden_size", source))
    n_layers = int(_require(hf, "num_hidden_layers", source))
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _unsupported(source, key, hf[key], f"no {key.split('_')[0]} biases in the "
                               f"{family} decoder")
    if hf.get("use_bidirectional_attention"):
        raise _unsupported(source, "use_bidirectional_attention", True, "causal decoder only")
    max_pos = _get(hf, "max_position_embeddings", family)
    gemma = family in GEMMA_FAMILIES
    later_gemma = family in ("gemma2", "gemma3")
    layer_types, window = _layer_types_from_hf(hf, family, n_layers, source)
    kv = _get(hf, "num_key_value_heads", family)
    head_dim = _get(hf, "head_dim", family)
    qpas = _get(hf, "query_pre_attn_scalar", family) if later_gemma else None
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size", source)),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(kv) if kv is not None else n_heads,
        head_dim=int(head_dim) if head_dim is not None else d_model // n_heads,
        mlp_dim=int(_require(hf, "intermediate_size", source)),
        activation=_activation_from_hf(hf, family, source),
        norm_eps=float(_get(hf, "rms_norm_eps", family)),
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", family)),
        **_rope_from_hf(hf, family, max_pos, source),
        attn_softcap=_optional_float(_get(hf, "attn_logit_softcapping", family))
        if later_gemma else None,
        final_softcap=_optional_float(_get(hf, "final_logit_softcapping", family))
        if later_gemma else None,
        query_scale=float(qpas) ** -0.5 if qpas is not None else None,
        post_norms=later_gemma,
        qk_norm=family in ("qwen3", "gemma3"),
        qkv_bias=family == "qwen2",
        sliding_window=window,
        layer_types=layer_types,
        max_position_embeddings=int(max_pos) if max_pos is not None else None,
        family=family,
    )


def _optional_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _rope_to_hf(theta: float, scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    d: dict[str, Any] = {"rope_type": "default", "rope_theta": float(theta)}
    if scaling:
        d.update({k: v for k, v in scaling.items() if k != "type"})
        d["rope_type"] = scaling["type"]
    return d


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> an HF config dict for the architecture of `config.family`.

    Raises ValueError when that architecture cannot express the config exactly (the message
    lists the fields that would change); `save_hf` relies on this check.
    """
    c = config
    if c.family not in FAMILIES:
        raise ValueError(f"ModelConfig.family={c.family!r} has no Hugging Face architecture; "
                         f"use one of {sorted(FAMILIES)}")
    arch, model_type = FAMILIES[c.family]
    later_gemma = c.family in ("gemma2", "gemma3")
    act = _ACTIVATIONS_TO_HF[c.activation]
    hf: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        ("hidden_activation" if later_gemma else "hidden_act"): act,
        "max_position_embeddings": c.max_position_embeddings
        or _HF_DEFAULTS[c.family]["max_position_embeddings"],
        "dtype": c.param_dtype,
    }
    scaling = c.rope_scaling_dict or None
    if c.family == "gemma3":
        local_theta = c.rope_local_theta if c.rope_local_theta is not None else c.rope_theta
        hf["rope_parameters"] = {
            "full_attention": _rope_to_hf(c.rope_theta, scaling),
            "sliding_attention": _rope_to_hf(local_theta,
                                             scaling if c.rope_scaling_local else None)}
        hf["rope_theta"], hf["rope_local_base_freq"] = c.rope_theta, local_theta
    else:
        hf["rope_parameters"] = _rope_to_hf(c.rope_theta, scaling)
        hf["rope_theta"] = c.rope_theta  # also read by transformers < 5
        if scaling:
            hf["rope_scaling"] = dict(hf["rope_parameters"])
    hf_types = [_LAYER_TYPES_TO_HF[c.layer_type(i)] for i in range(c.n_layers)]
    if c.family == "mistral":
        hf["sliding_window"] = c.sliding_window if c.layer_types else None
    elif c.family in ("qwen2", "qwen3"):
        local = [i for i in range(c.n_layers) if c.layer_type(i) == "local"]
        hf.update(use_sliding_window=bool(local), sliding_window=c.sliding_window,
                  max_window_layers=local[0] if local else c.n_layers, layer_types=hf_types)
    elif later_gemma:
        hf.update(sliding_window=c.sliding_window or _HF_DEFAULTS[c.family]["sliding_window"],
                  layer_types=hf_types, attn_logit_softcapping=c.attn_softcap,
                  final_logit_softcapping=c.final_softcap,
                  query_pre_attn_scalar=_query_pre_attn_scalar(c))
    if c.family == "gemma3":
        hf["use_bidirectional_attention"] = False
    if c.family in ("llama", "qwen3", "gemma", "gemma2", "gemma3"):
        hf["attention_bias"] = False
    if c.family == "llama":
        hf["mlp_bias"] = False
    _check_representable(c, hf)
    return hf


def _query_pre_attn_scalar(c: ModelConfig) -> int | float:
    """query_pre_attn_scalar = attention_scale^-2, an int when it is one (HF types it int)."""
    s = c.attention_scale ** -2
    return int(round(s)) if abs(s - round(s)) < 1e-6 * max(1.0, s) else s


def _behaviour(c: ModelConfig) -> dict[str, Any]:
    """What the forward pass depends on, with equivalent spellings made equal."""
    d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    for k in ("dtype", "param_dtype", "remat", "scan_layers", "max_position_embeddings", "rope_local_theta",
              "rope_scaling_local", "sliding_window", "layer_types", "query_scale", "rope_theta",
              "rope_scaling"):
        d.pop(k)
    d["attention_scale"] = round(c.attention_scale, 12)
    scaling = tuple(sorted(c.rope_scaling_dict.items())) or None
    d["layers"] = tuple((c.window(i), c.layer_rope_theta(i),
                         scaling if (c.layer_type(i) == "global" or c.rope_scaling_local)
                         else None) for i in range(c.n_layers))
    return d


def _check_representable(c: ModelConfig, hf: dict[str, Any]) -> None:
    back = _behaviour(config_from_hf(hf, source=f"config_to_hf({c.family})"))
    want = _behaviour(c)
    diff = sorted(k for k in want if want[k] != back.get(k))
    if diff:
        detail = "; ".join(f"{k}: {want[k]!r} -> {back.get(k)!r}" for k in diff)
        raise ValueError(f"ModelConfig with family={c.family!r} cannot be written as "
                         f"{FAMILIES[c.family][0]} exactly ({detail}); pick the family whose "
                         f"architecture has these features")


# ========================================================================== tensors
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One param: its path in our tree, its HF name and the layout change between them.

    kind: "copy" (same layout), "transpose" ([out, in] <-> [in, out]), "heads_out" (HF
    [N*Dh, D] <-> ours [D, N, Dh]), "heads_in" (HF [D, H*Dh] <-> ours [H, Dh, D]),
    "heads_bias" (HF [N*Dh] <-> ours [N, Dh]).
    """

    path: tuple[str, ...]
    hf_name: str
    kind: str


def hf_tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every backbone param of `config` with its HF tensor name (without a model prefix)."""
    c = config
    specs = [TensorSpec(("embedding",), "model.embed_tokens.weight", "copy"),
             TensorSpec(("final_norm", "scale"), "model.norm.weight", "copy")]
    if not c.tie_embeddings:
        specs.append(TensorSpec(("lm_head",), "lm_head.weight", "transpose"))
    for i in range(c.n_layers):
        lay, hf = f"layer_{i}", f"model.layers.{i}"
        at = f"{hf}.self_attn"
        specs += [
            TensorSpec((lay, "attn", "q"), f"{at}.q_proj.weight", "heads_out"),
            TensorSpec((lay, "attn", "k"), f"{at}.k_proj.weight", "heads_out"),
            TensorSpec((lay, "attn", "v"), f"{at}.v_proj.weight", "heads_out"),
            TensorSpec((lay, "attn", "o"), f"{at}.o_proj.weight", "heads_in"),
            TensorSpec((lay, "mlp", "gate"), f"{hf}.mlp.gate_proj.weight", "transpose"),
            TensorSpec((lay, "mlp", "up"), f"{hf}.mlp.up_proj.weight", "transpose"),
            TensorSpec((lay, "mlp", "down"), f"{hf}.mlp.down_proj.weight", "transpose"),
            TensorSpec((lay, "pre_attn_norm", "scale"), f"{hf}.input_layernorm.weight", "copy"),
        ]
        if c.qkv_bias:
            specs += [TensorSpec((lay, "attn", f"{x}_bias"), f"{at}.{x}_proj.bias", "heads_bias")
                      for x in "qkv"]
        if c.qk_norm:
            specs += [TensorSpec((lay, "attn", f"{x}_norm", "scale"), f"{at}.{x}_norm.weight",
                                 "copy") for x in "qk"]
        if c.post_norms:
            specs += [
                TensorSpec((lay, "post_attn_norm", "scale"),
                           f"{hf}.post_attention_layernorm.weight", "copy"),
                TensorSpec((lay, "pre_mlp_norm", "scale"),
                           f"{hf}.pre_feedforward_layernorm.weight", "copy"),
                TensorSpec((lay, "post_mlp_norm", "scale"),
                           f"{hf}.post_feedforward_layernorm.weight", "copy"),
            ]
        else:
            specs.append(TensorSpec((lay, "pre_mlp_norm", "scale"),
                                    f"{hf}.post_attention_layernorm.weight", "copy"))
    return specs


def hf_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The HF shape of a param of our `shape` (see `TensorSpec`)."""
    s = tuple(int(x) for x in shape)
    if kind == "copy":
        return s
    if kind == "transpose":
        return s[::-1]
    if kind == "heads_out":  # [D, N, Dh] -> [N*Dh, D]
        return (s[1] * s[2], s[0])
    if kind == "heads_in":  # [H, Dh, D] -> [D, H*Dh]
        return (s[2], s[0] * s[1])
    if kind == "heads_bias":  # [N, Dh] -> [N*Dh]
        return (s[0] * s[1],)
    raise ValueError(f"unknown tensor kind {kind!r}")


def _bounds(index: slice, n: int) -> tuple[int, int]:
    start, stop, step = index.indices(n)
    if step != 1:
        raise ValueError(f"strided shard index {index} is not supported")
    return start, stop


def read_block(kind: str, shape: Sequence[int], index: Sequence[slice],
               read: Callable[[tuple[slice, ...]], np.ndarray]) -> np.ndarray:
    """Block `index` (slices in *our* layout of a param of our `shape`) of an HF tensor.

    `read(hf_slices)` returns that region of the HF tensor; only the HF rows / columns the block
    needs are requested, so a shard reads its slice of the file and nothing more.
    """
    b = [_bounds(s, n) for s, n in zip(index, shape, strict=True)]
    if kind == "copy":
        return np.asarray(read(tuple(slice(lo, hi) for lo, hi in b)))
    if kind == "transpose":
        (r0, r1), (c0, c1) = b
        return np.asarray(read((slice(c0, c1), slice(r0, r1)))).T
    if kind == "heads_out":
        (d0, d1), (n0, n1), (e0, e1) = b
        dh = shape[2]
        blk = np.asarray(read((slice(n0 * dh, n1 * dh), slice(d0, d1))))
        return blk.reshape(n1 - n0, dh, d1 - d0)[:, e0:e1].transpose(2, 0, 1)
    if kind == "heads_in":
        (h0, h1), (e0, e1), (d0, d1) = b
        dh = shape[1]
        blk = np.asarray(read((slice(d0, d1), slice(h0 * dh, h1 * dh))))
        return blk.reshape(d1 - d0, h1 - h0, dh)[:, :, e0:e1].transpose(1, 2, 0)
    if kind == "heads_bias":
        (n0, n1), (e0, e1) = b
        dh = shape[1]
        return np.asarray(read((slice(n0 * dh, n1 * dh),))).reshape(n1 - n0, dh)[:, e0:e1]
    raise ValueError(f"unknown tensor kind {kind!r}")


def from_hf_layout(kind: str, shape: Sequence[int], array: np.ndarray) -> np.ndarray:
    """A whole HF tensor -> our layout (`read_block` over the full index)."""
    return read_block(kind, shape, tuple(slice(None) for _ in shape), lambda s: array[s])


def to_hf_layout(kind: str, array: np.ndarray) -> np.ndarray:
    """Our layout -> the HF tensor (inverse of `from_hf_layout`)."""
    a = np.asarray(array)
    if kind == "copy":
        return a
    if kind == "transpose":
        return a.T
    if kind == "heads_out":
        return a.transpose(1, 2, 0).reshape(a.shape[1] * a.shape[2], a.shape[0])
    if kind == "heads_in":
        return a.transpose(2, 0, 1).reshape(a.shape[2], a.shape[0] * a.shape[1])
    if kind == "heads_bias":
        return a.reshape(-1)
    raise ValueError(f"unknown tensor kind {kind!r}")


def abstract_params(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of `init_params(config, key)` (nothing is allocated)."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))


def _tree_get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _tree_set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _check_specs_cover(config: ModelConfig, specs: list[TensorSpec], abstract: Params) -> None:
    ours = {tuple(str(getattr(p, "key", p)) for p in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    mapped = {s.path for s in specs}
    if ours != mapped:
        raise AssertionError(f"hf_tensor_specs({config.family}) is out of date with the model: "
                             f"unmapped {sorted(ours - mapped)[:4]}, "
                             f"stale {sorted(mapped - ours)[:4]}")


# ======================================================================== load_hf
def _local_dir(path: PathLike) -> str:
    p = os.fspath(path)
    if "://" in p:
        raise ValueError(f"load_hf reads local folders; copy {p} to local disk first "
                         f"(e.g. gsutil -m cp -r)")
    if not os.path.isdir(p):
        raise FileNotFoundError(f"HF checkpoint folder not found: {p}")
    return p


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _tensor_files(folder: str) -> dict[str, str]:
    """{HF tensor name: safetensors file path} from the index, or from the single file."""

    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no 'weight_map' object")
        out = {}
        for name, fname in weight_map.items():
            fpath = os.path.join(folder, fname)
            if not os.path.exists(fpath):
                raise FileNotFoundError(f"{index_path}: {name!r} maps to missing file {fpath}")
            out[name] = fpath
        for fpath in sorted(set(out.values())):  # a damaged shard is named now, not mid-load
            with _open_safetensors(fpath):
                pass
        return out
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(files) != 1:
        what = "no *.safetensors file" if not files else f"{len(files)} safetensors files"
        raise FileNotFoundError(f"{folder}: {what} and no model.safetensors.index.json "
                                f"(only safetensors checkpoints are read)")
    fpath = os.path.join(folder, files[0])
    with _open_safetensors(fpath) as f:
        return {name: fpath for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _open_safetensors(fpath: str) -> Any:
    """`safe_open(fpath)`, its errors (a truncated or damaged file) naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(fpath, framework="np")
    except (SafetensorError, OSError) as e:
        size = os.path.getsize(fpath) if os.path.exists(fpath) else 0
        raise ValueError(f"{fpath}: cannot read this safetensors file ({size} bytes; "
                         f"truncated or damaged?): {e}") from e


_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent RoPE buffers in old checkpoints
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


def _resolve_names(names: Sequence[str], specs: list[TensorSpec], config: ModelConfig,
                   folder: str) -> tuple[dict[str, str], list[str]]:
    """Map each spec's HF name to the name in the files; also list names that are skipped.

    The decoder prefix is found from the embedding's name (`model.`, `language_model.model.`,
    `model.language_model.` ...). Skipped without error: RoPE inv_freq buffers, the vision
    tower of a multimodal Gemma 3 folder and a tied lm_head copy of the embedding. Anything else
    unmatched raises.
    """
    emb = [n for n in names if n.endswith("embed_tokens.weight")]
    if len(emb) != 1:
        raise ValueError(f"{folder}: expected one '*embed_tokens.weight' tensor, found {emb}")
    body = emb[0][: -len("embed_tokens.weight")]  # e.g. "model." / "model.language_model."
    # the lm_head sits next to the decoder's "model." (e.g. "language_model.lm_head.weight")
    outer = body[: -len("model.")] if body == "model." or body.endswith(".model.") else ""
    present = set(names)
    mapping = {}
    for s in specs:
        if s.hf_name.startswith("model."):
            mapping[s.hf_name] = body + s.hf_name[len("model."):]
        else:  # lm_head.weight
            cands = [outer + s.hf_name, s.hf_name]
            mapping[s.hf_name] = next((n for n in cands if n in present), cands[0])
    wanted = set(mapping.values())
    missing = sorted(n for n in wanted if n not in present)
    if missing:
        raise ValueError(f"{folder}: missing tensor(s) {missing[:5]}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                         + f" for {config.describe()}")
    skipped, unexpected = [], []
    for n in names:
        if n in wanted:
            continue
        tied_copy = config.tie_embeddings and n.endswith("lm_head.weight")
        if tied_copy or n.endswith(_IGNORED_SUFFIXES) or n.startswith(_VISION_PREFIXES):
            skipped.append(n)
        else:
            unexpected.append(n)
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensor(s) {sorted(unexpected)[:5]}"
                         + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
                         + f" for {config.describe()} (config.json and weights disagree?)")
    return mapping, skipped


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype if dtype is not None else jnp.float32).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name}")
    return name


def load_hf(path: PathLike, *, dtype: Any = None, mesh: Mesh | None = None
            ) -> tuple[ModelConfig, Params]:
    """Read an HF folder (config.json + safetensors, single file or sharded index).

    Args:
      path: a local folder.
      dtype: storage dtype of the params (default float32; the config's param_dtype says it).
      mesh: when given, every param is created straight on its rule-table sharding
        (`parallel.tree_shardings` of `param_logical_axes`) with `jax.make_array_from_callback`,
        each device shard reading only its slice of the file; otherwise params are read one
        tensor at a time onto the default device.

    Returns:
      (config, params) with `params` laid out like `init_params(config, key)`.

    Raises:
      ValueError / FileNotFoundError naming the file and tensor for missing, unexpected or
      mis-shaped tensors and for config options the decoder does not implement.
    """

    folder = _local_dir(path)
    cfg_path = os.path.join(folder, "config.json")
    config = config_from_hf(_read_json(cfg_path), source=cfg_path)
    config = config.replace(param_dtype=_dtype_name(dtype))
    np_dtype = np.dtype(config.params_dtype)
    files = _tensor_files(folder)
    specs = hf_tensor_specs(config)
    abstract = abstract_params(config)
    layer_abstract = abstract_params(config.replace(scan_layers=False))  # per-layer shapes
    _check_specs_cover(config, specs, layer_abstract)
    names, skipped = _resolve_names(list(files), specs, config, folder)
    if skipped:
        logging.info("load_hf(%s): skipped %d tensor(s) outside the decoder: %s%s", folder,
                     len(skipped), ", ".join(sorted(skipped)[:5]),
                     " ..." if len(skipped) > 5 else "")
    shardings = (tree_shardings(param_logical_axes(config), abstract, mesh)
                 if mesh is not None else None)

    params: Params = {}
    nonfinite: list[str] = []
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def handle(fpath: str) -> Any:
            if fpath not in handles:
                handles[fpath] = stack.enter_context(_open_safetensors(fpath))
            return handles[fpath]

        # one group per param of our tree: one spec, or L specs of a stacked (scanned) param
        for path, group in _param_groups(config, specs):
            shape = tuple(_tree_get(layer_abstract, group[0].path).shape)
            want = hf_shape(group[0].kind, shape)
            tensors, where = [], []
            for spec in group:
                name = names[spec.hf_name]
                fpath = files[name]
                tensor = handle(fpath).get_slice(name)
                got = tuple(int(x) for x in tensor.get_shape())
                if got != want:
                    raise ValueError(f"{fpath}: tensor {name!r} has shape {list(got)}, expected "
                                     f"{list(want)} for {config.describe()}")
                tensors.append(tensor)
                where.append((name, fpath))
            finite = [True] * len(group)
            try:
                params_leaf = _load_leaf(group[0].kind, shape, tensors, np_dtype,
                                         None if shardings is None
                                         else _tree_get(shardings, path), finite,
                                         stacked=len(group) > 1 or path[0] == "layers")
            except Exception as e:  # noqa: BLE001 - safetensors / IO errors of a damaged file
                names_ = ", ".join(repr(n) for n, _ in where[:3])
                raise ValueError(f"{where[0][1]}: cannot read tensor(s) {names_}"
                                 f"{' ...' if len(where) > 3 else ''} (truncated or damaged "
                                 f"file?): {type(e).__name__}: {e}") from e
            nonfinite += [f"{n} ({os.path.basename(f)})"
                          for (n, f), ok in zip(where, finite, strict=True) if not ok]
            _tree_set(params, path, params_leaf)
    if nonfinite:
        logging.warning("load_hf(%s): %d tensor(s) hold NaN or inf values: %s%s", folder,
                        len(nonfinite), ", ".join(nonfinite[:5]),
                        " ..." if len(nonfinite) > 5 else "")
    return config, params


def _layer_path(path: Sequence[str]) -> tuple[tuple[str, ...], int | None]:
    """A spec path ("layer_i", ...) -> (("layers", ...), i) of the scanned layout; other paths
    -> (path, None)."""
    if path[0].startswith("layer_"):
        return ("layers", *path[1:]), int(path[0][len("layer_"):])
    return tuple(path), None


def _param_groups(config: ModelConfig, specs: list[TensorSpec]
                  ) -> list[tuple[tuple[str, ...], list[TensorSpec]]]:
    """(path in our params, the specs it is read from in layer order): one spec per param, or
    with a scanned config (`ModelConfig.scanned`) the L per-layer specs of each stacked param."""
    if not config.scanned:
        return [(s.path, [s]) for s in specs]
    groups: dict[tuple[str, ...], list[TensorSpec]] = {}
    for s in specs:  # specs list layers in order
        groups.setdefault(_layer_path(s.path)[0], []).append(s)
    return list(groups.items())


def _stored(params: Params, path: Sequence[str]) -> tuple[Any, int | None]:
    """(the stored leaf, layer index into its leading axis or None) of a spec path: a layer's
    param of scanned params is row i of the stacked "layers" param."""
    stacked, i = _layer_path(path)
    if i is not None and "layers" in params:
        return _tree_get(params, stacked), i
    return _tree_get(params, path), None


def _spec_shape(params: Params, path: Sequence[str]) -> tuple[int, ...]:
    leaf, i = _stored(params, path)
    return tuple(leaf.shape) if i is None else tuple(leaf.shape[1:])


def _spec_leaf(params: Params, path: Sequence[str]) -> Any:
    leaf, i = _stored(params, path)
    return leaf if i is None else leaf[i]


def _load_leaf(kind: str, shape: tuple[int, ...], tensors: list[Any], np_dtype: np.dtype,
               sharding: Any, finite: list[bool], *, stacked: bool = False) -> jax.Array:
    """One param from open safetensors slices: whole, or shard by shard on `sharding`. With
    `stacked`, tensors[l] is layer l of a [L, *shape] param (read per shard too, so a device
    reads only its slice of each layer). `finite[l]` is set False when a read of tensors[l]
    holds NaN or inf."""
    def reader(j: int) -> Callable[[tuple[slice, ...]], np.ndarray]:
        def read(hf_index: tuple[slice, ...]) -> np.ndarray:
            block = tensors[j][hf_index]
            if finite[j] and not np.isfinite(block).all():
                finite[j] = False
            return block
        return read

    def block(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return read_block(kind, shape, index, reader(0)).astype(np_dtype)
        lo, hi = _bounds(index[0], len(tensors))
        return np.stack([read_block(kind, shape, index[1:], reader(j)).astype(np_dtype)
                         for j in range(lo, hi)])

    full_shape = (len(tensors), *shape) if stacked else shape
    if sharding is None:
        return jnp.asarray(block(tuple(slice(None) for _ in full_shape)))
    memo: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(_bounds(s, n) for s, n in zip(index, full_shape, strict=True))
        if key not in memo:  # replicated dims ask for the same block once per device
            memo[key] = np.ascontiguousarray(block(index))
        return memo[key]

    return jax.make_array_from_callback(full_shape, sharding, callback)


# ======================================================================== save_hf
def to_hf_tensors(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """{HF name: numpy array} of the backbone params (host copies, in the params' dtype)."""
    out = {}
    for spec in hf_tensor_specs(config):
        out[spec.hf_name] = np.ascontiguousarray(
            to_hf_layout(spec.kind, _host(_spec_leaf(params, spec.path))))
    return out


def _host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_hf(config: ModelConfig, params: Params, path: PathLike, *,
            generation_config: Mapping[str, Any] | None = None,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Write an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Writes config.json (`config_to_hf`), model.safetensors (or model-0000i-of-0000n.safetensors
    shards of at most `max_shard_bytes` plus model.safetensors.index.json) with tensors in the
    params' dtype, and generation_config.json when `generation_config` is given. A scalar head
    in `params` is not part of the HF architecture and is not written. Tensors are moved to the
    host one shard at a time; on several hosts every process gathers, process 0 writes.
    """
    from safetensors.numpy import save_file

    hf = config_to_hf(config)
    specs = hf_tensor_specs(config)
    abstract = abstract_params(config.replace(scan_layers=False))  # per-layer shapes
    for spec in specs:  # params in either layout: per layer, or stacked (scanned)
        try:
            got = _spec_shape(params, spec.path)
        except (KeyError, TypeError):
            raise ValueError(f"save_hf: params have no {'/'.join(spec.path)} for "
                             f"{config.describe()}") from None
        want = tuple(_tree_get(abstract, spec.path).shape)
        if got != want:
            raise ValueError(f"save_hf: param {'/'.join(spec.path)} has shape "
                             f"{list(got)}, config expects {list(want)}")
    dtypes = {np.dtype(_stored(params, s.path)[0].dtype).name for s in specs}
    hf["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        leaf = _stored(params, spec.path)[0]
        nbytes = int(np.prod(_spec_shape(params, spec.path))) * np.dtype(leaf.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    writer = jax.process_index() == 0
    out = os.fspath(path)
    if writer:
        os.makedirs(out, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {s.hf_name: np.ascontiguousarray(to_hf_layout(
            s.kind, _host(_spec_leaf(params, s.path)))) for s in shard}
        if writer:
            save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({s.hf_name: fname for s in shard})
        del tensors
    if not writer:
        return
    if len(shards) > 1:
        total = sum(int(np.prod(_spec_shape(params, s.path)))
                    * np.dtype(_stored(params, s.path)[0].dtype).itemsize for s in specs)
        _write_json(os.path.join(out, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(out, "config.json"), hf)
    if generation_config is not None:
        _write_json(os.path.join(out, "generation_config.json"), dict(generation_config))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
