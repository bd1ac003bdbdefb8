"""Built-in experiment stages; importing this package registers them.

| stage      | reads                      | writes                                 |
|------------|----------------------------|----------------------------------------|
| data       | -                          | tokenizer, domain                      |
| sft        | tokenizer, domain          | policy                                 |
| evaluate   | tokenizer, domain, policy  | accuracy by level (greedy, pass@N)     |
| report     | every section              | report.md                              |
"""

from scalign.stages import data, evaluate, report, rerank, reward_models, sft  # noqa: F401
