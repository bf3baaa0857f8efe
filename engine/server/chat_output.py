"""One chat choice's generated text -> reasoning, content and tool calls, as it streams.

The same splitter serves a stream (fed each delta) and a whole answer (fed the whole text),
so both give the same fields. Reasoning is split off first (engine.server.reasoning); the
rest is content until a tool call may start, and from there it is held to the end, where the
tool parser reads the calls (text that holds none is released as content).
"""

from __future__ import annotations

from typing import Any

from engine.server.reasoning import ReasoningParser, ReasoningSplitter, prefix_held
from engine.server.tools import ToolCall, ToolParser, ToolRequest


class ChoiceOutput:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolRequest | None,
                 parser: ToolParser | None) -> None:
        self.reasoning = ReasoningSplitter(reasoning) if reasoning is not None else None
        self.tools = tools if tools is not None and tools.choice != "none" else None
        self.parser = parser
        self.held = ""  # content not emitted yet: it may be (the start of) tool calls
        self.in_calls = self.tools is not None and self.tools.forced
        self.started = False  # content other than whitespace was emitted

    def feed(self, text: str) -> dict[str, str]:
        """Delta fields (reasoning_content, content) for new text; empty ones left out."""
        r, c = self.reasoning.feed(text) if self.reasoning else (None, text)
        return _fields(r, self._content(c, final=False))

    def finish(self) -> tuple[dict[str, str], list[ToolCall]]:
        """The fields still held, and the tool calls of the whole output."""
        r, c = self.reasoning.finish() if self.reasoning else (None, "")
        content = self._content(c, final=True)
        calls: list[ToolCall] = []
        if self.tools is not None and self.held:
            if self.tools.forced:
                calls = self.tools.parse_forced(self.held)
                rest = ""
            else:
                rest, calls = self.parser.parse(self.held) if self.parser else (self.held, [])
                calls = calls if self.tools.parallel else calls[:1]
            content += rest if calls else self.held
            self.held = ""
        return _fields(r, content), calls

    def _content(self, text: str, final: bool) -> str:
        if self.tools is None:
            return text
        self.held += text
        if self.in_calls:
            return ""
        p = self.parser
        if p is None:
            out, self.held = self.held, ""
            return out
        if not self.started and p.leading:
            head = self.held.lstrip()
            if any(head.startswith(m) for m in p.leading):
                self.in_calls = True
                return ""
            if not final and any(m.startswith(head) for m in p.leading):
                return ""  # too short to tell yet
        hits = [i for i in (self.held.find(m) for m in p.markers) if i >= 0]
        # Trailing whitespace is held too: content before a call ends without it.
        if hits:
            self.in_calls = True
            out, self.held = self.held[:min(hits)].rstrip(), self.held[min(hits):]
        else:
            keep = 0 if final else max((prefix_held(self.held, m) for m in p.markers),
                                       default=0)
            cut = len(self.held) - keep
            if not final:
                cut = len(self.held[:cut].rstrip())
            out, self.held = self.held[:cut], self.held[cut:]
        self.started = self.started or bool(out.strip())
        return out


def _fields(reasoning: str | None, content: str) -> dict[str, str]:
    out: dict[str, Any] = {}
    if reasoning:
        out["reasoning_content"] = reasoning
    if content:
        out["content"] = content
    return out
