"""Stage `report`: assemble `report.md` from every stage's section, plus run facts."""

from __future__ import annotations

import datetime

import jax

from scalign.reporting import markdown_table
from scalign.stages.base import Context, Stage, register_stage


def write_report(ctx: Context) -> str:
    """Write `report.md` (sections in stage order) and return its text."""
    cfg = ctx.config
    title = cfg.get("name", "scalign run")
    lines = [f"# {title}", "",
             f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} on "
             f"{jax.device_count()} {jax.default_backend()} device(s) "
             f"({jax.devices()[0].device_kind}), mesh {dict(ctx.mesh.shape)}, seed {cfg.seed}, "
             f"jax {jax.__version__}.", "",
             "Every number here is also in `results.json`; training curves are in "
             "`metrics.jsonl` and `tensorboard/`.", ""]
    for name in cfg.stages:
        if name == "report":
            continue
        section = ctx.report.section(name)
        if section:
            lines += [section.rstrip(), ""]
    if ctx.timings:
        rows = [{"stage": k, "seconds": round(v, 1)} for k, v in ctx.timings.items()]
        lines += ["## Timings", "", markdown_table(rows, ["stage", "seconds"]), ""]
    text = "\n".join(lines)
    if jax.process_index() == 0:
        (ctx.workdir / "report.md").write_text(text)
    return text


@register_stage
class ReportStage(Stage):
    name = "report"

    def run(self, ctx: Context) -> None:
        write_report(ctx)

    def load(self, ctx: Context) -> None:
        write_report(ctx)
