"""OpenAI request parsing, refusals and response shapes (cllm.serving.protocol): pure, no model, no Ray."""

from __future__ import annotations

import json

import pytest
from conftest import char_tokenizer

from cllm.serving.output import TextStream
from cllm.serving.protocol import (
    MAX_CHOICES,
    SSE_DONE,
    ChatCompletionRequest,
    ChatReply,
    CompletionReply,
    CompletionRequest,
    JacobiStats,
    OpenAIError,
    parse_request,
    reject_unsupported,
    single_prompt,
    sse_event,
)
from cllm.serving.request import Request, RequestStatus, choice_sampling


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def refusal(raw: bytes, schema=CompletionRequest) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        request = parse_request(raw, schema)
        reject_unsupported(request)
        if isinstance(request, CompletionRequest):
            single_prompt(request)
    return info.value


def test_a_plain_completion_request_parses():
    request = parse_request(body(model="m", prompt="hi", max_tokens=5, stop="\n", stream=True), CompletionRequest)
    reject_unsupported(request)
    assert (request.model, single_prompt(request), request.max_tokens, request.stream) == ("m", "hi", 5, True)
    assert request.stop_sequences() == ["\n"]


def test_greedy_settings_are_accepted():
    request = parse_request(body(model="m", prompt="hi", temperature=0, top_p=1, n=1, seed=3), CompletionRequest)
    reject_unsupported(request)  # raises OpenAIError if any of them were refused
    assert (request.temperature, request.top_p, request.n, request.seed) == (0, 1, 1, 3)


@pytest.mark.parametrize("schema, extra", [(CompletionRequest, {"prompt": "hi"}),
                                           (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]})])
def test_sampling_settings_are_accepted_on_both_routes(schema, extra):
    raw = body(model="m", temperature=0.7, top_p=0.9, top_k=40, seed=11, n=3, stream=True, **extra)
    request = parse_request(raw, schema)
    reject_unsupported(request)
    assert (request.temperature, request.top_p, request.top_k, request.seed, request.n) == (0.7, 0.9, 40, 11, 3)
    settings, seed = choice_sampling(request.temperature, request.top_p, request.top_k, request.seed, request.n)
    assert seed == 11 and [s.seed for s in settings] == [11, 12, 13]  # choice i samples with seed + i
    assert {(s.temperature, s.top_p, s.top_k) for s in settings} == {(0.7, 0.9, 40)}


def test_choice_sampling_defaults():
    assert choice_sampling(None, 0.9, 5, 3, None) == ([None], None)  # no temperature: greedy, the default
    assert choice_sampling(0, None, None, None, 2) == ([None, None], None)
    (one,), seed = choice_sampling(1.0, None, None, None, None)  # no seed: a random one, sent back
    assert one.seed == seed and 0 <= seed < 2**32 and (one.top_p, one.top_k) == (1.0, 0)
    assert len({choice_sampling(1.0, None, None, None, None)[1] for _ in range(3)} | {seed}) > 1


def test_replies_carry_every_choice_and_the_seed():
    tokenizer = char_tokenizer()

    def job(text: str, finish_reason: str) -> tuple[Request, str]:
        decoded = Request(prompt_ids=[1, 2, 3], max_tokens=5)
        decoded.tokens = tokenizer(text)["input_ids"]
        stream = TextStream(tokenizer, ())
        answer = stream.push(decoded.tokens) + stream.finish()
        decoded.status = RequestStatus(finish_reason)
        assert decoded.finish_reason == finish_reason
        return decoded, answer

    jobs, texts = zip(job("ab", "length"), job("c", "stop"), strict=True)
    stats = JacobiStats(mode="jacobi", block_size=4, forward_passes=2, tokens_per_forward=1.0, batch_size=2,
                        decode_seconds=0.1)
    full = CompletionReply(id="x", created=0, model="m", seed=9).full(jobs, texts, stats).model_dump()
    choices = [(c["index"], c["text"], c["finish_reason"]) for c in full["choices"]]
    assert choices == [(0, "ab", "length"), (1, "c", "stop")]
    assert full["seed"] == 9 and full["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    chat = ChatReply(id="y", created=0, model="m", seed=9)
    assert [c["message"]["content"] for c in chat.full(jobs, texts, stats).model_dump()["choices"]] == ["ab", "c"]
    event = json.loads(chat.delta("z", 1)[len("data: ") :])
    assert event["choices"][0]["index"] == 1 and event["choices"][0]["delta"] == {"content": "z"} and event["seed"] == 9
    assert json.loads(chat.opening(1)[len("data: ") :])["choices"][0]["delta"]["role"] == "assistant"


def test_chat_request_flattens_text_parts():
    raw = body(
        model="m",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        max_completion_tokens=7,
    )
    request = parse_request(raw, ChatCompletionRequest)
    reject_unsupported(request)
    assert request.chat_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert request.token_limit() == 7


@pytest.mark.parametrize(
    "raw, param, words",
    [
        (b"\xff\xfe{}", None, "UTF-8"),
        (b"{not json", None, "not valid JSON"),
        (b"", None, "empty"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"model": "m", "prompt": "\\ud800"}', None, "lone surrogate"),
        (body(prompt="hi"), "model", "model: Field required"),
        (body(model="m"), "prompt", "prompt: Field required"),
        (body(model="m", prompt=123), "prompt", "prompt"),
        (body(model="m", prompt="hi", max_tokens="many"), "max_tokens", "max_tokens"),
        (body(model="m", prompt="hi", max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (body(model="m", prompt="hi", max_tokens=-3), "max_tokens", "greater than or equal to 1"),
        (body(model="m", prompt="hi", stream="maybe"), "stream", "stream"),
        (body(model="m", prompt="hi", top_k=-1), "top_k", "greater than or equal to 0"),
        (body(model="m", prompt="hi", temperature=5), "temperature", "temperature"),
        (body(model="m", prompt="hi", temperature=-0.5), "temperature", "temperature"),
        (body(model="m", prompt="hi", top_p=0), "top_p", "greater than 0"),
        (body(model="m", prompt="hi", top_p=1.5), "top_p", "less than or equal to 1"),
        (body(model="m", prompt="hi", n=0), "n", "greater than or equal to 1"),
        (body(model="m", prompt="hi", n=MAX_CHOICES + 1), "n", f"less than or equal to {MAX_CHOICES}"),
        (body(model="m", prompt="hi", top_k=2.5), "top_k", "top_k"),
        (body(model="m", prompt="hi", best_of=2), "best_of", "best_of"),
        (body(model="m", prompt="hi", logprobs=2), "logprobs", "logprobs"),
        (body(model="m", prompt="hi", echo=True), "echo", "echo"),
        (body(model="m", prompt="hi", presence_penalty=0.5), "presence_penalty", "presence_penalty"),
        (body(model="m", prompt="hi", logit_bias={"5": 10}), "logit_bias", "logit_bias"),
        (body(model="m", prompt="hi", stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
        (body(model="m", prompt="hi", stop=""), "stop", "empty"),
        (body(model="m", prompt="hi", stream_options={"include_usage": True}), "stream_options", "stream"),
        (body(model="m", prompt=""), "prompt", "empty"),
        (body(model="m", prompt=[]), "prompt", "empty"),
        (body(model="m", prompt=[""]), "prompt", "empty"),
        (body(model="m", prompt=["a", "b"]), "prompt", "one prompt per request"),
    ],
)
def test_bad_completion_requests_are_refused_with_400(raw, param, words):
    err = refusal(raw)
    assert err.status == 400
    assert err.param == param
    assert words in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw, param",
    [
        (body(model="m"), "messages"),
        (body(model="m", messages="hi"), "messages"),
        (body(model="m", messages=[]), "messages"),
        (body(model="m", messages=[{"role": "wizard", "content": "hi"}]), "messages"),
        (body(model="m", messages=[{"content": "hi"}]), "messages"),
        (
            body(model="m", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages",
        ),
        (
            body(model="m", messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function"}]),
            "tools",
        ),
        (body(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True), "logprobs"),
        (
            body(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=0),
            "max_completion_tokens",
        ),
    ],
)
def test_bad_chat_requests_are_refused_with_400(raw, param):
    err = refusal(raw, ChatCompletionRequest)
    assert err.status == 400
    assert err.param == param


def test_token_id_prompts_are_accepted():
    assert single_prompt(parse_request(body(model="m", prompt=[5, 6, 7]), CompletionRequest)) == [5, 6, 7]
    assert single_prompt(parse_request(body(model="m", prompt=[[5, 6]]), CompletionRequest)) == [5, 6]


def test_error_body_has_the_openai_shape():
    err = OpenAIError("no such model", status=404, param="model", code="model_not_found")
    assert err.body() == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert OpenAIError("boom", status=500).body()["error"]["type"] == "server_error"


def test_sse_framing():
    event = sse_event({"text": "中"})
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[len("data: ") :]) == {"text": "中"}
    assert SSE_DONE == "data: [DONE]\n\n"


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("n", False), ("temperature", True), ("seed", "3"),
                                          ("max_tokens", "5")])
def test_booleans_and_strings_are_not_numbers(field, value):
    with pytest.raises(OpenAIError, match=field) as caught:
        parse_request(body(model="m", prompt="hi", **{field: value}), CompletionRequest)
    assert caught.value.status == 400


@pytest.mark.parametrize("raw", ["[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000,
                                 '{"model": "m", "prompt": ' + "[" * 3000 + "]" * 3000 + "}"])
def test_deeply_nested_bodies_are_a_400(raw):
    with pytest.raises(OpenAIError, match="nested too deeply") as caught:
        parse_request(raw.encode(), CompletionRequest)
    assert caught.value.status == 400


@pytest.mark.parametrize("prompt", [[True, 5], [[True]], [5.0], [[5, 6.5]]])
def test_token_id_prompts_take_integers_only(prompt):
    with pytest.raises(OpenAIError, match="prompt") as caught:
        parse_request(body(model="m", prompt=prompt), CompletionRequest)
    assert caught.value.status == 400


@pytest.mark.parametrize("number", ["9" * 5000, "-" + "9" * 5000])
def test_a_number_too_long_to_read_is_a_400(number):
    raw = '{"model": "m", "prompt": "hi", "max_tokens": ' + number + "}"
    with pytest.raises(OpenAIError, match="too long to read") as caught:
        parse_request(raw.encode(), CompletionRequest)
    assert caught.value.status == 400
