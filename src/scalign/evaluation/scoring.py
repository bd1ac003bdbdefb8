"""Scoring token sequences with a scalar-head model (reward model / PRM) on the mesh.

Sequences of any length are right-padded to a bucket (power of two >= 32) and grouped into
fixed-size batches, so a whole evaluation compiles a handful of programs. Scores are
sigmoid probabilities p = sigma(logit) at requested positions (Sun et al. 2024 read step
scores as p_i = sigma(v_i)).

Multi-process (multi-host) use: every process calls `score` with the same sequences (the
stages run the same code on every host); each batch becomes one global array on the batch
sharding, of which each process places only the rows its devices hold
(`jax.make_array_from_process_local_data`), and the batch-sharded scores come back to every
process through `multihost_utils.process_allgather`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from scalign import parallel
from scalign.models.config import ModelConfig
from scalign.models.heads import SCALAR_HEAD, scalar_head_logical_axes, scalar_values
from scalign.models.transformer import param_logical_axes
from scalign.training.step import make_eval_step
from scalign.utils import progress_bar


def scalar_param_shardings(model: ModelConfig, params: Any, mesh: Mesh) -> Any:
    axes = dict(param_logical_axes(model))
    if SCALAR_HEAD in params:
        axes[SCALAR_HEAD] = scalar_head_logical_axes()
    abstract = jax.eval_shape(lambda: params)
    return parallel.tree_shardings(axes, abstract, mesh)


class SequenceScorer:
    """Per-token sigmoid scores of a scalar-head model for many ragged sequences."""

    def __init__(self, model: ModelConfig, params: Any, mesh: Mesh, *, batch_size: int = 64,
                 pad_id: int = 0, min_bucket: int = 32, bucket_step: int = 16):
        if SCALAR_HEAD not in params:
            raise KeyError("params have no scalar head: not a reward model")
        div = parallel.batch_divisor(mesh)
        self.batch_size = -(-batch_size // div) * div
        self.pad_id = pad_id
        self.min_bucket = min_bucket
        self.bucket_step = bucket_step
        self.mesh = mesh
        p_sh = scalar_param_shardings(model, params, mesh)
        self.params = jax.device_put(params, p_sh)

        def fn(p, tokens):
            return jax.nn.sigmoid(scalar_values(model, p, tokens))

        self._batch_sharding = parallel.batch_sharding(mesh)
        self._fn = make_eval_step(fn, mesh, in_shardings=(p_sh, self._batch_sharding),
                                  out_shardings=self._batch_sharding)

    def bucket(self, length: int) -> int:
        """Padded length: `min_bucket`, else `length` rounded up to a multiple of `bucket_step`.

        Sequences are scored in length order, so a batch pads to at most `bucket_step - 1`
        tokens past its longest row (powers of two wasted up to half the forward on the
        ~50-70-token stepmath solutions); one compile per distinct bucket.
        """
        return max(self.min_bucket, -(-length // self.bucket_step) * self.bucket_step)

    def score(self, sequences: Sequence[np.ndarray], *, desc: str = "scoring",
              progress: bool = True) -> list[np.ndarray]:
        """Probabilities [len(seq)] for each sequence (order preserved).

        Every process must pass the same `sequences`; every process gets all the scores.
        """
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out: list[np.ndarray | None] = [None] * len(sequences)
        bar = progress_bar(total=len(sequences), desc=desc, enabled=progress, unit="seq")
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            T = self.bucket(max(len(sequences[i]) for i in idx))
            batch = np.full((self.batch_size, T), self.pad_id, np.int32)
            for r, i in enumerate(idx):
                batch[r, :len(sequences[i])] = sequences[i]
            # the same full batch on every process: each places only its devices' rows
            tokens = jax.make_array_from_process_local_data(self._batch_sharding, batch,
                                                            batch.shape)
            probs = multihost_utils.process_allgather(self._fn(self.params, tokens), tiled=True)
            for r, i in enumerate(idx):
                out[i] = probs[r, :len(sequences[i])]
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

