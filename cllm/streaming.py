"""Turning committed tokens into text a client can be sent piece by piece.

Two small state machines, both pure:
  IncrementalDetokenizer  token ids in, text deltas out; a delta never ends inside a multi-byte
                          character, and the deltas add up to `tokenizer.decode(all_ids)`.
  StopMatcher             text deltas in, text safe to send out; holds back a tail that could be the
                          start of a stop sequence, and cuts the text where a stop sequence begins.
`TextStream` chains them for one request.
"""

from __future__ import annotations

from collections.abc import Sequence

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
