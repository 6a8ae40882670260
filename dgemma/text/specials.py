"""Gemma-4 special-token strings and their ids in the real 262k vocabulary (spec §8).

One table, used three ways: `build.py` places our own small vocabularies' specials at the same ids
(so prompts, stop ids and pad behave identically on bundled and real models), `tokenizer.py` looks
the strings up in whatever vocabulary it loads (never trusting the ids blindly), and the prompt side
(`chat.py`, the chat template) writes the strings. Generated output is parsed by these tokens' IDS
(`parse.py`): the model can write a marker's characters as ordinary pieces, which are text.
"""

# name -> (token string, id in the Gemma-4 vocabulary). Names are what `Tokenizer.special` exposes.
GEMMA4_SPECIALS: dict[str, tuple[str, int]] = {
    "pad": ("<pad>", 0),
    "eos": ("<eos>", 1),
    "bos": ("<bos>", 2),
    "unk": ("<unk>", 3),
    "mask": ("<mask>", 4),
    "tool_start": ("<|tool>", 46),
    "tool_end": ("<tool|>", 47),
    "tool_call_start": ("<|tool_call>", 48),
    "tool_call_end": ("<tool_call|>", 49),
    "tool_response_start": ("<|tool_response>", 50),
    "tool_response_end": ("<tool_response|>", 51),
    "quote": ('<|"|>', 52),
    "think": ("<|think|>", 98),
    "channel_start": ("<|channel>", 100),
    "channel_end": ("<channel|>", 101),
    "turn_start": ("<|turn>", 105),
    "turn_end": ("<turn|>", 106),
}

NEWLINE_ID = 107  # "\n" is an ordinary token at 107 in Gemma-4; our vocabularies copy that.

# Token strings, named for readability at their use sites (text written around a tool call, the tool-call quote).
PAD, EOS, BOS = (GEMMA4_SPECIALS[name][0] for name in ("pad", "eos", "bos"))
TOOL_CALL_START, TOOL_CALL_END = GEMMA4_SPECIALS["tool_call_start"][0], GEMMA4_SPECIALS["tool_call_end"][0]
QUOTE = GEMMA4_SPECIALS["quote"][0]

# Generation ends on any of these (spec §2.3 eos_token_id [1, 106, 50]): <|tool_response> ends the
# model's turn after a tool call, so the caller can run the tool and append its result.
STOP_NAMES = ("eos", "turn_end", "tool_response_start")
