"""Stage `data`: build the domain's splits and the tokenizer.

`config.data`:

  domain      "stepmath" (synthetic, `data.stepmath`) or "math" (Hendrycks MATH, `MathDomain`).
  levels      the levels to keep (both splits).
  tokenizer   "train" (default): train a SentencePiece model on the train texts of
              `tokenizer_levels` (default the SFT levels, so hard problems stay unseen), with
              `tokenizer_vocab_size` pieces and `tokenizer_model_type` ("bpe", default, or
              "char": one piece per character, what the letter-node `path` designs need so that
              a node is the same token after a space, a ">" or a line break); "checkpoint": use
              the tokenizer of the `checkpoint`
              stage (a released model's), which must then come before `data` in config.stages.
  stepmath:   `design` (level table), `n_train` / `n_test` per level (int or {level: n}).
  math:       `math_train`, `math_test`: MATH files (JSONL, e.g. PRM800K's
              `math_splits/{train,test}.jsonl` = MATH500 test, or MATH directory trees), a path
              or a list of paths, local or gs://; optional `n_train` / `n_test` caps per level
              (int, {level: n} or None = all); `on_error` ("raise" | "skip": bad records are
              skipped and counted in the report); `grading_timeout_s` (symbolic grading limit,
              default 2). The files are checked when the stage runs, not in validation (a
              config may name gs:// paths that only the TPU VM can read).

Artifacts: `domain` (saved under `stages/data/domain/`) and, with tokenizer="train",
`tokenizer` (`stages/data/tokenizer.model`).
"""

from __future__ import annotations

import ml_collections
from etils import epath

from scalign.data.domain import MathDomain, StepMathDomain, load_domain, solution_steps
from scalign.data.records import ON_ERROR_VALUES
from scalign.data.tokenizer import Tokenizer
from scalign.reporting import markdown_table
from scalign.stages.base import Context, Stage, register_stage, require_block

DOMAINS = ("stepmath", "math")
TOKENIZERS = ("train", "checkpoint")
TOKENIZER_MODEL_TYPES = ("bpe", "char")


def math_paths(cfg: ml_collections.ConfigDict, key: str) -> list[str]:
    """`config.data.<key>` as a list of paths (a single path or a list/tuple of them)."""
    value = cfg.get(key)
    if isinstance(value, str):
        return [value]
    return [str(v) for v in (value or ())]


def check_paths_exist(paths: list[str], key: str) -> None:
    """Raise FileNotFoundError naming `key` and the path for each missing file or folder."""
    missing = [p for p in paths if not epath.Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{key}: no such file or directory: "
                                + ", ".join(repr(p) for p in missing))


def _validate_tokenizer(config: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                        errors: list[str]) -> None:
    source = cfg.get("tokenizer", "train")
    stages = list(config.get("stages", ()))
    if source not in TOKENIZERS:
        errors.append(f"config.data.tokenizer must be one of {TOKENIZERS}, got {source!r}")
        return
    checkpoint_first = "checkpoint" in stages and stages.index("checkpoint") < stages.index(
        "data")
    if source == "checkpoint" and not checkpoint_first:
        errors.append("config.data.tokenizer='checkpoint' needs the checkpoint's tokenizer: put "
                      "stage 'checkpoint' before 'data' in config.stages")
    if source == "train":
        if cfg.get("tokenizer_model_type", "bpe") not in TOKENIZER_MODEL_TYPES:
            errors.append(f"config.data.tokenizer_model_type must be one of "
                          f"{TOKENIZER_MODEL_TYPES}, got {cfg.get('tokenizer_model_type')!r}")
        if "tokenizer_vocab_size" not in cfg:
            errors.append("config.data.tokenizer_vocab_size is missing (needed with "
                          "config.data.tokenizer='train')")
        if "checkpoint" in stages:
            errors.append("config.data.tokenizer='train' would replace the tokenizer of stage "
                          "'checkpoint' with one that does not match its vocabulary; set "
                          "config.data.tokenizer='checkpoint'")


@register_stage
class DataStage(Stage):
    name = "data"

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "data", ("levels",), errors)
        if cfg is None:
            return
        domain = cfg.get("domain")
        if domain not in DOMAINS:
            errors.append(f"config.data.domain must be one of {DOMAINS}, got {domain!r}")
            return
        if domain == "stepmath":
            errors.extend(f"config.data.{k} is missing" for k in ("n_train", "n_test")
                          if k not in cfg)
            from scalign.data import stepmath
            try:
                known = stepmath.levels(cfg.get("design"))
            except ValueError as e:
                errors.append(f"config.data.design: {e}")
            else:
                bad = [lv for lv in cfg.levels if lv not in known]
                if bad:
                    errors.append(f"config.data.levels has {bad}; the stepmath design has "
                                  f"levels {list(known)}")
        else:
            for key in ("math_train", "math_test"):
                if not math_paths(cfg, key):
                    errors.append(f"config.data.{key} is missing (a MATH file or folder, or a "
                                  f"list of them; local or gs://)")
            if cfg.get("on_error", "raise") not in ON_ERROR_VALUES:
                errors.append(f"config.data.on_error must be one of {ON_ERROR_VALUES}, got "
                              f"{cfg.get('on_error')!r}")
            bad = [lv for lv in cfg.levels if lv not in (1, 2, 3, 4, 5)]
            if bad:
                errors.append(f"config.data.levels has {bad}; MATH levels are 1-5")
        _validate_tokenizer(config, cfg, errors)

    def run(self, ctx: Context) -> None:
        cfg = ctx.config.data
        out = ctx.stage_dir(self.name)
        domain = self._build(ctx)
        if cfg.get("tokenizer", "train") == "checkpoint":
            tokenizer, tok_levels = ctx.need("tokenizer"), None
        else:
            tok_levels = tuple(cfg.get("tokenizer_levels") or ctx.config.get("sft", {}).get(
                "levels", domain.levels))
            corpus = [r["prompt"] + r["response"] for r in domain.train_records(tok_levels)]
            tokenizer = Tokenizer.train(corpus, out / "tokenizer.model",
                                        vocab_size=int(cfg.tokenizer_vocab_size),
                                        user_defined_symbols=("\n\n",),
                                        model_type=cfg.get("tokenizer_model_type", "bpe"))
            ctx.artifacts["tokenizer"] = tokenizer
        domain.save(out / "domain")
        ctx.artifacts["domain"] = domain
        if isinstance(domain, MathDomain):
            self._report_math(ctx, domain, tokenizer, tok_levels)
        else:
            self._report(ctx, domain, tokenizer, tok_levels)

    def _build(self, ctx: Context) -> StepMathDomain | MathDomain:
        cfg = ctx.config.data
        if cfg.domain == "stepmath":
            return StepMathDomain.build(tuple(cfg.levels), _per_level(cfg.n_train),
                                        _per_level(cfg.n_test), int(ctx.config.seed),
                                        cfg.get("design"))
        train, test = math_paths(cfg, "math_train"), math_paths(cfg, "math_test")
        check_paths_exist(train, "config.data.math_train")
        check_paths_exist(test, "config.data.math_test")
        return MathDomain.build(train, test, tuple(cfg.levels),
                                n_train=_per_level(cfg.get("n_train")),
                                n_test=_per_level(cfg.get("n_test")),
                                on_error=cfg.get("on_error", "raise"),
                                timeout_s=float(cfg.get("grading_timeout_s", 2.0)))

    def load(self, ctx: Context) -> None:
        out = ctx.stage_dir(self.name)
        ctx.artifacts["domain"] = load_domain(out / "domain")
        if ctx.config.data.get("tokenizer", "train") == "train":
            ctx.artifacts["tokenizer"] = Tokenizer.load(out / "tokenizer.model")

    def _report(self, ctx: Context, domain: StepMathDomain, tokenizer: Tokenizer,
                tok_levels: tuple[int, ...] | None) -> None:
        model_type = ctx.config.data.get("tokenizer_model_type", "bpe")
        rows = []
        for lv in domain.levels:
            test = domain.test_problems(lv)
            steps = [p.num_steps for p in test] or [0]
            rows.append({"level": lv, "train": len(domain.train_problems(lv)),
                         "test": len(test), "mean_steps": sum(steps) / len(steps),
                         "mean_mul": sum(getattr(p, "num_mul", 0) for p in test)
                         / max(len(test), 1)})
        ctx.results.set_rows(self.name, rows)
        example = domain.test_problems(domain.levels[-1])[0]
        ids = tokenizer.encode(example.prompt + example.solution)
        md = [f"## Data: {domain.name} (design `{domain.design}`)", "",
              markdown_table(rows, ["level", "train", "test", "mean_steps", "mean_mul"]), "",
              f"{_tokenizer_line(tokenizer, tok_levels, model_type)}; a level-{example.level} "
              f"problem with "
              f"its solution is {len(ids)} tokens:", "", "```",
              (example.prompt + example.solution).rstrip(), "```", ""]
        ctx.report.set_section(self.name, "\n".join(md))

    def _report_math(self, ctx: Context, domain: MathDomain, tokenizer: Tokenizer,
                     tok_levels: tuple[int, ...] | None) -> None:
        rows = []
        for lv in domain.levels:
            train = domain.train_problems(lv)
            steps = [len(solution_steps(p.solution)) for p in train] or [0]
            rows.append({"level": lv, "train": len(train),
                         "test": len(domain.test_problems(lv)),
                         "mean_demo_steps": sum(steps) / len(steps)})
        stats = []
        for part in ("train", "test"):
            info = domain.info.get(part, {})
            stats += [{"split": part, "metric": k, "value": int(v)} for k, v in info.items()
                      if k != "reasons"]
            stats += [{"split": part, "metric": f"skipped_{reason}", "value": int(n)}
                      for reason, n in sorted(info.get("reasons", {}).items())]
        ctx.results.set_rows(self.name, rows + stats)
        md = [f"## Data: MATH (PRM800K layout), levels {list(domain.levels)}", "",
              f"Train: {', '.join(domain.info.get('train_paths', []))}; test: "
              f"{', '.join(domain.info.get('test_paths', []))}. Train problems whose text is "
              f"in the test split are dropped.", "",
              markdown_table(rows, ["level", "train", "test", "mean_demo_steps"]), "",
              markdown_table(stats, ["split", "metric", "value"]), ""]
        example = next((p for lv in domain.levels for p in domain.train_problems(lv)), None)
        if example is not None:
            text = domain.prompt(example) + domain.demonstration(example)
            md += [f"{_tokenizer_line(tokenizer, tok_levels)}; the SFT demonstration of "
                   f"{example.uid} (level {example.level}) is "
                   f"{len(tokenizer.encode(text, add_bos=True))} tokens:", "", "```",
                   text.rstrip(), "```", ""]
        ctx.report.set_section(self.name, "\n".join(md))


def _tokenizer_line(tokenizer: Tokenizer, tok_levels: tuple[int, ...] | None,
                    model_type: str = "bpe") -> str:
    if tok_levels is None:
        return f"Tokenizer: the checkpoint's ({tokenizer.vocab_size} pieces)"
    kind = {"bpe": "BPE", "char": "character"}.get(model_type, model_type)
    return (f"Tokenizer: SentencePiece {kind}, {tokenizer.vocab_size} pieces, trained on the "
            f"train texts of levels {list(tok_levels)}")


def _per_level(value) -> int | dict[int, int] | None:
    if value is None or isinstance(value, int):
        return value
    return {int(k): int(v) for k, v in dict(value).items()}
