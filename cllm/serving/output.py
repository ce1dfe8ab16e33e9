"""The output processor: committed tokens in, text to send out, outside the engine's step.

Three small state machines, all pure:
  IncrementalDetokenizer  token ids in, text deltas out; a delta never ends inside a multi-byte
                          character, and the deltas add up to `tokenizer.decode(all_ids)`.
  StopMatcher             text deltas in, text safe to send out; holds back a tail that could be the
                          start of a stop sequence, and cuts the text where a stop sequence begins.
  TextStream              chains them for one request.
`OutputProcessor` keeps a `TextStream` per request: it turns each step's `EngineOutput`s into
`TextOutput`s (a text delta, and whether the request is over), ends a request whose text reached a stop
sequence (the engine is then told to drop its row), and fails a request whose text cannot be made,
alone. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from cllm.serving.request import EngineOutput, Request, RequestStatus

logger = logging.getLogger("ray.serve")

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


class IncrementalDetokenizer:
    """Decode a growing token list without re-decoding it all each time, and without splitting characters.

    Decoding a token in isolation is wrong for many tokenizers (leading-space markers, byte tokens that
    form one character together), so each step decodes a short window that starts at the last point
    where the text was known to be complete (`prefix`) and emits only what the new tokens add to it.
    A decode that ends in U+FFFD is an unfinished multi-byte character: wait for more tokens.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: a character boundary already emitted
        self.read = 0  # everything before this is emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> tuple[str, str]:
        """(text of the window up to `read`, text of the whole window)."""
        return self._decode(self.ids[self.prefix : self.read]), self._decode(self.ids[self.prefix :])

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the new text that is complete (possibly empty)."""
        self.ids.extend(token_ids)
        known, full = self._pending()
        if len(full) <= len(known) or full.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(known) :]

    def finish(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD, as in a full decode)."""
        known, full = self._pending()
        self.prefix = self.read = len(self.ids)
        return full[len(known) :]


class StopMatcher:
    """Cut generated text at the first stop sequence, never sending a stop sequence's first characters.

    Text that could still grow into a stop sequence (the last `longest - 1` characters) is held back
    until the next delta shows whether it does.
    """

    def __init__(self, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add generated text; return the part that is safe to send. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        self.pending += delta
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        safe = len(self.pending) - self.hold
        if safe <= 0:
            return ""
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out

    def finish(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TextStream:
    """One request's committed tokens -> the text to send, with stop sequences applied."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopMatcher(stop)
        self.text = ""  # everything returned so far

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def push(self, token_ids: Sequence[int]) -> str:
        out = self.matcher.push(self.detok.push(token_ids))
        self.text += out
        return out

    def finish(self) -> str:
        out = self.matcher.push(self.detok.finish()) if not self.stopped else ""
        out += self.matcher.finish()
        self.text += out
        return out


@dataclass
class TextOutput:
    """What a client gets from one step: its request's new text, and whether the request is over (its record
    then names why: `finish_reason`, `error`)."""

    request: Request
    text: str
    finished: bool = False


@dataclass
class Processed:
    texts: list[TextOutput] = field(default_factory=list)
    stopped: list[Request] = field(default_factory=list)  # ended here, still running in the engine: drop them


class OutputProcessor:
    """Engine outputs -> text outputs, one `TextStream` per request, from its first tokens to its end."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.streams: dict[str, TextStream] = {}
        self.closed: set[str] = set()  # ended here; the engine has yet to say it let them go

    def stream(self, request: Request) -> TextStream:
        if (stream := self.streams.get(request.request_id)) is None:
            stream = self.streams[request.request_id] = TextStream(self.tokenizer, request.stop)
        return stream

    def process(self, outputs: Sequence[EngineOutput]) -> Processed:
        processed = Processed()
        for output in outputs:
            request = output.request
            if request.request_id in self.closed:  # its client already has its end
                if output.finished:
                    self.closed.discard(request.request_id)
                continue
            text, ended_here = self.text_of(output)
            finished = output.finished or ended_here
            if finished:
                self.streams.pop(request.request_id, None)
                if not output.finished:
                    self.closed.add(request.request_id)
                    processed.stopped.append(request)
            if text or finished:
                processed.texts.append(TextOutput(request, text, finished))
        return processed

    def text_of(self, output: EngineOutput) -> tuple[str, bool]:
        """The text the output adds (flushed at the end), and whether the request ended here: its text reached
        a stop sequence, or could not be made (its failure must not end the requests sharing its steps)."""
        request = output.request
        if request.status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR):
            return "", False
        try:
            stream = self.stream(request)
            text = stream.push(output.new_tokens) if output.new_tokens else ""
            if stream.stopped:
                request.status = RequestStatus.FINISHED_STOPPED
            elif output.finished:
                text += stream.finish()
            return text, stream.stopped
        except Exception as err:
            logger.exception("request failed while its text was made; it ends alone")
            request.fail(err)
            return "", True
