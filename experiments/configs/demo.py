"""The CPU demo: graded math domain -> tokenizer -> SFT on easy levels -> evaluation.

    python experiments/launch.py --config=experiments/configs/demo.py --workdir=runs/demo

Sized for a 2-core CPU in a few minutes. Later issues append stages (reward models, rerank).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "scalign demo: easy-to-hard on stepmath (CPU)"
    c.seed = 0
    c.stages = ("data", "sft", "evaluate", "report")
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.data = ConfigDict()
    c.data.domain = "stepmath"
    c.data.design = None  # stepmath.DEFAULT_DESIGN
    c.data.levels = (1, 2, 3, 4, 5)
    c.data.n_train = 4000
    c.data.n_test = 200
    c.data.tokenizer_vocab_size = 64
    c.data.tokenizer_levels = (1, 2, 3)

    c.model = ConfigDict()
    c.model.preset = "tiny"
    c.model.overrides = ConfigDict()

    c.sft = ConfigDict()
    c.sft.levels = (1, 2, 3)  # easy-to-hard: demonstrations of easy problems only
    c.sft.steps = 600
    c.sft.batch_size = 32
    c.sft.seq_len = 96
    c.sft.grad_accum_steps = 1
    c.sft.clip_norm = 1.0
    c.sft.log_every = 20
    c.sft.checkpoint_every = 200
    c.sft.keep_checkpoints = 2
    c.sft.optimizer = ConfigDict({"learning_rate": 5e-3, "warmup_steps": 30,
                                  "min_lr_ratio": 0.05, "weight_decay": 0.0})

    c.evaluate = ConfigDict()
    c.evaluate.levels = (1, 2, 3, 4, 5)
    c.evaluate.greedy_problems = 200  # per level
    c.evaluate.pass_problems = 50     # per level, each sampled pass_n times
    c.evaluate.pass_n = 16
    c.evaluate.temperature = 1.0
    c.evaluate.max_new_tokens = 96
    c.evaluate.batch_size = 256
    c.evaluate.show_samples = 2       # decoded samples per level in the report

    c.debug = ConfigDict({"stop_after_steps": None})
    return c
