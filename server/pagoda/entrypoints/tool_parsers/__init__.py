"""Tool calls out of generated text, one parser per model family's format (vLLM's `--tool-call-parser`).

Every parser reads the whole text so far and returns the content outside the calls plus the calls seen so
far, the last one possibly unfinished; streaming diffs successive parses (`ChatDeltas`), so one function
serves both the final message and the deltas.
"""

from pagoda.entrypoints.tool_parsers.base import ParsedOutput, ToolCall, ToolParser
from pagoda.entrypoints.tool_parsers.formats import PARSERS, ForcedCallsParser, NamedCallParser

__all__ = ["PARSERS", "ForcedCallsParser", "NamedCallParser", "ParsedOutput", "ToolCall", "ToolParser"]
