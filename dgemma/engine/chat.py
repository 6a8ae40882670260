"""Multi-turn chat that reuses the cached prefix: each turn encodes only the tokens the cache lacks.

The conversation is kept as token ids, not re-rendered text: re-tokenising a generated answer need not
give the ids the model produced, and then the cache would no longer be a prefix of the prompt. A turn
appends the rendered user turn to the ids; after the answer, the emitted ids (cut exactly as streamed)
plus the turn-end marker. The KV cache then holds the prompt and every committed canvas but the last,
which is a prefix of the next turn's prompt; that is checked, and the cache is rebuilt if it is not.
"""

from __future__ import annotations

from .stream import Done, stream_ids


class ChatSession:
    def __init__(self, engine, *, system: str | None = None, enable_thinking: bool = False):
        self.engine = engine
        self.tok = engine.require_tokenizer()
        self.system = system
        self.enable_thinking = enable_thinking
        self.ids: list[int] = []  # the conversation so far, as the model saw or wrote it
        self.cache = None
        self.cached_ids: list[int] = []  # what self.cache holds
        self.reused_tokens = 0  # prompt tokens the last turn did not have to encode

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays): the history and its cache are dropped."""
        self.ids, self.cache, self.cached_ids, self.reused_tokens = [], None, [], 0

    def _turn_ids(self, user_text: str) -> list[int]:
        messages = [{"role": "user", "content": user_text}]
        if not self.ids and self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        ids = self.tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=self.enable_thinking)
        if self.ids and ids and ids[0] == self.tok.special.bos:  # <bos> only opens the conversation
            ids = ids[1:]
        return ids

    def send(self, user_text: str, **options):
        """Stream the answer to one user message (events as in engine/stream.py)."""
        prompt = self.ids + self._turn_ids(user_text)
        n = len(self.cached_ids)
        if self.cache is None or prompt[:n] != self.cached_ids:
            self.cache, self.cached_ids, n = self.engine.new_cache(1), [], 0
        self.reused_tokens = n
        done = None
        for event in stream_ids(self.engine, prompt, cache=self.cache, cached_len=n, **options):
            if isinstance(event, Done):
                done = event
            yield event
        everything = prompt + done.completion_ids
        self.cached_ids = everything[: self.cache.length]
        if self.cache.length > len(everything):  # a cut inside an encoded canvas: do not trust the cache
            self.cache, self.cached_ids = None, []
        turn_end = self.tok.special.turn_end
        closing = [] if done.completion_ids[-1:] == [turn_end] else [turn_end]
        self.ids = everything + closing + self.tok.encode("\n", add_bos=False)
