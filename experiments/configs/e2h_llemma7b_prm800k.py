"""Easy-to-hard at real scale: Llemma-7B, MATH and PRM800K on a TPU slice (Sun et al. 2024).

    python experiments/launch.py --config=experiments/configs/e2h_llemma7b_prm800k.py \
        --workdir=gs://YOUR_BUCKET/runs/e2h_llemma7b --config.checkpoint.path=... \
        --config.data.math_train=... --config.data.math_test=... \
        --config.reward_models.prm800k=...

Sun et al. (2024), "Easy-to-Hard Generalization: Scalable Alignment Beyond Human Supervision":
the policy (Llemma-7B) is fine-tuned on demonstrations of EASY MATH problems (levels 1-3) only;
the evaluators (PRM / ORM / OPRM) are trained on PRM800K's human labels of easy problems only;
the evaluators then re-rank N policy samples on MATH500, easy and hard (levels 4-5).

Every path below is a placeholder (replace YOUR_BUCKET, or pass --config.x=...); nothing is
downloaded. What to put there:

  checkpoint.path         an HF folder of Llemma-7B (EleutherAI/llemma_7b): config.json,
                          *.safetensors and the SentencePiece tokenizer.model.
  data.math_train         PRM800K's `prm800k/math_splits/train.jsonl`: the 12,000 MATH problems
                          outside MATH500 (7,500 train + 4,500 test), the split PRM800K and the
                          paper use; levels of PRM800K problems are looked up here by text.
  data.math_test          PRM800K's `prm800k/math_splits/test.jsonl` (MATH500).
  reward_models.prm800k   PRM800K's `prm800k/data/phase{1,2}_train.jsonl` label files.

Hardware: a TPU v5e-16 slice (v5litepod-16: 16 chips, 16 GiB HBM each, 4 hosts) or a v5p-8
(4 chips, 95 GiB each, 1 host), the two slices `tpu/README.md` walks through; its memory plan
(`python -m scalign.plan --config=<this file> --tpu=v5e-16,v5p-8`) is the table there. The mesh
is pure FSDP (data=1, fsdp=-1 -> 16 on v5e-16, 4 on v5p-8): params, gradients and AdamW moments
are sharded over every chip (float32 params + 2 moments of 7B = 84 GB -> ~5.3 GB per chip on 16
chips, plus the gradients), the batch of 128 gives 8 rows per chip on v5e-16 (32 on v5p-8),
and `remat="full"` keeps only each block's input for the backward pass: with it both steps fit
both slices by the plan's estimate, without it neither fits. With tensor parallelism instead
(e.g. 16 chips: data=1, fsdp=4, tensor=4) heads, MLP and vocabulary split 4 ways and the batch
4 ways (32 rows per fsdp shard); use it when activation memory, not parameter memory, is the
limit. On a slice of another size fsdp=-1 adapts; the batch of 128 must stay divisible by
data*fsdp*grad_accum_steps (validation says so).

Hyperparameters. Reward models (the paper's): learning rate 2e-5, 2 epochs, batch 128,
sequence length 768, bf16 compute (params and AdamW state stay float32). `train.epochs=2`
makes each evaluator train for ceil(2 * its records / 128) steps, so ORM, PRM and OPRM (whose
data sizes differ: OPRM = PRM + ORM) each see 2 epochs; the step counts are in the report.
Warmup (3% of ~1,000 steps), cosine decay, no weight decay and clipping at 1.0 are our choices.
SFT (our choices where the brief gives none): the same optimizer, ~3 epochs of the ~6,000 easy
demonstrations at batch 128 (150 steps), length 768.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

BUCKET = "gs://YOUR_BUCKET"  # placeholder: where the model, data and runs live
BATCH = 128
SEQ_LEN = 768
EASY = (1, 2, 3)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "easy-to-hard: Llemma-7B, MATH + PRM800K (TPU v5e-16 / v5p-8)"
    c.seed = 0
    c.stages = ("checkpoint", "data", "sft", "reward_models", "rerank", "report")
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    # The policy: Llemma-7B from a Hugging Face folder (weights streamed onto the mesh shards).
    c.checkpoint = ConfigDict()
    c.checkpoint.source = "hf"
    c.checkpoint.path = f"{BUCKET}/llemma_7b"  # config.json + *.safetensors + tokenizer.model
    c.checkpoint.tokenizer = placeholder(str)              # default: <path>/tokenizer.model
    c.checkpoint.cache_dir = placeholder(str)
    c.checkpoint.dtype = "float32"             # master weights for AdamW
    c.checkpoint.compute_dtype = "bfloat16"    # activations and matmul inputs

    # Shapes the checkpoint must have (checked when SFT starts from it; used by the abstract
    # compile test to build the step without the weights).
    c.model = ConfigDict()
    c.model.preset = "llemma_7b"

    c.data = ConfigDict()
    c.data.domain = "math"
    c.data.math_train = f"{BUCKET}/prm800k/math_splits/train.jsonl"
    c.data.math_test = f"{BUCKET}/prm800k/math_splits/test.jsonl"  # MATH500
    c.data.levels = (1, 2, 3, 4, 5)
    c.data.n_train = placeholder(int)        # all (a cap per level also limits which PRM800K problems count)
    c.data.n_test = placeholder(int)
    c.data.on_error = "raise"
    c.data.grading_timeout_s = 2.0
    c.data.tokenizer = "checkpoint"  # Llemma's SentencePiece model

    c.sft = ConfigDict()
    c.sft.init = "checkpoint"    # fine-tune Llemma-7B (not a fresh config.model)
    c.sft.levels = EASY          # demonstrations of easy problems only
    c.sft.steps = 150            # ~3 epochs of ~6,000 level 1-3 demonstrations at batch 128
    c.sft.batch_size = BATCH
    c.sft.seq_len = SEQ_LEN
    c.sft.on_too_long = "drop"   # a few MATH solutions exceed 768 tokens
    c.sft.grad_accum_steps = 1
    c.sft.remat = "full"
    c.sft.clip_norm = 1.0
    c.sft.log_every = 5
    c.sft.checkpoint_every = 50
    c.sft.keep_checkpoints = 1
    c.sft.optimizer = ConfigDict({"learning_rate": 2e-5, "warmup_steps": 5,
                                  "min_lr_ratio": 0.0, "weight_decay": 0.0})

    # Evaluators on PRM800K's human labels of easy problems (the paper's PRM/OPRM data).
    c.reward_models = ConfigDict()
    c.reward_models.label_source = "prm800k"
    c.reward_models.prm800k = (f"{BUCKET}/prm800k/data/phase1_train.jsonl",
                               f"{BUCKET}/prm800k/data/phase2_train.jsonl")
    c.reward_models.prm800k_on_error = "raise"
    c.reward_models.levels = EASY
    c.reward_models.evaluators = ("orm", "prm", "oprm")
    c.reward_models.after_first_error = "drop"  # PRM800K labels end at the first wrong step
    c.reward_models.max_ratio = 3.0             # ORM positives:negatives within 1:3..3:1
    c.reward_models.keep_one_class = 2
    c.reward_models.train = ConfigDict()
    c.reward_models.train.epochs = 2            # steps = ceil(2 * records / batch) per evaluator
    c.reward_models.train.batch_size = BATCH
    c.reward_models.train.seq_len = SEQ_LEN     # longer PRM800K solutions are dropped, counted
    c.reward_models.train.grad_accum_steps = 1  # 8 rows per chip fit v5e-16 with remat
    c.reward_models.train.remat = "full"
    c.reward_models.train.clip_norm = 1.0
    c.reward_models.train.log_every = 10
    c.reward_models.train.checkpoint_every = 200
    c.reward_models.train.keep_checkpoints = 1
    c.reward_models.train.optimizer = ConfigDict({"learning_rate": 2e-5, "warmup_steps": 30,
                                                  "min_lr_ratio": 0.0, "weight_decay": 0.0})

    # Re-ranking on MATH500 (43/90/105/128/134 problems at levels 1-5: all of them).
    c.rerank = ConfigDict()
    c.rerank.levels = (1, 2, 3, 4, 5)
    c.rerank.problems_per_level = 134
    c.rerank.max_n = 64
    c.rerank.temperature = 0.7
    c.rerank.max_new_tokens = 512
    c.rerank.seeds = 1
    c.rerank.num_subsets = 20
    c.rerank.batch_size = 512
    c.rerank.score_batch_size = 128
    c.rerank.aggregations = ("min", "prod", "mean", "max", "last")
    c.rerank.plot_aggregation = "min"

    c.debug = ConfigDict({"stop_after_steps": placeholder(int), "nan_at_step": placeholder(int)})
    return c
