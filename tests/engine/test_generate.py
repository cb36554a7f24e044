"""generate(): seeded sampling, stop strings, progress and batching over one weight pass per step."""
from __future__ import annotations

import pytest
from engine_helpers import PROMPTS

from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.generate import Sampling, generate
from jobs.paging.open import spec_for

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def streamed(tiny_dirs):
    with load_streamed(spec_for(tiny_dirs["qwen2"], dtype="fp32")) as loaded:
        yield loaded


def _ids(result):
    return [o.token_ids for o in result.outputs]


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(streamed):
    hot = Sampling(greedy=False, temperature=1.5, top_p=1.0, seed=7)
    first = generate(streamed, PROMPTS[:2], max_new_tokens=12, sampling=hot)
    again = generate(streamed, PROMPTS[:2], max_new_tokens=12, sampling=hot)
    other = generate(streamed, PROMPTS[:2], max_new_tokens=12, sampling=Sampling(False, 1.5, 1.0, seed=8))
    assert _ids(first) == _ids(again)
    assert _ids(first) != _ids(other)
    greedy = generate(streamed, PROMPTS[:2], max_new_tokens=12)
    narrow = generate(streamed, PROMPTS[:2], max_new_tokens=12, sampling=Sampling(False, 1.0, 1e-9, seed=3))
    assert _ids(narrow) == _ids(greedy)


def test_stop_string_cuts_text_and_ends_row(streamed):
    full = generate(streamed, PROMPTS[:1], max_new_tokens=12).outputs[0]
    stop = full.text[3:6]
    assert stop and full.text.find(stop) >= 1
    cut = generate(streamed, PROMPTS[:1], max_new_tokens=12, stop=[stop]).outputs[0]
    assert cut.text == full.text[:full.text.find(stop)]
    assert len(cut.token_ids) < len(full.token_ids)


def test_progress_and_one_pass_per_step_whatever_the_batch(streamed):
    seen = []
    result = generate(streamed, PROMPTS, max_new_tokens=5, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(PROMPTS) * 5, len(PROMPTS) * 5)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.batch_sizes == [2, 2]
    assert result.weight_passes <= 2 * 5  # prefill + decode steps per batch, not per prompt
    assert result.tokens_generated == sum(len(o.token_ids) for o in result.outputs)
