"""The serving layers below the Serve deployment, each on its own (no Ray, no HTTP): the request record and
admission, the scheduler's plans, the model runner and its running cache, the engine step's outputs as data,
the static engine, the output processor and the async bridge. The continuous engine end to end is
test_engine.py; the deployed server over HTTP, test_serve.py."""

from __future__ import annotations

import asyncio

import pytest
from conftest import (
    Served,
    char_tokenizer,
    engine_config,
    greedy_alone,
    greedy_text,
    new_request,
    sampled_text,
    tiny_model,
)

from cllm.decoding.core import DecodeFields
from cllm.decoding.jacobi import jacobi_generate
from cllm.decoding.modes import AR, JACOBI, MODES, MULTIBLOCK
from cllm.decoding.multiblock import multiblock_generate
from cllm.decoding.sampling import SamplingParams
from cllm.models.loading import LoadedModel
from cllm.serving.bridge import AsyncEngine, EngineStopped
from cllm.serving.engine import Engine
from cllm.serving.output import OutputProcessor
from cllm.serving.request import ContextLengthError, EngineOutput, Request, RequestError, RequestStatus
from cllm.serving.runner import RunningCache
from cllm.serving.scheduler import Budget, Limits, Scheduler, admit
from cllm.serving.static import StaticEngine, fitting_groups

PROMPTS = ["héllo wörld", "中文 text", "The answer is", "🎉 party", "a", "Once upon a time"]
CHAR_PROMPTS = ["Hello there", "a", "The quick brown fox jumps", "x = 1 + 2", "zz"]


@pytest.fixture(scope="module")
def char_loaded():
    return LoadedModel(tiny_model("llama"), char_tokenizer(), "tiny-llama")


# ---------------------------------------------------------------------------------------------------------
# The decoding modes: one registry


def test_every_mode_names_its_offline_decoder_and_ar_is_jacobi_with_a_block_of_one():
    assert list(MODES) == ["jacobi", "ar", "multiblock"]
    assert MODES["ar"].generate is jacobi_generate and MODES["multiblock"].generate is multiblock_generate
    decode = DecodeFields(block_size=8, init="ngram", max_iters=3)
    assert AR.options(decode) == {"block_size": 1} and AR.block_size(8) == 1
    assert JACOBI.options(decode, seed=5) == {"block_size": 8, "init": "ngram", "seed": 5, "max_iters": 3}
    assert MULTIBLOCK.options(decode) == {"block_size": 8, "init": "ngram", "seed": 0}
    assert [m.name for m in MODES.values() if m.several_blocks] == ["multiblock"]
    with pytest.raises(ValueError, match="mode"):
        engine_config(mode="beam")


# ---------------------------------------------------------------------------------------------------------
# The request record and admission: domain errors that name the parameter


LIMITS = Limits(context=64, vocab_size=100, default_max_tokens=20)


@pytest.mark.parametrize("request_fields, param, kind, words", [
    (dict(prompt_ids=[], max_tokens=5), "prompt", RequestError, "prompt is empty"),
    (dict(prompt_ids=[5, 100], max_tokens=5), "prompt", RequestError, "token ids must be in"),
    (dict(prompt_ids=[5] * 64, max_tokens=None), "prompt", ContextLengthError, "no room"),
    (dict(prompt_ids=[5] * 60, max_tokens=5), "max_tokens", ContextLengthError, "at most 4 new tokens"),
    (dict(prompt_ids=[5], max_tokens=0), "max_tokens", RequestError, ">= 1"),
    (dict(prompt_ids=[5], max_tokens=5, stop=("",)), "stop", RequestError, "non-empty"),
])
def test_admission_refuses_with_a_domain_error_naming_the_parameter(request_fields, param, kind, words):
    with pytest.raises(kind, match=words) as caught:
        admit(Request(**request_fields), LIMITS)
    assert caught.value.param == param and isinstance(caught.value, ValueError)
    assert type(caught.value).__module__ == "cllm.serving.request"  # no HTTP status, no OpenAI error


def test_admission_settles_max_tokens_within_the_context():
    roomy, tight, asked = Request([5] * 10, None), Request([5] * 50, None), Request([5] * 10, 30)
    for request in (roomy, tight, asked):
        admit(request, LIMITS)
    assert (roomy.max_tokens, tight.max_tokens, asked.max_tokens) == (20, 14, 30)


def test_a_request_record_names_its_end_and_its_timings():
    request = Request([1, 2], 4)
    assert request.status is RequestStatus.WAITING and not request.finished and request.finish_reason is None
    request.started_at = request.arrived + 0.5
    request.commit([7], at=request.arrived + 1.0)
    request.commit([8, 9], at=request.arrived + 2.0)
    request.forward_passes = 1
    assert request.tokens == [7, 8, 9] and request.time_to_first_token == 1.0 and request.queue_seconds == 0.5
    assert request.tokens_per_forward == 2.0
    for status, reason in ((RequestStatus.FINISHED_STOPPED, "stop"), (RequestStatus.FINISHED_LENGTH, "length"),
                           (RequestStatus.FINISHED_ABORTED, None)):
        request.status = status
        assert request.finished and request.finish_reason == reason
    request.fail(RuntimeError("boom"))
    assert request.error == "RuntimeError: boom" and request.finish_reason is None


# ---------------------------------------------------------------------------------------------------------
# The scheduler: each step's plan, as data


def scheduler(**fields) -> Scheduler:
    settings = dict(block_size=8, blocks=1, max_running=4, max_tokens_per_step=64, prefill_first=True) | fields
    return Scheduler(**settings)


def test_the_plan_admits_up_to_max_running_and_runs_prefill_first_never_twice_in_a_row():
    plan_maker = scheduler()
    requests = [Request([5], 4) for _ in range(6)]
    for request in requests[:5]:
        plan_maker.add(request)
    first = plan_maker.schedule([])
    assert first.joining == requests[:4] and not first.runs_pass  # a prefill-only step
    assert plan_maker.num_waiting == 1
    second = plan_maker.schedule(requests[:4])  # full: nobody joins, the pass runs
    assert second.joining == [] and second.runs_pass
    plan_maker.abort(requests[1])
    plan_maker.abort(requests[4])  # still waiting: it never starts
    third = plan_maker.schedule(requests[:4])
    assert third.leaving == [requests[1]] and third.dropped == [requests[4]] and third.joining == []
    plan_maker.add(requests[5])
    fourth = plan_maker.schedule([requests[0], requests[2], requests[3]])
    assert fourth.joining == [requests[5]] and not fourth.runs_pass
    plan_maker = scheduler()
    plan_maker.add(Request([5], 4))
    plan_maker.schedule([])
    plan_maker.add(Request([5], 4))
    assert plan_maker.schedule([requests[0]]).runs_pass  # a second admitting step in a row runs its pass


def test_the_token_budget_is_data_and_shrinks_blocks_down_to_one_token():
    one_block = scheduler(block_size=8, max_tokens_per_step=16)
    assert one_block.budget(1) == Budget(width=8, block_size=8, blocks=1)
    assert one_block.budget(4) == Budget(width=4, block_size=4, blocks=1)
    assert one_block.budget(40) == Budget(width=1, block_size=1, blocks=1)  # AR, never less
    two_blocks = scheduler(block_size=4, blocks=2, max_tokens_per_step=16)
    assert two_blocks.budget(1) == Budget(width=8, block_size=4, blocks=2)
    assert two_blocks.budget(4) == Budget(width=4, block_size=4, blocks=1)
    crowded = scheduler(max_running=8, max_tokens_per_step=2)
    for _ in range(5):
        crowded.add(Request([5], 4))
    assert len(crowded.schedule([]).joining) == 2  # one window slot each: the token budget admits two


# ---------------------------------------------------------------------------------------------------------
# The model runner and its running cache


def test_the_runner_keeps_cache_and_mask_together_and_never_changes_its_settings(char_loaded):
    eng = Engine(char_loaded, engine_config(block_size=4, mode="jacobi"))
    runner = eng.runner
    requests = [new_request(char_loaded.tokenizer, p, 40) for p in CHAR_PROMPTS[:3]]
    budget = eng.scheduler.budget(3)
    runner.join(runner.prefill(requests[:2]), budget)
    runner.join(runner.prefill(requests[2:]), budget)

    def consistent(cache: RunningCache) -> None:
        assert cache.rows == len(runner.running)
        for layer in cache.layers():
            assert layer.keys.shape[0] == cache.rows and layer.keys.shape[-2] == cache.width

    consistent(runner.cache)
    assert runner.cache.mask.sum(1).tolist() == [len(r.prompt_ids) for r in requests]
    narrow = Budget(width=2, block_size=2, blocks=1)
    for _ in range(3):
        assert runner.run_pass(narrow).failed == {}
        runner.remove_finished()  # rows an EOS ended
        consistent(runner.cache)
        assert all(len(entry.row.window) <= 2 for entry in runner.running)
    assert runner.settings.block_size == 4 and runner.decoding(narrow).block_size == 2  # a copy per pass
    assert runner.settings.on_commit is None  # nothing is called from inside a pass
    leaving = runner.running[0]
    leaving.row.done = True
    assert runner.remove_finished() == [leaving]
    if runner.running:
        consistent(runner.cache)
        runner.compact()
        consistent(runner.cache)
        assert bool(runner.cache.mask.any(0)[0])  # no column on the left that no row attends to
    else:
        assert runner.cache is None


# ---------------------------------------------------------------------------------------------------------
# The engine step: what each request gained, as data


@pytest.mark.parametrize("mode", list(MODES))
def test_a_step_returns_each_requests_new_tokens_and_its_end_as_data(char_loaded, mode):
    eng = Engine(char_loaded, engine_config(block_size=4, mode=mode))
    requests = [new_request(char_loaded.tokenizer, p, n) for p, n in zip(CHAR_PROMPTS, [20, 5, 14, 9, 1], strict=True)]
    gained = {r.request_id: [] for r in requests}
    ends = {r.request_id: 0 for r in requests}
    for request in requests[:3]:
        eng.add(request)
    step, steps = 0, []
    while eng.has_work() or step < 3:
        if step == 2:
            for request in requests[3:]:
                eng.add(request)
        result = eng.step()
        steps.append(result.stats)
        assert all(isinstance(output, EngineOutput) for output in result.outputs)
        assert len({output.request.request_id for output in result.outputs}) == len(result.outputs)
        for output in result.outputs:
            gained[output.request.request_id] += output.new_tokens
            ends[output.request.request_id] += output.finished
        step += 1
    for request in requests:
        assert gained[request.request_id] == request.tokens == greedy_alone(char_loaded, request.prompt_ids,
                                                                           request.max_tokens)
        assert ends[request.request_id] == 1 and request.finish_reason in ("stop", "length")
    assert_acceptance_adds_up(requests, steps)


def assert_acceptance_adds_up(requests: list[Request], steps: list) -> None:
    """Each request's accepted-length histogram counts its passes and their tokens, and the steps' counts (what
    the server's Prometheus counters add up) are the requests' together."""
    for request in requests:
        assert sum(request.accepted) == request.forward_passes
        assert sum(k * n for k, n in enumerate(request.accepted)) == len(request.tokens) - 1
    assert sum(stats.passes for stats in steps) == sum(request.forward_passes for request in requests)
    assert sum(stats.committed for stats in steps) == sum(len(request.tokens) - 1 for request in requests)


# ---------------------------------------------------------------------------------------------------------
# The output processor: text outside the step


def test_the_output_processor_streams_text_and_ends_a_request_at_its_stop_sequence(char_loaded):
    tokenizer = char_loaded.tokenizer
    processor = OutputProcessor(tokenizer)
    plain, stopped = Request([5], 20, stop=()), Request([5], 20, stop=("lo w",))
    ids = tokenizer("hello world")["input_ids"]
    texts, ended = {plain.request_id: "", stopped.request_id: ""}, []
    for i in range(0, len(ids), 3):
        chunk = ids[i : i + 3]
        for request in (plain, stopped):
            request.tokens += chunk
        outputs = [EngineOutput(plain, chunk), EngineOutput(stopped, chunk)]
        processed = processor.process(outputs)
        for text in processed.texts:
            texts[text.request.request_id] += text.text
            assert text.finished == (text.request is stopped and text.request.finished)
        ended += processed.stopped
    assert ended == [stopped] and stopped.finish_reason == "stop"  # the engine is told to drop its row
    assert texts[stopped.request_id] == "hel"
    assert processor.process([EngineOutput(stopped, [], finished=True)]).texts == []  # its end was already sent
    plain.status = RequestStatus.FINISHED_LENGTH
    (last,) = processor.process([EngineOutput(plain, [], finished=True)]).texts
    assert last.finished and texts[plain.request_id] + last.text == "hello world"
    assert processor.streams == {} and processor.closed == set()


# ---------------------------------------------------------------------------------------------------------
# The bridge: generate / abort from an event loop


def test_generate_refuses_before_any_output_and_abort_frees_the_row(char_loaded):
    eng = Engine(char_loaded, engine_config(block_size=4, mode="jacobi"))
    bridge = AsyncEngine(eng, char_loaded.tokenizer)

    async def scenario():
        with pytest.raises(ContextLengthError):
            bridge.generate([Request([5] * 600, 4), Request([5] * 600, 4)])
        assert not eng.has_work() and bridge.streams == {}  # no choice was queued
        fits, too_long = new_request(char_loaded.tokenizer, "ok", 4), Request([5] * 600, 4)
        with pytest.raises(ContextLengthError):
            bridge.generate([fits, too_long])
        while not fits.finished:  # the choice queued before the refusal is aborted at the next step
            await asyncio.sleep(0.01)
        assert fits.status is RequestStatus.FINISHED_ABORTED and bridge.streams == {}
        long = new_request(char_loaded.tokenizer, "zz", 200)
        stream = bridge.generate([long])
        first = await anext(stream)
        assert first.text and not first.finished
        bridge.abort([long])
        rest = [output async for output in stream]
        assert rest[-1].finished and long.status is RequestStatus.FINISHED_ABORTED and len(long.tokens) < 200
        two = [new_request(char_loaded.tokenizer, p, 10) for p in CHAR_PROMPTS[:2]]
        for i, request in enumerate(two):
            request.index = i
        texts = ["", ""]
        async for output in bridge.generate(two):
            texts[output.request.index] += output.text
        return two, texts

    try:
        two, texts = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        bridge.stop(timeout=10)
    for request, text in zip(two, texts, strict=True):
        assert request.tokens == greedy_alone(char_loaded, request.prompt_ids, 10)
        assert text == char_loaded.tokenizer.decode(request.tokens, skip_special_tokens=True)
    assert eng.num_running == 0 and eng.num_waiting == 0


def test_when_the_engine_thread_ends_its_requests_fail_and_new_ones_are_refused(char_loaded):
    """A request still decoding when the thread stops (a drain that ran out of time, a thread that died) ends
    with an error instead of leaving its client waiting; a request after that is refused at once."""
    eng = Engine(char_loaded, engine_config(block_size=4, mode="jacobi"))
    bridge = AsyncEngine(eng, char_loaded.tokenizer)

    async def scenario():
        long = new_request(char_loaded.tokenizer, "zz", 400)
        stream = bridge.generate([long])
        first = await anext(stream)
        bridge.stop(timeout=10)
        rest = [output async for output in stream]
        assert not bridge.alive and rest[-1].finished
        assert long.status is RequestStatus.FINISHED_ERROR and "engine thread stopped" in long.error
        assert first.text and len(long.tokens) < 400
        with pytest.raises(EngineStopped):
            bridge.generate([new_request(char_loaded.tokenizer, "a", 4)])
        assert bridge.streams == {}

    asyncio.run(asyncio.wait_for(scenario(), 60))


# ---------------------------------------------------------------------------------------------------------
# The static engine: whole batches, the same interface


def static_engine(loaded, **fields) -> StaticEngine:
    return StaticEngine(loaded, engine_config(engine="static", **fields))


def requests_for(loaded, prompts, budgets) -> list[Request]:
    return [new_request(loaded.tokenizer, p, n) for p, n in zip(prompts, budgets, strict=False)]


@pytest.mark.parametrize("mode", list(MODES))
def test_static_batches_match_greedy_generate(served, mode):
    eng = static_engine(served, block_size=4, mode=mode, max_batch_size=4)
    budgets = [12, 30, 5, 21]
    requests = requests_for(served, PROMPTS, budgets)
    run = Served(eng, served.tokenizer)
    for request in requests:
        eng.add(request)
    run.run_until_idle()
    for request, prompt, n in zip(requests, PROMPTS, budgets, strict=False):
        assert run.text(request) == greedy_text(served, prompt, n)
        assert request.batch_size == 4 and request.finish_reason in ("stop", "length")
        assert 0 < request.forward_passes < len(request.tokens)
        assert 0 <= request.queue_seconds < request.time_to_first_token
    assert_acceptance_adds_up(requests, run.stats)
    if MODES[mode].one_token:
        assert all(request.tokens_per_forward == 1.0 for request in requests)


@pytest.mark.parametrize("mode", list(MODES))
def test_static_batches_sample_like_ar_generate(served, mode):
    eng = static_engine(served, block_size=4, init="ngram", mode=mode, max_batch_size=4)
    settings = [dict(temperature=0.7, seed=1), dict(temperature=1.0, top_p=0.9, seed=2), None,
                dict(temperature=0.3, top_k=5, seed=3)]
    requests = requests_for(served, PROMPTS[:4], [30] * 4)
    for request, sampling in zip(requests, settings, strict=True):
        request.sampling = None if sampling is None else SamplingParams(**sampling)
    run = Served(eng, served.tokenizer)
    for request in requests:
        eng.add(request)
    run.run_until_idle()
    assert run.text(requests[2]) == greedy_text(served, PROMPTS[2], 30)
    for i in (0, 1, 3):
        assert run.text(requests[i]) == sampled_text(served, PROMPTS[i], 30, **settings[i])


def test_one_failing_or_cancelled_request_leaves_its_batch_mates_intact(served):
    eng = static_engine(served, block_size=4, mode="jacobi", max_batch_size=4)
    run = Served(eng, served.tokenizer)
    requests = requests_for(served, PROMPTS[:4], [24] * 4)

    def broken_client(_tokens):
        raise ConnectionError("client went away")

    run.loop.processor.stream(requests[1]).push = broken_client
    for request in requests:
        eng.add(request)
    eng.abort(requests[2])
    run.run_until_idle()
    assert requests[1].error is not None and "client went away" in requests[1].error
    assert requests[2].tokens == [] and requests[2].status is RequestStatus.FINISHED_ABORTED
    for i in (0, 3):
        assert requests[i].error is None
        assert run.text(requests[i]) == greedy_text(served, PROMPTS[i], 24)
    assert sorted(map(requests.index, run.ended)) == [0, 1, 2, 3]  # each ended once


def test_a_stop_sequence_stops_a_static_row_and_its_batch_mates_decode_on(served):
    eng = static_engine(served, block_size=4, mode="jacobi", max_batch_size=2)
    full = greedy_text(served, "Once upon a time", 40)
    stop = next(full[i : i + 2] for i in range(5, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stopped = new_request(served.tokenizer, "Once upon a time", 40, stop=[stop])
    other = new_request(served.tokenizer, "zzz", 40)
    run = Served(eng, served.tokenizer)
    eng.add(stopped)
    eng.add(other)
    run.run_until_idle()
    assert run.text(stopped) == full[: full.index(stop)] and stopped.finish_reason == "stop"
    assert run.text(other) == greedy_text(served, "zzz", 40)


def test_batches_that_would_overflow_the_context_are_split():
    def request(prompt_len, max_tokens):
        return Request(prompt_ids=[5] * prompt_len, max_tokens=max_tokens)

    short_long, long_short, small = request(10, 140), request(140, 10), request(20, 20)
    groups = fitting_groups([short_long, long_short, small], context=160)
    assert groups == [[short_long, small], [long_short]]
    for group in groups:
        assert max(len(r.prompt_ids) for r in group) + max(r.max_tokens for r in group) <= 160


def test_a_static_batch_gathers_for_its_wait_then_starts(char_loaded):
    eng = StaticEngine(char_loaded, engine_config(engine="static", mode="jacobi", block_size=4, max_batch_size=8,
                                                  batch_wait_timeout_s=0.2))
    first = new_request(char_loaded.tokenizer, "a", 4)
    eng.add(first)
    assert eng.step().stats.admitted == 0 and eng.num_waiting == 1  # within its wait: more may come
    second = new_request(char_loaded.tokenizer, "zz", 4)
    eng.add(second)
    started = 0
    while eng.has_work():
        started += eng.step().stats.admitted
    assert started == 2 and first.batch_size == second.batch_size == 2
    assert first.tokens == greedy_alone(char_loaded, first.prompt_ids, 4)
