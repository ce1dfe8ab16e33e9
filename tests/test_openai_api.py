"""OpenAI request parsing, refusals and response shapes (cllm.openai_api): pure, no model, no Ray."""

from __future__ import annotations

import json

import pytest

from cllm.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    parse_request,
    reject_unsupported,
    single_prompt,
    sse_event,
)


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
        (body(model="m", prompt="hi", top_k=5), "top_k", "unknown parameter"),
        (body(model="m", prompt="hi", temperature=0.7), "temperature", "greedily"),
        (body(model="m", prompt="hi", temperature=5), "temperature", "temperature"),
        (body(model="m", prompt="hi", top_p=0.9), "top_p", "top_p"),
        (body(model="m", prompt="hi", n=3), "n", "n must be 1"),
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
