"""The job-side model helper on the real Gemma-3-270M and MiniLM (experimental venv only):
option log-probs with left padding match an unpadded full forward; embeddings rank sensibly."""
from __future__ import annotations

import dataclasses
import logging

import pytest

torch = pytest.importorskip("torch")

from jobs.contract.errors import ModelUnavailable, NonFiniteError  # noqa: E402
from jobs.contract.spec import DEFAULT_MODEL, ModelSpec  # noqa: E402
from jobs.lib import rubric  # noqa: E402
from jobs.lib.llm import Engine  # noqa: E402
from jobs.paging.convert import DEFAULT_OUT_DIR  # noqa: E402

MODEL = ModelSpec(name=DEFAULT_MODEL, path=str(DEFAULT_OUT_DIR))

pytestmark = [pytest.mark.engine, pytest.mark.skipif(
    not (DEFAULT_OUT_DIR / "config.json").exists(), reason="no default model")]


class _Ctx:
    def __init__(self) -> None:
        self.metrics: dict = {}
        self.log = logging.getLogger("test")

    def metric(self, **m) -> None:
        self.metrics.update(m)


@pytest.fixture(scope="module")
def engine():
    e = Engine(_Ctx(), MODEL, batch_size=2)
    yield e
    e.close()


def test_option_logprobs_with_left_padding_match_a_plain_forward(engine):
    prompts = ["Question: Is the sky blue on a clear day? Answer yes or no.\nAnswer:",
               "Q: Is fire cold?\nAnswer:"]            # different lengths: the second is padded
    got = engine.option_logprobs(prompts, rubric.OPTIONS)
    tok, model = engine.loaded.tokenizer, engine.loaded.model
    for prompt, row in zip(prompts, got):
        with torch.no_grad():
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1].float()
        ref = torch.log_softmax(logits, -1)
        for option, value in row.items():
            token = tok(option, add_special_tokens=False)["input_ids"][0]
            assert value == pytest.approx(float(ref[token]), abs=2e-3)
    assert engine.ctx.metrics["prompt_tokens"] > 0


def test_option_scores_from_nan_logits_fail_instead_of_ranking_garbage(engine):
    head = engine.loaded.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, _a, out: out * float("nan"))
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite option scores .* in \[models.gemma-3-270m\]"):
            engine.option_logprobs(["Q: Is fire cold?\nAnswer:"], rubric.OPTIONS)
    finally:
        hook.remove()


def test_complete_reports_tokens_per_second(engine):
    prompts = ["The capital of France is", "My favourite fruit is the"]
    first = engine.complete(prompts, max_new_tokens=4)
    assert all(first) and engine.complete(prompts, max_new_tokens=4) == first   # greedy
    assert engine.ctx.metrics["tokens_generated"] >= 1 and engine.ctx.metrics["tokens_per_s"] > 0


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="import-default"):
        Engine(_Ctx(), dataclasses.replace(MODEL, path=str(tmp_path / "none")), batch_size=1)


def test_minilm_embeddings_put_related_texts_closer():
    from jobs.lib.clustering import cosine
    from jobs.lib.embed import Embedder
    a, b, c = Embedder().embed(["A bike tour along the river.", "Cycling trip by the water.",
                                "The database ran out of disk space."])
    assert cosine(a, b) > cosine(a, c) + 0.2
    assert sum(x * x for x in a) == pytest.approx(1.0, abs=1e-4)


def test_model_table_variant_kv_cache_and_kernels_reach_the_engine_and_its_metrics():
    """[models.NAME] variant / keep_precise_layers / kv_cache / kernels are what the engine uses,
    and the run's metrics record the per-layer choice, the bytes a pass reads and the cache kind."""
    from jobs.paging.quant import QuantSpec, write_variant

    write_variant(DEFAULT_OUT_DIR, QuantSpec(4, 64))  # idempotent; the variants tests share it
    spec = dataclasses.replace(MODEL, vram_budget_bytes=96 * 1024**2, variant="auto", keep_precise_layers=2,
                               kv_cache="int8", kernels="auto")
    e = Engine(_Ctx(), spec, batch_size=2)
    try:
        assert e.complete(["The capital of France is"], max_new_tokens=4)[0]
        m = e.ctx.metrics
    finally:
        e.close()
    # 2 resident layers (precise: read once), then keep 2 at each end: layers 0-1 and 16-17 precise.
    assert m["engine_variants"] == "PP" + "F" * 14 + "PP"
    assert (m["engine_fast_layers"], m["engine_precise_layers"]) == (14, 4)
    assert m["kv_cache"] == "int8" and m["kv_cache_peak_bytes"] > 0
    assert m["engine_kernels"] == "torch" and m["engine_kernels_reason"] == "cpu"
    per_pass = m["engine_bytes_read_per_pass"]  # streamed: 2 precise (~11.1 MB each) + 14 fast (~3.1 MB)
    assert 0.25 * 16 * 11_000_000 < per_pass < 0.55 * 16 * 11_200_000
