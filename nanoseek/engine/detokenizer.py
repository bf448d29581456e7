"""One sample's text: incremental detokenisation, stop strings, and what is safe to stream."""

from __future__ import annotations


class Detokenizer:
    """Decodes a sample's tokens into `text` as they arrive and finds its stop strings.

    Only the new tokens are decoded, with the last complete window before them for context (as vLLM
    does), so a step costs the same at token 10 and at token 10,000: output tokens [prefix_offset,
    read_offset) decode to the end of `text`. `text` grows only by whole characters until the sample
    finishes; a tail that may start a stop string is held back from streaming (`sent` characters went out).
    Without `stream` (nobody reads the text before the end) and without stop strings (which may end the text
    before a draft's token), the text is decoded once, at the end.
    """

    def __init__(self, tokenizer, stop: list[str], stream: bool = True):
        self.tokenizer, self.stop, self.stream = tokenizer, stop, stream
        self.text = ""
        self.sent = 0
        self.prefix_offset = self.read_offset = 0
        self.stopped = False  # a stop string ended the text

    @property
    def incremental(self) -> bool:
        """Whether `update` must see every token: the text streams, or may hold a stop string. Otherwise
        only the finished sample's tokens need to reach it."""
        return self.stream or bool(self.stop)

    def update(self, ids: list[int], finished: bool) -> str:
        """Take the sample's text tokens so far (`finished`: no more will come) and return the new text safe
        to stream: broken UTF-8 and a tail that may start a stop string are held back. Sets `stopped` when a
        stop string ends the text."""
        if self.tokenizer is None:
            return ""
        if not self.incremental:
            if finished:
                self.text = self.tokenizer.decode(ids, skip_special_tokens=False)
            return ""
        before = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        after = self.tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=False)
        if len(after) > len(before):
            new = after[len(before) :]
            whole = finished or not new.endswith("\ufffd")  # else a character still lacks bytes
            start, text = len(self.text), self.text + (new if whole else new.rstrip("\ufffd"))
            for stop in self.stop:  # only where the new text could complete a stop string
                at = text.find(stop, max(start - len(stop) + 1, 0))
                if at >= 0:
                    text, self.stopped = text[:at], True
            finished = finished or self.stopped
            if whole or finished:  # a stop string ends the text even before a split character completes
                self.text = text
                self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        safe = len(self.text)
        if not finished:
            for stop in self.stop:
                for k in range(min(len(stop) - 1, safe - self.sent), 0, -1):
                    if self.text[safe - k : safe] == stop[:k]:
                        safe -= k
                        break
        delta, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return delta
