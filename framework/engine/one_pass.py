"""One-token samples that ask for their prompt's logprobs, served by one forward pass.

The official SDK's `compute_logprobs` is such a request: `sample(prompt, max_tokens=1,
include_prompt_logprobs=True)`. Through the decode loop it costs two passes over the prompt's new
tokens: a prefill (keys/values, and the logits the one token is drawn from), then a scoring pass for
the prompt's logprobs. Here one pass does both and keeps the logits after the prompt's last token:

- a prompt of whose logprobs the prefix cache knows none goes through the training forward
  (`TrainingSteps.forward_with_cache`), which records every position's keys/values on the way, so its
  logprobs equal a training step's exactly;
- a prompt the cache knows part of (another completion of a scored context, a sampled sequence) goes
  through the prefix scorer (`scoring.PrefixScorer.logprobs_and_next`), which feeds only the tokens
  whose logprobs no entry holds (the last token alone when all are known).

The token is drawn from those logits as the decode loop draws a sequence's first token
(`sampling.choose_tokens` with the sample's key, draw 0), and the prompt's keys/values and logprobs go
to the prefix cache, so a later request that extends the prompt computes only its own tokens.

Requests that want top-k logprobs, stop strings, more than one token or more samples than the decode
pool's rows go through the decode loop. Prompt logprobs equal `Engine.logprobs`'s exactly for a prompt
alone; prompts batched together (padded to one row length) agree to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from framework.engine.prefix_cache import PrefixCache
from framework.engine.requests import SampledRow, SampleJob
from framework.engine.shapes import bucket, length_bucket
from framework.sampling import RowParams, choose_tokens, sample_keys
from models.kv_cache import KVCache

logger = logging.getLogger(__name__)

ForwardWithCache = Callable[[Sequence[SampleJob]], tuple[list[np.ndarray], jax.Array, KVCache]]
"""`jobs -> (prompt logprobs per job (NaN first), last-position logits [B, V], keys/values [B rows])`."""
ScorePrompts = Callable[[Sequence[SampleJob]], tuple[list[np.ndarray | None], dict[int, tuple[jax.Array, int]]]]
"""`jobs -> (prompt logprobs per job, None where the cache knows none of them; job -> (logits [rows, V],
row) after its prompt)`; the scorer caches what it computes."""


def eligible(job: SampleJob) -> bool:
    """Whether `job` is a one-token sample asking for its prompt's logprobs and nothing this path lacks."""
    return (job.prompt_logprobs and job.max_tokens == 1 and not job.topk_prompt and not job.topk_sample
            and not job.stop_strings)


def _first_draw(last_logits: jax.Array, index: jax.Array, key_data: jax.Array, temperature: jax.Array,
                top_p: jax.Array, top_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The first token of each sample (of prompt `index[r]`) and its logprob, as the decode loop draws it."""
    logits = last_logits[index]
    rows = logits.shape[0]
    params = RowParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=jnp.ones((rows,), jnp.int32),
                       keys=jax.random.wrap_key_data(key_data), stop_tokens=jnp.full((rows, 1), -1, jnp.int32))
    token = choose_tokens(logits, params, jnp.int32(0))
    logprob = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
    return token, logprob


class OnePass:
    """Serves `eligible` requests (worker thread only)."""

    def __init__(self, forward_with_cache: ForwardWithCache, score_prompts: ScorePrompts, prefix_cache: PrefixCache,
                 extract_entry: Callable[..., jax.Array], min_length: int):
        self._forward = forward_with_cache
        self._score = score_prompts
        self._prefix = prefix_cache
        self._extract_entry = extract_entry
        self._min_length = min_length
        self._draw = jax.jit(_first_draw)

    def positions(self, jobs: Sequence[SampleJob]) -> int:
        """Token positions the training forward of `jobs` computes (rows and length rounded up as the
        engine lays them out: one prompt per row); a bound on what the scorer computes of them."""
        return bucket(len(jobs)) * length_bucket(max(len(j.prompt) for j in jobs), self._min_length)

    def run(self, jobs: Sequence[SampleJob], cached: Sequence[int]) -> list[tuple[np.ndarray, list[SampledRow], int]]:
        """Each job's prompt logprobs, sampled rows and prompt tokens taken from the prefix cache; the
        prompts go to the prefix cache. `cached[i]`: what the cache holds of job i's prompt
        (`PrefixCache.cached_length`)."""
        logprobs: list[np.ndarray | None] = [None] * len(jobs)
        following: dict[int, tuple[jax.Array, int]] = {}  # job -> (logits after its prompt, row)
        warm = [i for i, c in enumerate(cached) if c]
        if warm:
            scored, after = self._score([jobs[i] for i in warm])
            for w, i in enumerate(warm):
                if scored[w] is not None:  # (None: the cache holds keys/values of it but no logprobs)
                    logprobs[i], following[i] = scored[w], after[w]
        cold = [i for i, lp in enumerate(logprobs) if lp is None]
        cache = None
        if cold:
            computed, last_logits, cache = self._forward([jobs[i] for i in cold])
            for c, i in enumerate(cold):
                logprobs[i], following[i] = computed[c], (last_logits, c)
        out: list[tuple[np.ndarray, list[SampledRow], int]] = [
            (lp, [], 0 if i in cold else cached[i]) for i, lp in enumerate(logprobs)]
        by_array: dict[int, list[int]] = {}
        for i, (array, _) in following.items():
            by_array.setdefault(id(array), []).append(i)
        for members in by_array.values():
            self._draw_first(jobs, members, following, out)
        if cache is not None:
            try:
                self._cache_prompts([jobs[i] for i in cold], [logprobs[i] for i in cold], cache)
            except Exception:  # the results stand; only the cache misses them
                logger.exception("caching one-pass prompts failed")
        return out

    def _draw_first(self, jobs: Sequence[SampleJob], members: list[int],
                    following: dict[int, tuple[jax.Array, int]], out: list) -> None:
        """The first token of every sample of the jobs `members`, whose next-token logits are rows of one
        array, appended to their rows in `out`."""
        rows = [(i, s) for i in members for s in range(jobs[i].num_samples)]
        n = bucket(len(rows))
        index, key_data = np.zeros(n, np.int32), np.zeros((n, 2), np.uint32)
        temperature, top_p, top_k = np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.int32)
        keys = {i: np.asarray(jax.random.key_data(sample_keys(jobs[i].seed, jobs[i].num_samples))) for i in members}
        for r, (i, s) in enumerate(rows):
            job = jobs[i]
            index[r], key_data[r] = following[i][1], keys[i][s]
            temperature[r], top_p[r], top_k[r] = job.temperature, job.top_p, job.top_k
        tokens, token_logprobs = self._draw(following[members[0]][0], index, key_data, temperature, top_p, top_k)
        tokens, token_logprobs = np.asarray(tokens), np.asarray(token_logprobs)
        for r, (i, _) in enumerate(rows):
            token = int(tokens[r])
            out[i][1].append(SampledRow([token], [float(token_logprobs[r])],
                                        "stop" if token in jobs[i].stop_tokens else "length"))

    def _cache_prompts(self, jobs: Sequence[SampleJob], logprobs: list[np.ndarray], cache: KVCache) -> None:
        if not self._prefix.enabled:
            return
        for i, job in enumerate(jobs):
            if self._prefix.covering(job.snapshot_id, job.prompt) is None:
                length = min(bucket(len(job.prompt), 16), cache.capacity)
                entry = self._extract_entry(cache, jnp.int32(i), length=length)
                self._prefix.insert(job.snapshot_id, job.prompt, entry, logprobs[i])
            else:  # held already (e.g. sampled) without these logprobs: teach them
                self._prefix.learn_logprobs(job.snapshot_id, job.prompt, logprobs[i])


__all__ = ["OnePass", "eligible"]
