"""GGUF (llama.cpp) checkpoints -> (ModelConfig, params, Tokenizer).

The file is parsed by `read_gguf` (a small reader of the GGUF v2/v3 layout: header, metadata
key/values, tensor infos, aligned tensor data, memory-mapped), using the `gguf` package's
constants (value and quantisation types, block sizes) and `gguf.quants.dequantize`, which turns
every quantisation type into float32. (`gguf.GGUFReader` builds a numpy view per array element
and spends 25-40 s on the 262144-entry vocabulary of Gemma 3; this reader takes about a second.)
Architectures: llama, qwen2, qwen3, gemma, gemma2, gemma3 (their
`general.architecture` names). GGUF tensors in numpy layout are HF tensors ([out, in] for
linear maps), named `token_embd`, `blk.{i}.attn_q`, ...; they are renamed to HF names and go
through the same layout map as `load_hf` (`convert.hf.hf_tensor_specs`), after two llama.cpp
conventions are undone:

* llama: llama.cpp's converter permutes the rows of attn_q / attn_k from HF's rotate-half RoPE
  layout to the interleaved-pair layout, per head: W.reshape(N, 2, Dh/2, D).swapaxes(1, 2).
  The inverse, W.reshape(N, Dh/2, 2, D).swapaxes(1, 2), restores HF's rows (N = n_heads for q,
  n_kv_heads for k). qwen2/qwen3/gemma* use the rotate-half ("neox") layout and are not permuted.
* gemma, gemma2, gemma3: llama.cpp stores RMSNorm weights as 1 + w; we store w (norm_offset 1),
  so 1 is subtracted from every `*_norm` tensor.

Config from metadata (`{arch}.` keys): embedding_length D, block_count L, feed_forward_length F,
attention.head_count H, attention.head_count_kv K (default H), attention.key_length Dh (default
D/H), attention.layer_norm_rms_epsilon, rope.freq_base (default 1e4), context_length,
rope.scaling.{type, factor, original_context_length} (linear / yarn), attention.sliding_window;
vocabulary size = rows of token_embd; tied embeddings when there is no `output` tensor. What
GGUF lacks is derived the way llama.cpp (and transformers' GGUF loader) does:
gemma2 slides even layers and soft-caps with attn_logit_softcapping / final_logit_softcapping
(defaults 50 / 30); gemma3 slides all but every 6th layer, uses RoPE base 1e4 on sliding layers
and applies rope scaling to global layers only; Gemma 2/3 scale queries by Dh^-1/2, except the
27B models (Gemma 2: 46 layers, Gemma 3: 62 layers) which use (D/H)^-1/2 as llama.cpp does.
(transformers' GGUF loader keeps its Gemma 3 default query_pre_attn_scalar = 256, the same
value for every Gemma 3 size except 27B.)

The tokenizer is rebuilt as a SentencePiece model from tokenizer.ggml.* (`sp_rebuild`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scalign.data.tokenizer import Tokenizer
from scalign.models.config import ModelConfig
from scalign.models.convert import hf as hfconv
from scalign.models.convert.sp_rebuild import build_sentencepiece
from scalign.models.transformer import stack_layers

PathLike = str | os.PathLike
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
_MISSING = object()

# HF name fragment -> GGUF name fragment (per block, after "model.layers.{i}." -> "blk.{i}.")
_BLOCK_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_tensor_name(hf_name: str, post_norms: bool) -> str:
    """The llama.cpp tensor name of an HF tensor name.

    post_attention_layernorm is llama.cpp's ffn_norm in Llama-style blocks and its
    post_attention_norm in Gemma 2/3 blocks (which have a separate pre-feed-forward norm).
    """
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if not m:
        raise KeyError(f"no GGUF name for {hf_name!r}")
    i, rest = m.groups()
    if rest == "post_attention_layernorm.weight":
        return f"blk.{i}." + ("post_attention_norm.weight" if post_norms else "ffn_norm.weight")
    return f"blk.{i}.{_BLOCK_NAMES[rest]}"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (see module docstring); w is [N*Dh, D]."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {w.shape} for {n_heads} heads")
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ----------------------------------------------------------------------- file format
_GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_BOOL, _GGUF_STRING, _GGUF_ARRAY = 7, 8, 9
_STRUCT = {code: struct.Struct(fmt) for code, fmt in (
    ("<u1", "<B"), ("<i1", "<b"), ("<u2", "<H"), ("<i2", "<h"), ("<u4", "<I"), ("<i4", "<i"),
    ("<f4", "<f"), ("<u8", "<Q"), ("<i8", "<q"), ("<f8", "<d"))}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """A tensor of a GGUF file: numpy-order shape, ggml type and its raw bytes (memory-mapped,
    shaped [..., bytes per row] as `gguf.quants.dequantize` expects)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: Any
    data: np.ndarray

    def dequantize(self) -> np.ndarray:
        """float32 values, shape `self.shape` (`gguf.quants.dequantize`)."""
        from gguf.quants import dequantize

        return np.asarray(dequantize(self.data, self.ggml_type), np.float32).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """Metadata (str -> int | float | bool | str | list[str] | numpy array) and tensors."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    """Little-endian reads from a byte buffer, with errors naming the file and offset."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf, self.view, self.path, self.pos = buf, memoryview(buf), path, 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF (needs {n} bytes at offset {self.pos})")

    def take(self, n: int) -> np.ndarray:
        self._need(n)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, code: str) -> Any:
        fmt = _STRUCT[code]
        self._need(fmt.size)
        (v,) = fmt.unpack_from(self.view, self.pos)
        self.pos += fmt.size
        return v

    def string(self) -> str:
        n = self.scalar("<u8")
        self._need(n)
        raw = bytes(self.view[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: invalid UTF-8 string at offset {self.pos - n}") from e

    def value(self, vtype: int, key: str) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            etype, count = self.scalar("<u4"), self.scalar("<u8")
            if etype == _GGUF_STRING:
                return [self.string() for _ in range(count)]
            if etype not in _GGUF_SCALARS:
                raise ValueError(f"{self.path}: metadata {key!r} has arrays of type {etype}")
            dt = np.dtype(_GGUF_SCALARS[etype])
            arr = np.array(self.take(dt.itemsize * count).view(dt))
            return arr.astype(bool) if etype == _GGUF_BOOL else arr
        if vtype not in _GGUF_SCALARS:
            raise ValueError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")
        v = self.scalar(_GGUF_SCALARS[vtype])
        return bool(v) if vtype == _GGUF_BOOL else v


def read_gguf(path: PathLike) -> GGUFFile:
    """Parse a GGUF v2/v3 file (little-endian): metadata and memory-mapped tensors.

    Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count; metadata entries
    (string key, u32 value type, value; arrays are u32 element type, u64 count, elements;
    strings are u64 length + UTF-8 bytes); tensor infos (name, u32 n_dims, u64 dims in ggml
    order, u32 ggml type, u64 offset); then tensor data from the next multiple of
    `general.alignment` (default 32), each tensor at data start + offset, holding
    n_elements / block_size * type_size bytes (`gguf.GGML_QUANT_SIZES`).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    p = os.fspath(path)
    if not p.strip():
        raise FileNotFoundError("GGUF file not found: the path is empty (pass the .gguf file)")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"GGUF file not found: {os.path.abspath(p)}")
    if os.path.getsize(p) == 0:
        raise ValueError(f"{p}: empty file (0 bytes), not a GGUF file")
    buf = np.memmap(p, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, p)
    if cur.take(4).tobytes() != b"GGUF":
        raise ValueError(f"{p}: not a GGUF file (bad magic)")
    version = cur.scalar("<u4")
    if version not in (2, 3):
        raise ValueError(f"{p}: GGUF version {version} is not supported (2, 3; big-endian "
                         f"files are not supported either)")
    n_tensors, n_kv = cur.scalar("<u8"), cur.scalar("<u8")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<u4"), key)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<u4")
        dims = [cur.scalar("<u8") for _ in range(n_dims)]
        infos.append((name, dims, cur.scalar("<u4"), cur.scalar("<u8")))
    align = int(metadata.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, type_code, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_code)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"{p}: tensor {name!r} has unknown ggml type {type_code}") from None
        shape = tuple(int(d) for d in reversed(dims))
        if shape[-1] % block:
            raise ValueError(f"{p}: tensor {name!r} row of {shape[-1]} is not a multiple of the "
                             f"{qtype.name} block size {block}")
        row_bytes = shape[-1] // block * type_size
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        lo = start + offset
        if lo + nbytes > len(buf):
            raise ValueError(f"{p}: tensor {name!r} runs past the end of the file")
        tensors[name] = GGUFTensor(name, shape, qtype,
                                   buf[lo:lo + nbytes].reshape(*shape[:-1], row_bytes))
    return GGUFFile(p, version, metadata, tensors)


class _Meta:
    """Typed access to GGUF metadata, with errors naming the file and key."""

    def __init__(self, gguf_file: GGUFFile):
        self.fields = gguf_file.metadata
        self.source = gguf_file.path

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.fields:
            if default is _MISSING:
                raise ValueError(f"{self.source}: metadata key {key!r} is missing")
            return default
        return self.fields[key]


def _config_from_meta(meta: _Meta, arch: str, tensors: dict[str, Any]) -> ModelConfig:
    a = arch
    d_model = int(meta.get(f"{a}.embedding_length"))
    n_layers = int(meta.get(f"{a}.block_count"))
    n_heads = int(meta.get(f"{a}.attention.head_count"))
    n_kv = meta.get(f"{a}.attention.head_count_kv", n_heads)
    if isinstance(n_kv, np.ndarray):
        if len(set(n_kv.tolist())) != 1:
            raise ValueError(f"{meta.source}: per-layer {a}.attention.head_count_kv {n_kv} is "
                             f"not supported")
        n_kv = int(n_kv[0])
    head_dim = int(meta.get(f"{a}.attention.key_length", d_model // n_heads))
    v_len = int(meta.get(f"{a}.attention.value_length", head_dim))
    if v_len != head_dim:
        raise ValueError(f"{meta.source}: {a}.attention.value_length={v_len} differs from "
                         f"key_length={head_dim}")
    rope_dims = meta.get(f"{a}.rope.dimension_count", head_dim)
    if int(rope_dims) != head_dim:
        raise ValueError(f"{meta.source}: {a}.rope.dimension_count={rope_dims} != head_dim "
                         f"{head_dim} (partial rotary embeddings are not supported)")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{meta.source}: tensor 'rope_freqs.weight' (llama.cpp's per-frequency "
                         f"RoPE factors, e.g. Llama 3.1) is not supported")
    max_pos = meta.get(f"{a}.context_length", None)
    theta = float(meta.get(f"{a}.rope.freq_base", 10_000.0))
    scaling = _rope_scaling(meta, a, max_pos)
    gemma = a in ("gemma", "gemma2", "gemma3")
    window = meta.get(f"{a}.attention.sliding_window", None)
    layer_types: tuple[str, ...] = ()
    if a == "gemma2":
        layer_types = tuple("local" if i % 2 == 0 else "global" for i in range(n_layers))
    elif a == "gemma3":
        layer_types = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(n_layers))
    if layer_types and not window:
        raise ValueError(f"{meta.source}: {a}.attention.sliding_window is missing")
    if a in ("gemma2", "gemma3"):
        big = n_layers == (46 if a == "gemma2" else 62)  # the 27B models
        query_scale = (d_model // n_heads) ** -0.5 if big else head_dim ** -0.5
    else:
        query_scale = None
    vocab = int(tensors["token_embd.weight"].shape[0])
    return ModelConfig(
        vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(n_kv), head_dim=head_dim,
        mlp_dim=int(meta.get(f"{a}.feed_forward_length")),
        activation="gelu_tanh" if gemma else "silu",
        norm_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon")),
        norm_offset=1.0 if gemma else 0.0, embed_scale=gemma,
        tie_embeddings="output.weight" not in tensors,
        rope_theta=theta, rope_local_theta=10_000.0 if a == "gemma3" else None,
        rope_scaling=scaling, rope_scaling_local=a != "gemma3",
        attn_softcap=float(meta.get(f"{a}.attn_logit_softcapping", 50.0))
        if a == "gemma2" else None,
        final_softcap=float(meta.get(f"{a}.final_logit_softcapping", 30.0))
        if a == "gemma2" else None,
        query_scale=query_scale, post_norms=a in ("gemma2", "gemma3"),
        qk_norm=a in ("qwen3", "gemma3"), qkv_bias=a == "qwen2",
        sliding_window=int(window) if layer_types else None, layer_types=layer_types,
        max_position_embeddings=int(max_pos) if max_pos is not None else None, family=a)


def _rope_scaling(meta: _Meta, a: str, max_pos: Any) -> tuple[tuple[str, Any], ...] | None:
    kind = meta.get(f"{a}.rope.scaling.type", "none")
    factor = meta.get(f"{a}.rope.scaling.factor", None)
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return (("factor", float(factor)), ("type", "linear"))
    if kind == "yarn":
        orig = meta.get(f"{a}.rope.scaling.original_context_length", max_pos)
        return tuple(sorted({"type": "yarn", "factor": float(factor),
                             "original_max_position_embeddings": int(orig)}.items()))
    raise ValueError(f"{meta.source}: {a}.rope.scaling.type={kind!r} is not supported "
                     f"(linear, yarn)")


def _tokenizer(meta: _Meta) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{meta.source}: tokenizer.ggml.model={model!r} cannot be rebuilt as a "
                         f"SentencePiece model (only 'llama'-type SentencePiece vocabularies)")
    tokens = meta.get("tokenizer.ggml.tokens")
    n = len(tokens)
    scores = np.asarray(meta.get("tokenizer.ggml.scores", np.zeros(n)), np.float32).tolist()
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(n)), np.int64).tolist()
    serialized = build_sentencepiece(
        tokens, scores, types,
        bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        unk_id=int(meta.get("tokenizer.ggml.unknown_token_id", 0)),
        pad_id=(None if "tokenizer.ggml.padding_token_id" not in meta.fields
                else int(meta.get("tokenizer.ggml.padding_token_id"))),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    return Tokenizer(serialized, source=f"{meta.source} (rebuilt SentencePiece)")


def load_gguf(path: PathLike, *, dtype: Any = None
              ) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Read a GGUF file: config from metadata, dequantised params, rebuilt tokenizer.

    Args:
      path: a local .gguf file.
      dtype: storage dtype of the params (default float32); tensors are dequantised to float32
        and then cast.

    Returns:
      (config, params, tokenizer); params laid out like `init_params(config, key)`.
    """
    gfile = read_gguf(path)
    p = gfile.path
    meta = _Meta(gfile)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{p}: general.architecture={arch!r} is not supported; supported: "
                         f"{list(ARCHITECTURES)}")
    tensors = gfile.tensors
    config = _config_from_meta(meta, arch, tensors)
    config = config.replace(param_dtype=hfconv._dtype_name(dtype))
    np_dtype = np.dtype(config.params_dtype)
    specs = hfconv.hf_tensor_specs(config)
    abstract = hfconv.abstract_params(config.replace(scan_layers=False))  # per-layer shapes
    names = {s.hf_name: gguf_tensor_name(s.hf_name, config.post_norms) for s in specs}
    missing = sorted(n for n in names.values() if n not in tensors)
    unexpected = sorted(set(tensors) - set(names.values()))
    if missing or unexpected:
        raise ValueError(f"{p}: tensors do not match {config.describe()}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    params: dict[str, Any] = {}
    for spec in specs:
        name = names[spec.hf_name]
        shape = tuple(hfconv._tree_get(abstract, spec.path).shape)
        w = tensors[name].dequantize()
        if tuple(w.shape) != hfconv.hf_shape(spec.kind, shape):
            raise ValueError(f"{p}: tensor {name!r} has shape {list(w.shape)}, expected "
                             f"{list(hfconv.hf_shape(spec.kind, shape))}")
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_rope_rows(w, config.n_heads if "attn_q" in name
                                    else config.n_kv_heads)
        if config.norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(config.norm_offset)
        leaf = hfconv.from_hf_layout(spec.kind, shape, w).astype(np_dtype)
        # a scanned model stacks the layers (the file stores them one by one): keep them on the
        # host until then
        hfconv._tree_set(params, spec.path, leaf if config.scanned else jnp.asarray(leaf))
    if config.scanned:
        params = jax.tree.map(jnp.asarray, stack_layers(params, config.n_layers))
    return config, params, _tokenizer(meta)
