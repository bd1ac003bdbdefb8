"""Easy-to-hard PPO at real scale: Llemma-7B policy, 7B PRM and 7B critic (Sun et al. 2024).

    python experiments/launch.py --config=experiments/configs/e2h_llemma7b_ppo.py \
        --workdir=gs://YOUR_BUCKET/runs/e2h_llemma7b_ppo --config.checkpoint.path=... \
        --config.data.math_train=... --config.data.math_test=... \
        --config.reward_models.prm800k=...

`e2h_llemma7b_prm800k.py` (Llemma-7B SFT on easy MATH demonstrations, a PRM trained on
PRM800K's easy-problem labels; every path there is a placeholder to replace) with stage `rl`
running the paper's "PPO, all problems + PRM" row (`ppo_prm`) instead of re-ranking:

- policy: the SFT policy; frozen reference: a copy of it; critic: initialised from the PRM
  (same 7B preset, scalar head), trained with its own AdamW;
- rewards: final answer 1/0 on easy problems (levels 1-3), the constant 0.25 on hard ones,
  the stop penalty -1, and the PRM's `min`-shaped step rewards (upper bound 0.5, bonus 0.25);
- the e2h PPO defaults (shared/notes/papers.md): KL 0.01 with the k1 estimator clamped at 0,
  gamma = lambda = 1, clip 0.2, value clip 0.2, vf_coef 0.1, whitened rewards and
  advantages, temperature 0.7, lr 2e-5, rollout batch 512, step batch 64 (8 minibatches of
  one epoch). Our choices: 512 prompts x 1 sample per rollout (a critic needs no group),
  prompt + response width `seq_len` 768 (512 new tokens; longer prompts are left out and
  counted), 100 iterations, a constant learning rate, bf16 compute with f32 params and AdamW
  state, `remat="full"`, and `logprob_chunk` 128 (log-softmax over the 32k vocabulary in
  chunks of 128 positions).

Hardware: the prm800k config's pure-FSDP mesh (data=1, fsdp=-1, tensor=1). Three 7B models
train or serve at once: ~215 GB of f32 params and AdamW state (policy and critic 81 GB each,
frozen reference and PRM 27 GB each). `python -m scalign.plan --config=<this file>
--tpu=v5p-8,v5e-16 --no_compile` (it reads config.rl: methods, prompts_per_iteration,
samples_per_prompt, seq_len, per_method.ppo_prm.minibatches, remat) estimated on 2026-12-04:
v5p-8 (4 chips x 95 GiB) fits, 66.5 GiB per chip for the policy step and 65.3 for the value
step; v5e-16 (16 x 16 GiB) does NOT fit (18.9 and 18.0 GiB per chip, mostly the other
resident models), so use a v5p-8 or a larger slice. Checked on CPU only: the config validates
for 8 devices and its PPO policy and value steps lower from abstract shapes on a fake 8-device
mesh (tests/stages/test_e2h_llemma_ppo_config.py); nothing has run on a TPU.
"""

import os

from ml_collections import ConfigDict

from scalign.experiment import load_config_file

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2h_llemma7b_prm800k.py")


def _base_config() -> ConfigDict:
    return load_config_file(_BASE)


def get_config() -> ConfigDict:
    c = _base_config()
    c.name = "easy-to-hard PPO: Llemma-7B, PRM shaping from easy PRM800K labels (TPU v5p-8)"
    c.stages = ("checkpoint", "data", "sft", "reward_models", "rl", "report")
    c.reward_models.evaluators = ("prm",)   # the PRM shapes rewards and initialises the critic

    c.rl = ConfigDict()
    c.rl.methods = ("sft", "ppo_prm")
    c.rl.levels = (1, 2, 3, 4, 5)
    c.rl.problems_per_level = 100_000        # every MATH train problem of each level
    c.rl.iterations = 100
    c.rl.prompts_per_iteration = 512         # rollout batch 512
    c.rl.samples_per_prompt = 1
    c.rl.max_new_tokens = 512
    c.rl.seq_len = 768                       # prompt (<= 256 tokens) + response
    c.rl.remat = "full"
    c.rl.temperature = 0.7
    c.rl.checkpoint_every = 5
    c.rl.prm = "prm"
    c.rl.value_from = "prm"
    c.rl.optimizer = ConfigDict({"learning_rate": 2e-5, "schedule": "constant",
                                 "weight_decay": 0.0})
    c.rl.reward = ConfigDict({"hard_reward": 0.25, "stop_penalty": -1.0, "shaping_upper": 0.5,
                              "shaping_bonus": 0.25})
    c.rl.per_method = ConfigDict({"ppo_prm": {
        "minibatches": 8,                    # step batch 64 = 512 / 8, one epoch
        "kl_coef": 0.01, "kl_estimator": "k1_clamped", "gamma": 1.0, "lam": 1.0,
        "clip_eps": 0.2, "value_clip": 0.2, "vf_coef": 0.1, "whiten_rewards": True,
        "whiten_advantages": True, "logprob_chunk": 128}})
    c.rl.eval_levels = (1, 2, 3, 4, 5)
    c.rl.eval_problems = 134                 # MATH500: all of each level
    c.rl.eval_batch_size = 128
    return c
