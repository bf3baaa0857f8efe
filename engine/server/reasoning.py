"""Reasoning parsers: the thinking a model writes between <think> and </think> goes to
`reasoning_content`, the rest to `content`.

qwen3: reasoning only when the output opens with <think> (Qwen3's template puts an empty
think block in the prompt when thinking is off, so the output then is all content).
deepseek_r1: the template opens <think> in the prompt, so the output is reasoning up to
</think> whether or not it repeats <think>; with no </think> it is all reasoning.
Qwen3 thinking models whose template opens <think> in the prompt want deepseek_r1.
"""

from __future__ import annotations

import dataclasses

START, END = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ReasoningParser:
    name: str
    implicit_start: bool
    """The output is reasoning from its start even without <think>."""

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) of a whole output."""
        splitter = ReasoningSplitter(self)
        parts = [splitter.feed(text), splitter.finish()]
        reasoning = "".join(r for r, _ in parts if r is not None)
        content = "".join(c for _, c in parts)
        return (reasoning if splitter.reasoned else None), content


REASONING_PARSERS: dict[str, ReasoningParser] = {
    p.name: p for p in (ReasoningParser("qwen3", implicit_start=False),
                        ReasoningParser("deepseek_r1", implicit_start=True))
}
"""--reasoning-parser name -> parser."""


def prefix_held(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Streamed text -> (reasoning, content) pieces; a tag is never split across pieces,
    so no piece shows part of <think> or </think>."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.state = "start"  # start -> think -> content, or start -> content
        self.buf = ""
        self.after_end = False
        self.reasoned = False
        """Whether the output had a reasoning part (even an empty one)."""

    def feed(self, text: str) -> tuple[str | None, str]:
        self.buf += text
        return self._step(final=False)

    def finish(self) -> tuple[str | None, str]:
        return self._step(final=True)

    def _step(self, final: bool) -> tuple[str | None, str]:
        reasoning: str | None = None
        if self.state == "start":
            head = self.buf.lstrip()
            if not final and START.startswith(head):
                return None, ""  # it may still open with <think>
            if head.startswith(START):
                self.state, self.buf = "think", head[len(START):]
            elif self.parser.implicit_start:
                self.state = "think"
            else:
                self.state = "content"
        if self.state == "think":
            self.reasoned = True
            end = self.buf.find(END)
            if end >= 0:
                reasoning, self.buf = self.buf[:end], self.buf[end + len(END):]
                self.state, self.after_end = "content", True
            else:
                keep = 0 if final else prefix_held(self.buf, END)
                cut = len(self.buf) - keep
                reasoning, self.buf = self.buf[:cut], self.buf[cut:]
                return reasoning, ""
        if self.after_end:  # the newlines that follow </think> belong to neither part
            self.buf = self.buf.lstrip("\n")
            self.after_end = not self.buf
        content, self.buf = self.buf, ""
        return reasoning, content
