"""Live terminal view of a canvas converging (`--show-drafts`): committed text, then the current draft with
every token shaded by its confidence (dim red = unsure, bright green = settled) and a step counter."""

from __future__ import annotations

import sys

from rich.console import Console, Group
from rich.live import Live
from rich.style import Style
from rich.text import Text as RichText


def shade(confidence: float) -> Style:
    c = min(max(confidence, 0.0), 1.0)
    red, green = int(200 * (1 - c) + 40 * c), int(60 * (1 - c) + 220 * c)
    return Style(color=f"rgb({red},{green},{int(60 + 40 * c)})", dim=c < 0.3)


class DraftView:
    def __init__(self, tokenizer, console: Console | None = None):
        self.tok = tokenizer
        self.console = console or Console(file=sys.stdout)
        self.committed = RichText()
        self.draft = RichText()
        self.header = RichText()
        self.live = Live(self._render(), console=self.console, refresh_per_second=20, transient=False)
        self.live.start()

    def _render(self):
        return Group(self.committed + self.draft, self.header)

    def update(self, draft) -> None:
        text = RichText()
        for token, conf in zip(draft.token_ids, draft.confidence):
            piece = self.tok.decode([token], skip_special=False).replace("\n", "⏎")
            text.append(piece, style=shade(conf))
        mean = sum(draft.confidence) / max(1, len(draft.confidence))
        self.draft = text
        self.header = RichText(f"canvas {draft.canvas_index + 1} · step {draft.step} · mean confidence {mean:.2f}",
                               style="bold cyan")
        self.live.update(self._render())

    def commit(self, text_event) -> None:
        style = Style(dim=True, italic=True) if text_event.kind == "thinking" else Style()
        self.committed.append(text_event.text, style=style)
        self.draft = RichText()
        self.live.update(self._render())

    def close(self) -> None:
        # the last frame is the answer alone: a canvas that committed no text (it began at a stop id, or a stop
        # string cut before it) left its draft behind, raw <eos> pieces included
        self.header, self.draft = RichText(), RichText()
        self.live.update(self._render())
        self.live.stop()
