"""Batched generation: prefill + decode with a KV cache, N samples per prompt, greedy /
temperature / top-k / top-p sampling, stops (EOS, length, stop strings), log-probs.

    sampler.py  the `Sampler` (host API: padding, buckets, params, outputs) and `SampleOutput`
    decode.py   the jitted prefill and decode loop (device programs), `cache_phases`
    tokens.py   one token per row: temperature, top-k, top-p (nucleus), inverse-CDF draw
    stops.py    stop strings: a byte-level Aho-Corasick automaton lifted to tokens
"""

from scalign.sampling.decode import EOS, MAX_LENGTH, STOP_REASONS, STOP_STRING, cache_phases
from scalign.sampling.sampler import SampleOutput, Sampler
from scalign.sampling.stops import aho_corasick, first_stop_end, stop_string_table
from scalign.sampling.tokens import categorical_inverse_cdf, nucleus_cutoff, sample_tokens

__all__ = ["EOS", "MAX_LENGTH", "STOP_REASONS", "STOP_STRING", "SampleOutput", "Sampler",
           "aho_corasick", "cache_phases", "categorical_inverse_cdf", "first_stop_end",
           "nucleus_cutoff", "sample_tokens", "stop_string_table"]
