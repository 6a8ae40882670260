"""Live terminal view of a canvas converging (`--show-drafts`): committed text, then the current draft with
every token shaded by its confidence (dim red = unsure, bright green = settled) and a step counter.

Only a terminal gets the live view. Written to a pipe or a file, a live view would have nothing to redraw and its
last frame would be the answer re-wrapped at the console's width (80 columns, or $COLUMNS); there the committed
text is written as it arrives, byte for byte what the command prints without --show-drafts."""

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
        self.live = None
        if not self.console.is_terminal:  # no screen to redraw: the answer's text as it is (module docstring)
            return
        self.live = Live(self._render(), console=self.console, refresh_per_second=20, transient=False)
        self.live.start()

    def _render(self):
        body = self.committed + self.draft
        return Group(body, self.header) if self.header else body  # an empty header would add a blank line

    def update(self, draft) -> None:
        if self.live is None:
            return
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
        if self.live is None:
            self.console.file.write(text_event.text)
            self.console.file.flush()
            return
        style = Style(dim=True, italic=True) if text_event.kind == "thinking" else Style()
        self.committed.append(text_event.text, style=style)
        self.draft = RichText()
        self.live.update(self._render())

    def close(self) -> None:
        # the last frame is the answer alone: a canvas that committed no text (it began at a stop id, or a stop
        # string cut before it) left its draft behind, raw <eos> pieces included
        if self.live is None:
            return
        self.header, self.draft = RichText(), RichText()
        self.live.update(self._render())
        self.live.stop()
