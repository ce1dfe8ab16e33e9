"""The OpenAI wire format the server speaks: request and response schemas, SSE framing, error bodies.

Pure pydantic, no Ray and no model: the Serve deployment (`cllm.serving.api`) parses with `parse_request`,
refuses what Jacobi decoding cannot honour with `reject_unsupported`, and answers with the models below.
Sampling (temperature, top_p, the `top_k` extension, seed, n) is honoured exactly: see `cllm.decoding.sampling`.
Every refusal at this layer is an `OpenAIError`, which carries its HTTP status and renders as
`{"error": {"message", "type", "param", "code"}}` like OpenAI's own errors; layers below raise domain
errors (`cllm.serving.request.RequestError`), which the API layer renders the same way.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_serializer

from cllm.decoding.modes import ModeName
from cllm.serving.request import FinishReason, Request

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # n: samples of one prompt, decoded as rows of one batch
SSE_DONE = "data: [DONE]\n\n"


class OpenAIError(Exception):
    """A request the server refuses, with the HTTP status and the OpenAI error fields to send back."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    # An unknown field is refused, not ignored: a sampling knob we silently dropped would change the output.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):  # JSON true/false is not a number on OpenAI's API
        raise ValueError("expected a number, got a boolean")
    return value


Integer = Annotated[int, Strict()]  # a JSON number without a fraction; true/false and "5" refused
Number = Annotated[float, BeforeValidator(_refuse_bool)]


class _GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: Integer | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: Integer | None = Field(default=None, ge=0)  # extension (vLLM's name): 0 or omitted = off
    n: Integer | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    seed: Integer | None = None  # sampling: choice i uses seed + i; omitted: a random one, sent back
    user: str | None = None

    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[Integer] | list[list[Integer]]  # token ids: true or 5.0 is no id
    echo: bool = False
    suffix: str | None = None
    best_of: Integer | None = Field(default=None, ge=1)
    logprobs: Integer | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Integer | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: Integer | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the tokenizer's chat template wants them: role and plain-text content."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


R = TypeVar("R", bound=BaseModel)


def parse_request(raw: bytes, schema: type[R]) -> R:
    """Bytes off the wire -> a validated request; any fault becomes a 400 that names it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise OpenAIError(f"request body is not valid UTF-8 (byte {err.start})") from None
    if not text.strip():
        raise OpenAIError("request body is empty; send a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise OpenAIError(f"request body is not valid JSON: {err.msg} at line {err.lineno} col {err.colno}") from None
    except RecursionError:
        raise OpenAIError("request body is nested too deeply") from None
    except ValueError:  # an integer beyond Python's int conversion limit (thousands of digits)
        raise OpenAIError("request body holds a number too long to read") from None
    if not isinstance(data, dict):
        raise OpenAIError(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError("request holds a string that is not valid Unicode (a lone surrogate escape)") from None
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None
    except RecursionError:
        raise OpenAIError("request body is nested too deeply") from None


def validation_error(err: ValidationError) -> OpenAIError:
    """pydantic's complaints as one readable 400, naming the first offending top-level field as `param`."""
    problems = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "body"
        if item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown parameter (not supported by this server)")
        else:
            problems.append(f"{where}: {item['msg']}")
    loc = err.errors()[0]["loc"]
    return OpenAIError("invalid request: " + "; ".join(problems), param=str(loc[0]) if loc else None)


def reject_unsupported(request: _GenerationRequest) -> None:
    """Refuse what this server cannot honour, rather than quietly answering something else.

    Greedy decoding and seeded sampling (temperature, top_p, top_k, seed, n) are honoured exactly; a
    request that asks for a feature this server lacks gets a 400 that says so.
    """

    def refuse(param: str, message: str) -> None:
        raise OpenAIError(message, param=param, code="unsupported_parameter")

    if request.presence_penalty not in (None, 0):
        refuse("presence_penalty", "presence_penalty is not supported; it must be 0 or omitted")
    if request.frequency_penalty not in (None, 0):
        refuse("frequency_penalty", "frequency_penalty is not supported; it must be 0 or omitted")
    if request.logit_bias:
        refuse("logit_bias", "logit_bias is not supported")
    stops = request.stop_sequences()
    if len(stops) > MAX_STOP_SEQUENCES:
        refuse("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
    if any(s == "" for s in stops):
        refuse("stop", "stop sequences must not be empty strings")
    if request.stream_options is not None and not request.stream:
        refuse("stream_options", "stream_options is only allowed when stream is true")
    if isinstance(request, CompletionRequest):
        if request.echo:
            refuse("echo", "echo is not supported")
        if request.suffix:
            refuse("suffix", "suffix (insertion) is not supported")
        if request.best_of not in (None, 1):
            refuse("best_of", "best_of is not supported (n is); best_of must be 1 or omitted")
        if request.logprobs is not None:
            refuse("logprobs", "logprobs are not supported")
    if isinstance(request, ChatCompletionRequest):
        if request.logprobs or request.top_logprobs is not None:
            refuse("logprobs", "logprobs are not supported")
        if request.tools or request.tool_choice not in (None, "none"):
            refuse("tools", "tool calling is not supported")
        if request.response_format not in (None, {"type": "text"}):
            refuse("response_format", 'only response_format {"type": "text"} is supported')
        if not request.messages:
            refuse("messages", "messages must hold at least one message")


def single_prompt(request: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text or token ids (one prompt per request)."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise OpenAIError(
                f"this server takes one prompt per request, got {len(prompt)}; send them as separate "
                "requests (they are batched on the server)",
                param="prompt",
            )
        prompt = prompt[0]
    if len(prompt) == 0:
        raise OpenAIError("prompt is empty", param="prompt")
    return prompt


# ---------------------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class JacobiStats(BaseModel):
    """How the answer was decoded; an extension field, ignored by OpenAI clients."""

    mode: ModeName
    block_size: int
    forward_passes: int  # decoding passes this request took part in (prefill excluded)
    tokens_per_forward: float
    # accepted_lengths[k]: the passes that made k tokens final (their accepted length): a histogram whose counts
    # add up to forward_passes, and whose k x count add up to the tokens decoded after prefill's first
    accepted_lengths: list[int] = []
    batch_size: int  # requests decoded together in the same batched call
    decode_seconds: float
    # from the replica accepting the request to its first token, measured in the replica: what a client
    # waits beyond this is routing and transport
    first_token_seconds: float | None = None
    # the part of first_token_seconds spent queued for the engine (or for a static batch); the rest is the
    # request's prefill, so a long wait here means the replica is full, a long rest a long prompt
    queue_seconds: float | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    jacobi_stats: JacobiStats | None = None
    seed: int | None = None  # extension: the seed a sampled answer used (reproduces it); None: greedy


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    jacobi_stats: JacobiStats | None = None
    seed: int | None = None  # extension: the seed a sampled answer used (reproduces it); None: greedy


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_what_changed(self, handler) -> dict[str, Any]:
        # A delta carries only what it adds: the role once, then content.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    jacobi_stats: JacobiStats | None = None
    seed: int | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cllm-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One Server-Sent Event carrying a JSON payload."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ----- reply builders: one request's full answer, or its stream of chunks -----
# `choices` are the request records of a client request's choices (`cllm.serving.request.Request`: prompt_ids,
# tokens, finish_reason), one per sample of its prompt, and `texts` their answers; `index` names the choice a
# chunk belongs to.


@dataclass
class Reply:
    """Builds one request's response objects: the full answer, or its stream of chunks."""

    id: str
    created: int
    model: str
    seed: int | None = None  # a sampled request's seed, sent back so the answer can be reproduced

    @staticmethod
    def usage(choices: Sequence[Request]) -> Usage:
        n, m = len(choices[0].prompt_ids), sum(len(choice.tokens) for choice in choices)  # the prompt counts once
        return Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)

    def opening(self, index: int = 0) -> str:
        return ""

    def usage_only(self, choices: Sequence[Request]) -> str:
        return sse_event(
            {
                "id": self.id,
                "object": self.chunk_object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage(choices).model_dump(),
                "seed": self.seed,
            }
        )


class CompletionReply(Reply):
    chunk_object = "text_completion"

    def full(self, choices: Sequence[Request], texts: Sequence[str], stats: JacobiStats) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(index=i, text=text, finish_reason=choice.finish_reason)
                for i, (choice, text) in enumerate(zip(choices, texts, strict=True))
            ],
            usage=self.usage(choices),
            jacobi_stats=stats,
            seed=self.seed,
        )

    def chunk(
        self, text: str, finish_reason=None, stats: JacobiStats | None = None, index: int = 0
    ) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(index=index, text=text, finish_reason=finish_reason)],
            jacobi_stats=stats,
            seed=self.seed,
        )

    def delta(self, text: str, index: int = 0) -> str:
        return sse_event(self.chunk(text, index=index))

    def closing(self, choice: Request, stats: JacobiStats, index: int = 0) -> str:
        return sse_event(self.chunk("", choice.finish_reason, stats, index))


class ChatReply(Reply):
    chunk_object = "chat.completion.chunk"

    def full(self, choices: Sequence[Request], texts: Sequence[str], stats: JacobiStats) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=choice.finish_reason)
                for i, (choice, text) in enumerate(zip(choices, texts, strict=True))
            ],
            usage=self.usage(choices),
            jacobi_stats=stats,
            seed=self.seed,
        )

    def chunk(
        self, delta: ChatDelta, finish_reason=None, stats: JacobiStats | None = None, index: int = 0
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
            jacobi_stats=stats,
            seed=self.seed,
        )

    def opening(self, index: int = 0) -> str:
        return sse_event(self.chunk(ChatDelta(role="assistant", content=""), index=index))

    def delta(self, text: str, index: int = 0) -> str:
        return sse_event(self.chunk(ChatDelta(content=text), index=index))

    def closing(self, choice: Request, stats: JacobiStats, index: int = 0) -> str:
        return sse_event(self.chunk(ChatDelta(), choice.finish_reason, stats, index))
