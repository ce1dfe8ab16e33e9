"""The continuous-batching engine (no Ray): every request decodes to greedy `generate` of its prompt alone,
whatever shares its steps and whenever it arrived."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import (
    BYTE_VOCAB,
    Served,
    byte_level_tokenizer,
    char_tokenizer,
    engine_config,
    eos_ids,
    greedy_alone,
    new_request,
    tiny_model,
)

from cllm.decoding.modes import MODES
from cllm.models.loading import LoadedModel
from cllm.serving.bridge import AsyncEngine
from cllm.serving.engine import Engine
from cllm.serving.request import Request
from cllm.serving.scheduler import window_for

greedy = greedy_alone  # the reference: generate(do_sample=False) of the prompt alone

PROMPTS = ["Hello there", "a", "The quick brown fox jumps", "x = 1 + 2", "zz", "Once upon a time, far away", "42"]


@pytest.fixture(scope="module")
def char_loaded():
    return LoadedModel(tiny_model("llama"), char_tokenizer(), "tiny-llama")


@pytest.fixture(scope="module")
def byte_loaded():
    return LoadedModel(tiny_model("llama", vocab_size=BYTE_VOCAB), byte_level_tokenizer(), "tiny-bytes")


def job(loaded: LoadedModel, text: str, max_tokens: int, stop=()) -> Request:
    return new_request(loaded.tokenizer, text, max_tokens, stop)


def engine(loaded: LoadedModel, block_size: int = 4, mode: str = "jacobi", **fields) -> Engine:
    return Engine(loaded, engine_config(block_size=block_size, mode=mode, **fields))


def check_cache_layout(eng: Engine) -> None:
    """The cache is one row per running request, and each row holds exactly its prompt and committed tokens."""
    running, cache = eng.runner.running, eng.runner.cache
    if not running:
        assert cache is None
        return
    assert cache.mask.shape[0] == len(running)
    real = cache.mask.sum(1).tolist()
    assert real == [len(e.row.prompt) + len(e.row.generated) - 1 for e in running]
    for layer in cache.cache.layers:
        assert layer.keys.shape[0] == len(running) and layer.keys.shape[-2] == cache.mask.shape[1]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_staggered_arrivals_each_equal_greedy_generate(arch, mode):
    loaded = LoadedModel(tiny_model(arch), char_tokenizer(), arch)
    eng = engine(loaded, block_size=4, mode=mode, max_batch_size=8)
    served = Served(eng, loaded.tokenizer)
    budgets = [30, 7, 25, 16, 40, 12, 20]
    jobs = [job(loaded, p, n) for p, n in zip(PROMPTS, budgets, strict=True)]
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5], 12: [6]}  # step -> requests added before it
    step = 0
    while step <= max(arrivals) or eng.has_work():
        for i in arrivals.get(step, []):
            eng.add(jobs[i])
        served.step()
        check_cache_layout(eng)
        step += 1
    for j, n in zip(jobs, budgets, strict=True):
        assert j.error is None
        assert j.tokens == greedy(loaded, j.prompt_ids, n)
        assert served.text(j) == loaded.tokenizer.decode(j.tokens, skip_special_tokens=True)
        assert j.finish_reason in ("stop", "length")
        assert 0 <= j.queue_seconds <= j.time_to_first_token
        if mode == "ar":
            assert j.forward_passes == len(j.tokens) - 1
        else:
            assert 0 < j.forward_passes <= len(j.tokens) - 1
    assert max(j.batch_size for j in jobs) > 1
    assert eng.runner.cache is None and eng.cache_width == 0
    if MODES[mode].several_blocks:
        assert eng.runner.blocks_spawned > 0  # rows did run two blocks at once


def test_eos_in_the_middle_of_a_block():
    loaded = LoadedModel(tiny_model("llama"), char_tokenizer(), "eos")
    prompt_ids = loaded.tokenizer("Hello there")["input_ids"]
    free = greedy(loaded, prompt_ids, 30)
    cut = next(i for i in range(3, len(free)) if free[i] not in free[:i] and free[i] not in eos_ids(loaded))
    loaded.model.generation_config.eos_token_id = [2, free[cut]]  # that token now ends the answer
    eng = engine(loaded, block_size=8)
    target, other = job(loaded, "Hello there", 30), job(loaded, "Once upon a time, far away", 30)
    eng.add(other)
    eng.step()
    eng.add(target)
    eng.run_until_idle()
    assert target.tokens == free[: cut + 1] == greedy(loaded, prompt_ids, 30)
    assert target.finish_reason == "stop"
    assert other.tokens == greedy(loaded, other.prompt_ids, 30)


def test_stop_string_ends_the_request_and_its_row(char_loaded):
    prompt_ids = char_loaded.tokenizer("x = 1 + 2")["input_ids"]
    full = char_loaded.tokenizer.decode(greedy(char_loaded, prompt_ids, 40), skip_special_tokens=True)
    stop = full[10:12]
    eng = engine(char_loaded, block_size=4)
    served = Served(eng, char_loaded.tokenizer)
    stopped, other = job(char_loaded, "x = 1 + 2", 40, stop=[stop]), job(char_loaded, "zz", 40)
    eng.add(stopped)
    eng.add(other)
    served.run_until_idle()
    assert served.text(stopped) == full[: full.index(stop)]
    assert stopped.finish_reason == "stop" and len(stopped.tokens) < 40
    assert other.tokens == greedy(char_loaded, other.prompt_ids, 40)


def test_max_tokens_one_comes_from_prefill_alone(char_loaded):
    eng = engine(char_loaded, block_size=4)
    long = job(char_loaded, "Once upon a time, far away", 30)
    eng.add(long)
    eng.step()
    single = job(char_loaded, "Hello there", 1)
    eng.add(single)
    stats = eng.step().stats
    assert stats.admitted == 1 and stats.finished == 1 and eng.num_running == 1  # it never joined a pass
    check_cache_layout(eng)
    eng.run_until_idle()
    assert single.tokens == greedy(char_loaded, single.prompt_ids, 1) and single.forward_passes == 0
    assert single.finish_reason in ("stop", "length")
    assert long.tokens == greedy(char_loaded, long.prompt_ids, 30)


def test_abort_frees_the_row_within_one_step_and_leaves_the_others_exact(char_loaded):
    eng = engine(char_loaded, block_size=4)
    served = Served(eng, char_loaded.tokenizer)
    jobs = [job(char_loaded, p, 60) for p in PROMPTS[:3]]
    for j in jobs:
        eng.add(j)
    for _ in range(3):
        served.step()
    waiting = job(char_loaded, "never", 10)
    eng.add(waiting)
    eng.abort(waiting)
    eng.abort(jobs[1])
    tokens_at_abort = len(jobs[1].tokens)
    served.step()
    assert eng.num_running == 2 and jobs[1] not in [e.request for e in eng.runner.running]
    assert served.ended == [waiting, jobs[1]] and eng.num_waiting == 0
    check_cache_layout(eng)
    served.run_until_idle()
    assert len(jobs[1].tokens) == tokens_at_abort and jobs[1].finish_reason is None
    assert waiting.tokens == []
    for i in (0, 2):
        assert jobs[i].tokens == greedy(char_loaded, jobs[i].prompt_ids, 60)
    assert sorted(map(jobs.index, served.ended[1:])) == [0, 1, 2]


def test_a_request_whose_text_fails_fails_alone(char_loaded):
    """The output processor cannot make one request's text: that request ends with the error, its row leaves
    the engine, and the requests sharing its steps go on exactly."""
    eng = engine(char_loaded, block_size=4)
    served = Served(eng, char_loaded.tokenizer)
    jobs = [job(char_loaded, p, 30) for p in PROMPTS[:3]]

    def broken(_tokens):
        raise ConnectionError("client went away")

    served.loop.processor.stream(jobs[1]).push = broken
    for j in jobs:
        eng.add(j)
    served.run_until_idle()
    assert jobs[1] in served.ended and eng.num_running == 0
    assert "client went away" in jobs[1].error
    for i in (0, 2):
        assert jobs[i].error is None and jobs[i].tokens == greedy(char_loaded, jobs[i].prompt_ids, 30)


def test_prefill_first_but_never_two_prefill_only_steps_in_a_row(char_loaded):
    """A step that admits ends after the prefill (newcomers arriving meanwhile wait for no pass), but the
    step after it always runs the pass: a steady stream of arrivals cannot starve the running rows."""
    eng = engine(char_loaded, block_size=4)
    jobs = [job(char_loaded, p, 20) for p in PROMPTS]
    eng.add(jobs[0])
    first = eng.step().stats
    assert first.admitted == 1 and first.running == 0 and len(jobs[0].tokens) == 1  # its first token is out
    shapes = []
    for j in jobs[1:]:  # one arrival before every step
        eng.add(j)
        stats = eng.step().stats
        shapes.append((stats.admitted, stats.running > 0))
    assert shapes == [(1, True), (1, False), (1, True), (1, False), (1, True), (1, False)]
    eng.run_until_idle()
    for j in jobs:
        assert j.tokens == greedy(char_loaded, j.prompt_ids, 20)
    plain = engine(char_loaded, block_size=4, prefill_first=False)
    plain.add(job(char_loaded, PROMPTS[0], 20))
    assert plain.step().stats.running == 1  # the old order: admit and pass in one step


def test_queue_time_is_the_wait_before_admission_and_the_prefill_comes_after_it(char_loaded):
    eng = engine(char_loaded, block_size=4)
    early, late = job(char_loaded, PROMPTS[0], 10), job(char_loaded, PROMPTS[1], 10)
    eng.add(early)
    eng.step()
    eng.add(late)
    time.sleep(0.2)  # the engine is busy elsewhere: the request waits in the queue
    eng.run_until_idle()
    assert early.queue_seconds < 0.2 <= late.queue_seconds
    for j in (early, late):
        assert j.arrived <= j.started_at < j.first_token_at  # the first token comes from a prefill after it
        assert j.queue_seconds < j.time_to_first_token


@pytest.mark.parametrize("mode", [name for name, mode in MODES.items() if not mode.one_token])
def test_token_budget_shrinks_blocks_down_to_ar(char_loaded, mode):
    assert window_for(8, 1, 64) == 8 and window_for(8, 4, 8) == 2 and window_for(8, 20, 8) == 1
    eng = engine(char_loaded, block_size=8, max_tokens_per_step=8, mode=mode)
    budgets = [60, 12, 12, 12, 12]
    jobs = [job(char_loaded, p, n) for p, n in zip(PROMPTS, budgets, strict=False)]
    eng.add(jobs[0])
    assert eng.step().stats.running == 0  # prefill first: the admitting step runs no pass
    windows = [eng.step().stats.window]  # alone: a full block of 8
    for j in jobs[1:]:
        eng.add(j)
    while eng.has_work():
        stats = eng.step().stats
        if stats.running:
            windows.append(stats.window)
            assert stats.slots <= 8
    assert windows[0] == 8 and 1 in windows and windows[-1] == 8  # 5 rows: AR; alone again: full blocks
    for j, n in zip(jobs, budgets, strict=False):
        assert j.tokens == greedy(char_loaded, j.prompt_ids, n)


def test_multiblock_rows_run_two_blocks_while_the_budget_allows(char_loaded):
    """Alone, a multi-block row's window spans two blocks; with more rows than the budget holds at that
    width, each row keeps one block (and less), and every answer still equals generate."""
    eng = engine(char_loaded, block_size=4, mode="multiblock", max_tokens_per_step=16)
    first = job(char_loaded, PROMPTS[2], 40)
    eng.add(first)
    alone = [eng.step().stats.slots for _ in range(8)]
    assert max(alone) > 4  # a second block in flight
    others = [job(char_loaded, p, 24) for p in PROMPTS[3:6]]
    for j in others:
        eng.add(j)
    crowded = []
    while eng.has_work():
        stats = eng.step().stats
        if stats.running == 4:
            crowded.append(stats)
    assert crowded and all(s.window == 4 and s.slots <= 16 for s in crowded)  # 16 slots / 4 rows: one block
    for j in [first, *others]:
        assert j.tokens == greedy(char_loaded, j.prompt_ids, j.max_tokens)


def test_byte_level_streaming_never_splits_a_character(byte_loaded):
    eng = engine(byte_loaded, block_size=4)
    served = Served(eng, byte_loaded.tokenizer)
    prompts = ["héllo wörld", "中文 text", "🎉 party", "naïve café"]
    jobs = [job(byte_loaded, p, 40) for p in prompts]
    for j in jobs:
        eng.add(j)
        served.step()
    served.run_until_idle()
    for j in jobs:
        d = served.deltas[j.request_id]
        assert j.tokens == greedy(byte_loaded, j.prompt_ids, 40)
        expected = byte_loaded.tokenizer.decode(j.tokens, skip_special_tokens=True)
        assert "".join(d) == served.text(j) == expected
        assert not any(delta.endswith("\ufffd") for delta in d[:-1])  # an unfinished character waits


def test_cache_width_follows_live_requests_not_history(char_loaded):
    """A stream of overlapping requests keeps the engine busy for long; its cache must not grow with it."""
    eng = engine(char_loaded, block_size=4)
    jobs = [job(char_loaded, PROMPTS[i % len(PROMPTS)], 12 + (i % 3) * 5) for i in range(48)]
    queue = list(jobs)
    widths, capacities = [], []
    while queue or eng.has_work():
        while queue and eng.num_running + eng.num_waiting < 2:
            eng.add(queue.pop(0))
        eng.step()
        check_cache_layout(eng)
        if eng.runner.running:  # compacted at every step: no unused column on the left, few anywhere
            used = eng.runner.cache.mask.any(0)
            assert bool(used[0]) and int((~used).sum()) <= 0.25 * len(used)
            capacities += [layer.key_buffer.shape[2] for layer in eng.runner.cache.cache.layers]
        widths.append(eng.cache_width)
    longest_pair = 2 * max(len(j.prompt_ids) + j.max_tokens for j in jobs)
    # at most three steps of growth beyond two live requests (never compacted, this run reaches ~300 columns)
    assert max(widths) <= longest_pair + 3 * 4
    assert max(capacities) <= 4 * max(widths)  # the spare columns stay in proportion
    for j in jobs:
        assert j.tokens == greedy(char_loaded, j.prompt_ids, j.max_tokens)


def test_a_failing_pass_fails_its_requests_and_the_engine_goes_on(char_loaded, monkeypatch):
    import cllm.serving.runner

    eng = engine(char_loaded, block_size=4)
    served = Served(eng, char_loaded.tokenizer)
    jobs = [job(char_loaded, p, 20) for p in PROMPTS[:2]]
    for j in jobs:
        eng.add(j)

    def broken_forward(*_args, **_kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(cllm.serving.runner, "jacobi_forward", broken_forward)
    served.step()  # the prefill
    served.step()  # the first pass
    assert all("device lost" in j.error for j in jobs) and served.ended == jobs
    assert not eng.has_work() and eng.runner.cache is None
    monkeypatch.undo()
    later = job(char_loaded, "Hello there", 20)
    eng.add(later)
    eng.run_until_idle()
    assert later.error is None and later.tokens == greedy(char_loaded, later.prompt_ids, 20)


OUTSIDE_THE_VOCABULARY = 10**6  # an id the embedding cannot look up: the forward pass itself fails


def test_a_request_whose_prefill_fails_fails_alone(char_loaded):
    """Requests admitted together: one that cannot prefill fails by itself, the others decode exactly."""
    eng = engine(char_loaded, block_size=4)
    jobs = [job(char_loaded, p, 20) for p in PROMPTS[:3]]
    jobs[1].prompt_ids = jobs[1].prompt_ids + [OUTSIDE_THE_VOCABULARY]  # past `add`'s check, as a bug would be
    served = Served(eng, char_loaded.tokenizer)
    for j in jobs:
        eng.scheduler.waiting.append(j)
    served.run_until_idle()
    assert "IndexError" in jobs[1].error and jobs[1] in served.ended
    for i in (0, 2):
        assert jobs[i].error is None and jobs[i].tokens == greedy(char_loaded, jobs[i].prompt_ids, 20)
    with pytest.raises(ValueError, match="token ids must be in"):
        eng.add(Request(prompt_ids=[5, OUTSIDE_THE_VOCABULARY], max_tokens=5))


def test_a_row_that_breaks_the_pass_fails_alone_and_the_others_stay_exact(char_loaded):
    """A row whose window the model cannot read fails the shared pass: the pass is undone, each row is
    tried alone, the culprit fails, and the others go on from where they were, still equal to `generate`."""
    eng = engine(char_loaded, block_size=4)
    jobs = [job(char_loaded, p, 24) for p in PROMPTS[:3]]
    for j in jobs:
        eng.add(j)
    eng.step()
    eng.step()
    broken = eng.runner.running[1]
    broken.row.window[-1] = OUTSIDE_THE_VOCABULARY
    width = eng.cache_width
    stats = eng.step().stats
    assert "IndexError" in broken.request.error and stats.finished == 1
    assert eng.num_running == 2 and eng.cache_width == width  # the failed pass left nothing behind
    check_cache_layout(eng)
    eng.run_until_idle()
    for i in (0, 2):
        assert jobs[i].error is None and jobs[i].tokens == greedy(char_loaded, jobs[i].prompt_ids, 24)


def test_a_row_alone_is_a_copy_of_that_row_only(char_loaded):
    """What a row is retried on after a failed pass: its own cache row, copied; the shared cache untouched."""
    eng = engine(char_loaded, block_size=4)
    for p in PROMPTS[:3]:
        eng.add(job(char_loaded, p, 24))
    eng.step()
    eng.step()
    cache = eng.runner.cache
    shared = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers()]
    alone = cache.row_alone(1)
    assert torch.equal(alone.mask, cache.mask[1:2])  # the row's mask comes with it
    for layer, (keys, values) in zip(alone.layers(), shared, strict=True):
        assert torch.equal(layer.keys, keys[1:2]) and torch.equal(layer.values, values[1:2])
        assert layer.key_buffer.shape[0] == 1  # no other row, no spare rows
    eng.runner.forward(alone, [eng.runner.running[1].row])  # writes its window into the copy only
    for layer, (keys, values) in zip(cache.layers(), shared, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert alone.layers()[0].keys.shape[-2] > shared[0][0].shape[-2]


def test_spare_cache_rows_follow_the_live_rows_up_to_the_cap(char_loaded):
    """A replica sized for many requests keeps buffers for about twice the rows it runs, never more than
    `max_batch_size`, so a lightly loaded one copies no empty rows."""
    eng = engine(char_loaded, block_size=4, max_batch_size=5)
    eng.add(job(char_loaded, PROMPTS[0], 24))
    eng.step()
    assert {layer.key_buffer.shape[0] for layer in eng.runner.cache.layers()} == {2}
    for p in PROMPTS[1:]:
        eng.add(job(char_loaded, p, 24))
    capacities = set()
    while eng.has_work():
        eng.step()
        if eng.runner.cache is not None and eng.runner.running:
            capacities |= {layer.key_buffer.shape[0] for layer in eng.runner.cache.layers()}
            assert all(layer.rows <= layer.key_buffer.shape[0] for layer in eng.runner.cache.layers())
    assert max(capacities) == 5  # grew to the cap once five ran at once, and no further


def test_a_request_that_cannot_fit_is_refused_before_it_joins(char_loaded):
    eng = engine(char_loaded)
    with pytest.raises(ValueError, match="context"):
        eng.add(Request(prompt_ids=[5] * 500, max_tokens=20))
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add(Request(prompt_ids=[], max_tokens=5))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add(Request(prompt_ids=[5], max_tokens=0))
    assert not eng.has_work()


def test_async_engine_steps_requests_added_from_other_threads(char_loaded):
    """The replica's driver: requests arrive from other threads' event loops at any moment, each still equals
    generate; the engine thread sleeps while there is no work and outlives a failing step callback."""
    eng = engine(char_loaded, block_size=4)
    steps_seen, failures = [], 0

    def on_step(stats):
        nonlocal failures
        steps_seen.append(stats)
        if len(steps_seen) == 2:
            failures += 1
            raise RuntimeError("metrics backend down")

    bridge = AsyncEngine(eng, char_loaded.tokenizer, on_step=on_step)
    jobs = {i: job(char_loaded, p, 24) for i, p in enumerate(PROMPTS)}
    texts: dict[int, str] = {}

    async def arrive(indices, delay):
        await asyncio.sleep(delay)
        streams = [(i, bridge.generate([jobs[i]])) for i in indices]
        for i, stream in streams:
            texts[i] = "".join([output.text async for output in stream])

    arrivals = [threading.Thread(target=asyncio.run, args=(arrive(list(range(k, len(PROMPTS), 3)), 0.02 * k),))
                for k in range(3)]
    for t in arrivals:
        t.start()
    for t in arrivals:
        t.join(60)
    assert sorted(texts) == sorted(jobs)
    assert failures == 1 and bridge.alive
    for i, j in jobs.items():
        assert j.error is None and j.tokens == greedy(char_loaded, j.prompt_ids, 24)
        assert texts[i] == char_loaded.tokenizer.decode(j.tokens, skip_special_tokens=True)
    assert sum(s.admitted for s in steps_seen) == len(PROMPTS)
    idle_steps = eng.steps
    time.sleep(0.2)
    assert eng.steps == idle_steps  # no work: no steps
    late = job(char_loaded, "late", 8)

    async def ask_late():
        return [output async for output in bridge.generate([late])]

    outputs = asyncio.run(asyncio.wait_for(ask_late(), 60))
    assert outputs[-1].finished and late.tokens == greedy(char_loaded, late.prompt_ids, 8)
    bridge.stop(timeout=10)
    assert not bridge.alive
