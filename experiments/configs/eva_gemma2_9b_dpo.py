"""eva at real scale: Gemma-2-9B-it, DPO, on a TPU slice (Ye et al. 2024's main setting).

    python experiments/launch.py --config=experiments/configs/eva_gemma2_9b_dpo.py \
        --workdir=gs://YOUR_BUCKET/runs/eva_gemma2_9b_dpo \
        --config.checkpoint.path=... --config.eva.prompts=... --config.eva.reward_model=...

Ye et al. (2024), *Evolving Alignment via Asymmetric Self-Play*: the solver Gemma-2-9B-it is
trained with DPO on UltraFeedback prompts (fixed) or on prompts the creator evolved from them
(eva); Arena-Hard win rate 51.6 -> 60.1 with eva. The paper's settings here: DPO beta 0.05,
learning rate 5e-7 with cosine decay and warmup ratio 0.1, 6 responses per prompt (temperature
0.7, top-p 0.9), chosen = highest / rejected = lowest reward, gap informativeness, 25% of the
prompts selected by importance weighting, 4 evolutions each, 80% evolved / 20% old prompts.
Our choices where the paper is silent or hardware-bound: 128 pairs per update, prompt + response
length 2048, 3 iterations of 78 updates (~10k pairs per iteration at 128), bf16 compute with
f32 params and AdamW state, `remat="full"`.

Paths (placeholders; nothing is downloaded):
  checkpoint.path     an HF folder of google/gemma-2-9b-it (config.json, safetensors,
                      tokenizer.model);
  eva.prompts         a JSONL prompt set ({"prompt": ...} per line; UltraFeedback's prompts);
  eva.reward_model    the scalar reward model that scores responses (the paper: ArmoRM-8B).

Status: the config VALIDATES (`experiment.validate`, the eva stage's validator) and its DPO
step lowers for Gemma-2-9B shapes on a fake 8-device mesh from abstract values
(tests/stages/test_eva_gemma_config.py); `scalign.plan` plans its step from `config.eva.loss`,
`batch_size`, `seq_len` and `remat`. RUNNING it needs the JSONL prompt source and a scalar
reward-model loader in stage `eva`, which exist only for stepmath today (the stage says so).

Hardware: a TPU v5p-16 slice (8 chips, 95 GiB HBM each): mesh pure FSDP (fsdp=-1 -> 8); 9.2B
f32 params + 2 AdamW moments = 110 GB -> ~14 GB per chip; 128 pairs = 256 sequences of 2048
tokens per update in 4 accumulated micro-batches of 32 pairs, one rematerialised block per
layer.
"""

from ml_collections import ConfigDict

BUCKET = "gs://YOUR_BUCKET"


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "eva: Gemma-2-9B-it, DPO (TPU v5p-16)"
    c.seed = 0
    c.stages = ("checkpoint", "eva", "report")
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.model = ConfigDict()
    c.model.preset = "gemma2_9b"  # what the checkpoint must match (and what scalign.plan builds)

    c.checkpoint = ConfigDict()
    c.checkpoint.source = "hf"
    c.checkpoint.path = f"{BUCKET}/models/gemma-2-9b-it"
    c.checkpoint.dtype = "float32"
    c.checkpoint.compute_dtype = "bfloat16"

    e = c.eva = ConfigDict()
    e.prompt_source = "jsonl"
    e.prompts = f"{BUCKET}/data/ultrafeedback_prompts.jsonl"
    e.reward_model = f"{BUCKET}/models/armorm-llama3-8b"
    e.loss = "dpo"
    e.hparams = ConfigDict({"beta": 0.05})
    e.variant = "eva"
    e.informativeness = "gap"
    e.selection = "importance_weighted"
    e.fraction = 0.25
    e.evolutions = 4
    e.evolved_share = 0.8
    e.iterations = 3
    e.samples = 6
    e.temperature = 0.7
    e.top_p = 0.9
    e.max_new_tokens = 1024
    e.batch_size = 128          # preference pairs per update
    e.updates = 78              # per iteration: ~10k pairs at 128
    e.seq_len = 2048            # prompt + response tokens
    e.remat = "full"
    # 4 micro-batches of 32 pairs per update: `scalign.plan` puts the step at 42.7 GiB (XLA:CPU
    # 51.4) of a v5p chip's 95, against 69.3 / 114 without accumulation (tpu/README.md)
    e.grad_accum_steps = 4
    e.optimizer = ConfigDict({"learning_rate": 5e-7, "schedule": "cosine",
                              "warmup_ratio": 0.1, "min_lr_ratio": 0.0, "weight_decay": 0.0})
    return c
