"""Built-in experiment stages; importing this package registers them.

| stage         | reads (artifacts)                               | writes (artifacts / outputs)              |
|---------------|-------------------------------------------------|-------------------------------------------|
| data          | -                                               | `tokenizer`, `domain`                     |
| checkpoint    | - (a released model: GGUF or HF folder)         | `policy`, `tokenizer`                     |
| sft           | `tokenizer`, `domain`                           | `policy`                                  |
| evaluate      | `policy`, `tokenizer`, `domain`                 | accuracy by level (greedy, pass@N)        |
| reward_models | `policy`, `tokenizer`, `domain`                 | `reward_models` (ORM / PRM / OPRM)        |
| rerank        | `policy`, `reward_models`, `tokenizer`, `domain`| re-ranking accuracy by level, N, method   |
| rl            | `policy`, `reward_models`, `tokenizer`, `domain`| RL policy; greedy accuracy easy/hard/all  |
| eva           | `policy`, `tokenizer`, `domain` (+ `reward_models` for eva_prm) | `eva_policy`; win rate vs SFT, hard/all accuracy, pool levels |
| smoke         | `policy`, `tokenizer`                           | samples, checks, timings (real model)     |
| report        | every stage's report section                    | `report.md`                               |

`policy` / `tokenizer` may come from `sft` / `data` or from `checkpoint`. Each stage declares
what it reads in its `requires` (checked before anything runs); the base class, the registry
and `Context` live in `scalign.stages.base` (stages never import the experiment runner).
"""

from scalign.stages import (  # noqa: F401
    checkpoint,
    data,
    eva,
    evaluate,
    report,
    rerank,
    reward_models,
    rl,
    sft,
    smoke,
)
