"""Text front-end: tokenizer, chat template, output parsing (spec §8).

    messages --render_chat--> prompt text --Tokenizer.encode--> ids
    ids --Tokenizer.decode / StreamDecoder--> text
    ids --parse_output / OutputSplitter--> thinking, answer, tool calls (split at marker ids, never at text)
    tool-call text --parse_tool_call--> {"name", "arguments" (JSON)}
"""

from .build import save_tokenizer_files, train_tokenizer
from .chat import (
    ChatFormatError,
    default_chat_template,
    load_chat_template,
    normalize_messages,
    render_chat,
)
from .decoding import StreamDecoder, decode_incremental
from .parse import Delta, OutputSplitter, ParsedOutput, StopStream, find_stop, parse_output
from .specials import GEMMA4_SPECIALS
from .tokenizer import SpecialIds, Tokenizer, load_tokenizer
from .toolcalls import parse_tool_call

__all__ = [
    "GEMMA4_SPECIALS",
    "ChatFormatError",
    "Delta",
    "OutputSplitter",
    "ParsedOutput",
    "SpecialIds",
    "StopStream",
    "StreamDecoder",
    "Tokenizer",
    "decode_incremental",
    "default_chat_template",
    "find_stop",
    "load_chat_template",
    "load_tokenizer",
    "normalize_messages",
    "parse_output",
    "parse_tool_call",
    "render_chat",
    "save_tokenizer_files",
    "train_tokenizer",
]
