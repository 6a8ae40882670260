"""Multi-turn chat that reuses the cached prefix: each turn encodes only the tokens the cache lacks.

The conversation is kept as token ids, not re-rendered text: re-tokenising a generated answer need not
give the ids the model produced, and then the cache would no longer be a prefix of the prompt. A turn
appends the rendered user turn to the ids; after the answer, the emitted ids (cut exactly as streamed;
a final <eos> becomes the <turn|> that closes a model turn in the chat format) plus the turn-end marker.
The KV cache then holds the prompt and every committed canvas but the last, which is a prefix of the next
turn's prompt; that is checked (ids and length), and the cache is rebuilt if it is not.

The conversation opens with <bos> and the system turn (the system prompt, and the thinking switch in Gemma-4's
format); later turns are rendered as the chat template writes a user turn after earlier ones, so the system turn
appears once. Changing `system` or `enable_thinking` between turns rewrites that opening (the next turn then
encodes the conversation afresh). A turn that does not reach its Done event (an error, or a caller that stops
iterating, Ctrl-C) leaves the conversation as it was before that turn, and its cache is rebuilt.
"""

from __future__ import annotations

from .generate import ContextError
from .stream import Done, stream_ids


class ChatSession:
    def __init__(self, engine, *, system: str | None = None, enable_thinking: bool = False):
        self.engine = engine
        self.tok = engine.require_tokenizer()
        self.system = system
        self.enable_thinking = enable_thinking
        self.ids: list[int] = []  # the conversation so far, as the model saw or wrote it
        self.opening: list[int] = []  # the ids that open self.ids: <bos> and the system turn
        self.cache = None
        self.cached_ids: list[int] = []  # what self.cache holds
        self.reused_tokens = 0  # prompt tokens the last turn did not have to encode

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays): the history and its cache are dropped."""
        self.ids, self.opening, self.cache, self.cached_ids, self.reused_tokens = [], [], None, [], 0

    def _render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        return self.tok.render_chat(messages, add_generation_prompt=generation_prompt,
                                    enable_thinking=self.enable_thinking)

    def _opening_and_turn(self, user_text: str) -> tuple[list[int], list[int]]:
        """(opening, turn) ids for the current system prompt and thinking switch: the opening is what the template
        writes before the first user turn; the turn, what it writes for a user turn after earlier ones (the turn
        and the generation prompt), found as the difference of two renderings of a conversation."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        user = {"role": "user", "content": user_text}
        earlier = head + [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
        before, after, first = self._render(earlier, False), self._render(earlier + [user]), self._render(head + [user])
        turn = after[len(before):]
        if not after.startswith(before) or not first.endswith(turn):
            raise ValueError("this model's chat template does not render a conversation turn by turn (a rendering "
                             "with one more user turn does not extend the one before), so a chat session cannot "
                             "append turns to its history; pass the whole conversation as messages= to stream()")
        return self.tok.encode(first[: len(first) - len(turn)], add_bos=True), self.tok.encode(turn, add_bos=False)

    def send(self, user_text: str, **options):
        """Stream the answer to one user message (events as in engine/stream.py; response_format as in
        Engine.stream)."""
        if "response_format" in options:
            from .structured import structured_options
            options = structured_options(self.engine, options)
        opening, turn = self._opening_and_turn(user_text)
        history = self.ids
        if history and opening != self.opening:  # the system prompt or the thinking switch changed
            history = opening + history[len(self.opening):]
        prompt = history + turn if history else opening + turn
        n = len(self.cached_ids)
        if self.cache is None or self.cache.length != n or prompt[:n] != self.cached_ids:
            self.cache, self.cached_ids, n = self.engine.new_cache(1), [], 0
        self.reused_tokens = n
        done, held = None, list(self.cache.keys)  # each write replaces a layer's tensor
        try:
            for event in stream_ids(self.engine, prompt, cache=self.cache, cached_len=n, **options):
                if isinstance(event, Done):
                    done = event
                yield event
        except ContextError as e:  # refused before anything ran: the conversation is what grew, so say so
            if not history:
                raise
            raise ContextError(f"{e}; this conversation already holds {len(history)} of those tokens before the "
                               "new message: reset() starts a new one (/reset in dgemma chat)") from None
        finally:
            # a turn stopped after it wrote the cache (even inside an encoder pass, which writes layer by layer and
            # then the length) leaves a cache that is not what cached_ids records: rebuild it; a refused one keeps it
            if done is None and (self.cache.length != n or any(a is not b for a, b in zip(held, self.cache.keys))):
                self.cache, self.cached_ids = None, []
        turn_end = self.tok.special.turn_end
        answer = done.completion_ids
        if answer[-1:] == [self.tok.special.eos] and turn_end is not None:  # never in the cache: the last canvas
            answer = answer[:-1] + [turn_end]
        everything = prompt + answer
        self.cached_ids = everything[: self.cache.length]
        if self.cache.length > len(everything):  # a cut inside an encoded canvas: do not trust the cache
            self.cache, self.cached_ids = None, []
        closing = [] if answer[-1:] == [turn_end] else [turn_end]
        self.ids, self.opening = everything + closing + self.tok.encode("\n", add_bos=False), opening
