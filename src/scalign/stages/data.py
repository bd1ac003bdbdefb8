"""Stage `data`: build the domain's splits and train the tokenizer.

`config.data`: `domain` ("stepmath"), `design` (stepmath level table), `levels`, `n_train` and
`n_test` per level (int or {level: n}), `tokenizer_vocab_size`, `tokenizer_levels` (whose
texts the tokenizer is trained on; default the SFT levels, so hard problems stay unseen).
Artifacts: `domain`, `tokenizer` (saved as `stages/data/{domain/, tokenizer.model}`).
"""

from __future__ import annotations

import ml_collections

from scalign.data.domain import StepMathDomain
from scalign.data.tokenizer import Tokenizer
from scalign.experiment import Context, Stage, register_stage, require_block
from scalign.reporting import markdown_table

DOMAINS = ("stepmath",)


@register_stage
class DataStage(Stage):
    name = "data"

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "data", ("levels", "n_train", "n_test",
                                             "tokenizer_vocab_size"), errors)
        if cfg is not None and cfg.get("domain") not in DOMAINS:
            errors.append(f"config.data.domain must be one of {DOMAINS}, got {cfg.get('domain')!r}")

    def run(self, ctx: Context) -> None:
        cfg = ctx.config.data
        n_train = _per_level(cfg.n_train)
        n_test = _per_level(cfg.n_test)
        domain = StepMathDomain.build(tuple(cfg.levels), n_train, n_test, int(ctx.config.seed),
                                      cfg.get("design"))
        tok_levels = tuple(cfg.get("tokenizer_levels") or ctx.config.get("sft", {}).get(
            "levels", domain.levels))
        corpus = [r["prompt"] + r["response"] for r in domain.train_records(tok_levels)]
        out = ctx.stage_dir(self.name)
        tokenizer = Tokenizer.train(corpus, out / "tokenizer.model",
                                    vocab_size=int(cfg.tokenizer_vocab_size),
                                    user_defined_symbols=("\n\n",))
        domain.save(out / "domain")
        ctx.artifacts.update(domain=domain, tokenizer=tokenizer)
        self._report(ctx, domain, tokenizer, tok_levels)

    def load(self, ctx: Context) -> None:
        out = ctx.stage_dir(self.name)
        ctx.artifacts.update(domain=StepMathDomain.load(out / "domain"),
                             tokenizer=Tokenizer.load(out / "tokenizer.model"))

    def _report(self, ctx: Context, domain: StepMathDomain, tokenizer: Tokenizer,
                tok_levels: tuple[int, ...]) -> None:
        rows = []
        for lv in domain.levels:
            test = domain.test_problems(lv)
            steps = [p.num_steps for p in test] or [0]
            rows.append({"level": lv, "train": len(domain.train_problems(lv)),
                         "test": len(test), "mean_steps": sum(steps) / len(steps),
                         "mean_mul": sum(p.num_mul for p in test) / max(len(test), 1)})
        ctx.results.set_rows(self.name, rows)
        example = domain.test_problems(domain.levels[-1])[0]
        ids = tokenizer.encode(example.prompt + example.solution)
        md = [f"## Data: {domain.name} (design `{domain.design}`)", "",
              markdown_table(rows, ["level", "train", "test", "mean_steps", "mean_mul"]), "",
              f"Tokenizer: SentencePiece BPE, {tokenizer.vocab_size} pieces, trained on the "
              f"train texts of levels {list(tok_levels)}; a level-{example.level} problem with "
              f"its solution is {len(ids)} tokens:", "", "```",
              (example.prompt + example.solution).rstrip(), "```", ""]
        ctx.report.set_section(self.name, "\n".join(md))


def _per_level(value) -> int | dict[int, int]:
    if isinstance(value, int):
        return value
    return {int(k): int(v) for k, v in dict(value).items()}
