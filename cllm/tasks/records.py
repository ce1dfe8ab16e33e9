"""One dataset row as a prompt and an answer: plain prompt/answer columns or a chat conversation.

A row is read, in this order, from
- `prompt_field`: text, or a list of chat turns; the answer comes from `answer_field` (text, a number, or absent);
- `messages`: OpenAI-style turns, `{"role": ..., "content": ...}`;
- `conversations`: ShareGPT-style turns, `{"from": ..., "value": ...}` (human/user, gpt/assistant, system).

A conversation that ends with an assistant turn is split there: that turn is the answer, the turns
before it are the prompt (rendered later through the model's chat template). A conversation that ends
with any other turn is a prompt without an answer. An `answer_field` value, when the row has one, is
the answer in every format.

A row that cannot be a prompt raises `Unreadable` with the reason it is set aside under; the loader
counts it and carries on, so one bad row does not sink a dataset.
"""

from __future__ import annotations

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
CHAT_FIELDS = ("messages", "conversations")
TEXT_FORMAT = "prompt/answer"

# why a row is set aside when the dataset is read
MISSING_PROMPT = "missing_prompt"
BLANK_PROMPT = "blank_prompt"
UNREADABLE_RECORD = "unreadable_record"


class Unreadable(ValueError):
    """A row that cannot become a prompt; `reason` is the key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_row(row, prompt_field: str, answer_field: str) -> tuple[dict, str]:
    """The record `{prompt, answer}` of one row and the name of its format."""
    if not isinstance(row, dict):
        raise Unreadable(UNREADABLE_RECORD, f"is a {type(row).__name__}, not an object")
    if prompt_field in row:
        source, value = prompt_field, row[prompt_field]
    else:
        source = next((name for name in CHAT_FIELDS if name in row), None)
        if source is None:
            raise Unreadable(MISSING_PROMPT, f"has no {prompt_field!r} field (fields: {sorted(row)})")
        value = row[source]
    if isinstance(value, list):
        prompt, answer = split_conversation(read_turns(value, source))
        fmt = source if source in CHAT_FIELDS else "messages"
    else:
        prompt, answer, fmt = read_text(value, source), None, TEXT_FORMAT
    given = row.get(answer_field)
    if given is not None:
        answer = str(given)
    return {"prompt": prompt, "answer": answer}, fmt


def read_text(value, field: str) -> str:
    if value is None:
        raise Unreadable(MISSING_PROMPT, f"has no value in {field!r}")
    if not isinstance(value, str):
        raise Unreadable(UNREADABLE_RECORD, f"has a {type(value).__name__} in {field!r}, not text")
    if not value.strip():
        raise Unreadable(BLANK_PROMPT, f"has a blank {field!r}")
    return value


def read_turns(turns: list, field: str) -> list[dict]:
    """Chat turns as `{role, content}` with the roles a chat template knows (user, assistant, system)."""
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Unreadable(UNREADABLE_RECORD, f"has turn {number} of {field!r} as a {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise Unreadable(UNREADABLE_RECORD,
                             f"has turn {number} of {field!r} with role {role!r} (known: {sorted(ROLES)})")
        if not isinstance(content, str):
            raise Unreadable(UNREADABLE_RECORD, f"has turn {number} of {field!r} without text content")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def split_conversation(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt turns, answer): a final assistant turn is the answer, the turns before it the prompt."""
    answer = None
    if messages and messages[-1]["role"] == "assistant":
        answer = messages[-1]["content"]
        messages = messages[:-1]
    if not any(m["content"].strip() for m in messages):
        raise Unreadable(BLANK_PROMPT, "has no turn with text before the answer")
    return messages, answer
