"""Tool calling: parsers of each model family's call format, and the request's tool fields."""

from engine.server.tools.parsers import TOOL_PARSERS, ToolCall, ToolParser
from engine.server.tools.request import ToolRequest, detect_parser

__all__ = ["TOOL_PARSERS", "ToolCall", "ToolParser", "ToolRequest", "detect_parser"]
