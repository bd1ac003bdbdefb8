"""Built-in experiment stages; importing this package registers them.

| stage      | reads                      | writes                                 |
|------------|----------------------------|----------------------------------------|
| data       | -                          | tokenizer, domain                      |
| checkpoint | - (a released model)       | policy, tokenizer                      |
| sft        | tokenizer, domain          | policy                                 |
| evaluate   | tokenizer, domain, policy  | accuracy by level (greedy, pass@N)     |
| smoke      | tokenizer, policy          | samples, checks, timings (real model)  |
| report     | every section              | report.md                              |

`policy` / `tokenizer` may come from `sft` / `data` or from `checkpoint`.
"""

from scalign.stages import (  # noqa: F401
    checkpoint,
    data,
    evaluate,
    report,
    rerank,
    reward_models,
    rl,
    sft,
    smoke,
)
