"""Split generated text into `reasoning_content` (inside `<think>…</think>`) and `content` (REFERENCE §9).

The R1 chat template ends the prompt with `<think>\\n`, so a completion usually starts inside the reasoning;
a model may also open `<think>` itself. Which case holds is read off the rendered prompt (`opens_reasoning`),
so a checkpoint whose template does not open `<think>` gets no forced reasoning. The parser is incremental:
fed streamed text pieces, it returns what may be shown of each part now, holding back a tail that could be
the start of a tag.
"""

from __future__ import annotations

from ..tokenizer import END_THINK, THINK


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkParser:
    def __init__(self, in_reasoning: bool):
        self.in_reasoning = in_reasoning
        self.seen_think = in_reasoning  # a `<think>` is only honoured at the very start of the output
        self.content_started = False
        self.buf = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """Add text; returns (reasoning, content) that can be emitted now. `final` flushes held text."""
        self.buf += text
        reasoning = ""
        if not self.seen_think:
            head = self.buf.lstrip()
            if head.startswith(THINK):
                self.buf, self.in_reasoning, self.seen_think = head[len(THINK) :], True, True
            elif THINK.startswith(head) and not final:
                return "", ""  # could still become `<think>`
            else:
                self.seen_think = True
        if self.in_reasoning:
            at = self.buf.find(END_THINK)
            if at < 0:
                keep = 0 if final else _partial_tag(self.buf, END_THINK)
                reasoning, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                return reasoning, ""
            reasoning, self.buf, self.in_reasoning = self.buf[:at], self.buf[at + len(END_THINK) :], False
        content, self.buf = self.buf, ""
        if not self.content_started:  # R1 puts blank lines after `</think>`; the API's content omits them
            content = content.lstrip()
            self.content_started = bool(content)
        return reasoning, content


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered chat prompt leaves the completion inside `<think>` (R1's generation prompt)."""
    return prompt.rstrip().endswith(THINK)


def split_reasoning(text: str, in_reasoning: bool) -> tuple[str, str]:
    """The whole-text form, for non-streaming responses."""
    return ThinkParser(in_reasoning).feed(text, final=True)
