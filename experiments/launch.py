"""Launch an experiment from a config file.

    python experiments/launch.py --config=experiments/configs/demo.py --workdir=runs/demo
    python experiments/launch.py --config=experiments/configs/demo.py:small \
        --config.sft.steps=50 --workdir=runs/x --resume
    python experiments/launch.py --config=experiments/configs/e2h_stepmath.py \
        --workdir=runs/e2h_stepmath --seeds=0,1,2

With `--seeds`, the config runs once per seed (`config.seed` set to it) into
`WORKDIR/seed_<s>/`, one after another (`--resume` continues the unfinished ones), and then
`scalign.aggregate.aggregate_runs` writes `WORKDIR/results.json` and `WORKDIR/report.md` with
every number as mean ± std over the seeds.

`--config` is an ml_collections config file with `get_config()` (an optional `:arg` is passed
to it); any key can be overridden on the command line (`--config.a.b=value`). The config is
validated before anything compiles. Stages, their order and their artifacts are described in
`scalign.stages`; this launcher only parses flags, sets up (multi-process) JAX and calls
`scalign.experiment.run`.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (local path or gs://).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir (finished stages are kept, "
                  "the interrupted one resumes from its newest checkpoint).")
flags.DEFINE_bool("overwrite", False, "Delete --workdir first (only a scalign workdir: one with "
                  "scalign_workdir.json).")
flags.DEFINE_bool("accept_config_changes", False, "With --resume: continue although the config "
                  "differs from the run's in keys that change results (they are listed and "
                  "recorded in scalign_workdir.json).")
flags.DEFINE_list("seeds", None, "Run the config once per seed into WORKDIR/seed_<s>/ and "
                  "aggregate (mean ± std over seeds) into WORKDIR.")
flags.DEFINE_bool("validate_only", False, "Validate the config and exit.")
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs "
                    "(TPU VMs find it themselves; leave unset there).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process CPU/GPU).")
flags.DEFINE_integer("process_id", None, "This process' index (multi-process CPU/GPU).")
flags.DEFINE_integer("cpu_devices", None, "Virtual CPU devices per process (CPU testing).")
flags.mark_flags_as_required(["config"])

FLAGS = flags.FLAGS


def _setup_jax() -> None:
    from scalign.utils import tune_cpu_xla_flags

    tune_cpu_xla_flags()  # before the first backend reads XLA_FLAGS
    import jax

    # Persistent XLA cache: reruns (resume, the demo twice, a config tweak) skip most compiles.
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    from scalign import distributed

    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.coordinator or FLAGS.num_processes:
        distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SCALIGN_DISTRIBUTED"):
        distributed.initialize()
    if jax.process_count() > 1 and jax.process_index() == 0:
        print(distributed.describe(), flush=True)


def _fail(kind: str, error: BaseException | str, code: int = 2) -> None:
    """One line on stderr (no traceback), then exit with `code`."""
    text = " ".join(str(error).split()) if isinstance(error, BaseException) else error
    print(f"{kind}: {text}", file=sys.stderr)
    sys.exit(code)


def _clean(text: str) -> str:
    text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag, a missing config file or an unknown / untyped override
    key is one line and exit code 2."""
    try:
        rest = FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every parse problem is the user's input
        causes, cause = [], e
        while cause is not None and len(causes) < 4:
            causes.append(_clean(str(cause)))
            cause = cause.__cause__ or cause.__context__
        detail = max(causes, key=len)
        if isinstance(e, (KeyError, AttributeError)) or "Did you mean" in detail:
            overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
            quoted = re.findall(r"'([^']+)'", detail)
            named = [o for o in overrides if quoted and quoted[0] in o.split(".")[1:]]
            _fail("config error", f"no such config key in {' '.join(named or overrides)}: "
                                  f"{detail}")
        _fail("flag error", detail)
    try:
        FLAGS.config.get("stages")  # a config file that failed to load raises here
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        path = FLAGS["config"].config_filename if hasattr(FLAGS["config"], "config_filename") \
            else None
        _fail("file not found", f"config file {path or ''}: {lines[-1] if lines else e}")
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail("flag error", f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/absl INFO lines drown the progress bars
    _setup_jax()
    from scalign import experiment
    from scalign.training import preemption
    from scalign.training.checkpoint import CheckpointCorruptError
    from scalign.training.loop import NonFiniteError

    preemption.install()  # SIGTERM (a reclaimed spot VM): save at the next boundary, exit 0

    config = FLAGS.config
    try:
        mesh_shape = experiment.validate(config)
        if FLAGS.validate_only:
            print(f"config OK; mesh {mesh_shape}; stages {list(config.stages)}")
            return
        if not FLAGS.workdir:
            raise experiment.ConfigError("--workdir is required (or pass --validate_only)")
        if FLAGS.seeds:
            _run_seeds(config, [int(s) for s in FLAGS.seeds])
            return
        ctx = experiment.run(config, FLAGS.workdir, resume=FLAGS.resume,
                             overwrite=FLAGS.overwrite,
                             accept_config_changes=FLAGS.accept_config_changes)
    except experiment.ConfigError as e:
        _fail("config error", e)
    except FileNotFoundError as e:
        _fail("file not found", e)
    except (NonFiniteError, CheckpointCorruptError) as e:
        _fail("run stopped", e, code=1)
    except preemption.Preempted as e:
        import jax
        if jax.process_index() == 0:
            print(f"preempted: {e}; resume with: {_resume_command()}", flush=True)
        sys.exit(0)
    report = ctx.workdir / "report.md"
    print(f"done: {ctx.workdir}/results.json" + (f", {report}" if report.exists() else ""))


def _resume_command() -> str:
    """This process' command line, with --resume (and without --overwrite)."""
    import shlex

    args = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume", "--noresume")]
    return shlex.join(["python", sys.argv[0], *args,
                       "--resume"])


def _run_seeds(config, seeds: list[int]) -> None:
    import jax
    from etils import epath

    from scalign import aggregate, experiment

    root = epath.Path(os.path.abspath(FLAGS.workdir))
    if root.exists() and any(root.iterdir()) and not experiment.is_scalign_workdir(root):
        raise experiment.ConfigError(
            f"workdir {root} is not empty and is not a scalign --seeds workdir (no "
            f"{experiment.MARKER}); choose another --workdir or empty it yourself")
    if FLAGS.overwrite and root.exists():
        root.rmtree()
    root.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (root / experiment.MARKER).write_text(json.dumps({"scalign_workdir": 1,
                                                          "kind": "seeds", "seeds": seeds}))
    run_dirs = []
    for seed in seeds:
        cfg = config.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.seed = seed
        run_dir = root / f"seed_{seed}"
        if (run_dir / "results.json").exists() and not FLAGS.resume:
            raise experiment.ConfigError(f"{run_dir} has a finished run; pass --resume to keep "
                                         f"it or --overwrite to start over")
        print(f"== seed {seed}: {run_dir}", flush=True)
        experiment.run(cfg, run_dir, resume=FLAGS.resume and run_dir.exists(),
                       accept_config_changes=FLAGS.accept_config_changes)
        run_dirs.append(run_dir)
    if jax.process_index() == 0:
        aggregate.aggregate_runs(run_dirs, root, title=f"{config.get('name', 'scalign run')}: "
                                 f"{len(seeds)} seeds",
                                 plot_aggregation=config.rerank.get("plot_aggregation", "prod")
                                 if "rerank" in config else "prod")
        print(f"done: {root}/results.json, {root}/report.md")


if __name__ == "__main__":
    from scalign.hostenv import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # glibc malloc on huge pages (scalign.hostenv), before JAX
    app.run(main, flags_parser=_parse_flags)
