"""What a run shows: log.jsonl, a rich progress bar, and the loss curve as a PNG drawn without a plotting library
(an RGB raster, straight lines, a 3x5 pixel font, and the PNG container written by hand: signature, IHDR, one
zlib-compressed IDAT, IEND, each chunk CRC32-checked)."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

# 3x5 glyphs, rows top to bottom, "1" = ink. Enough for numbers ("%.3g") and the legend words.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "000011111100011", "a": "000011101101011", "i": "010000010010010",
    "l": "010010010010011", "n": "000110101101101", "o": "000010101101010", "p": "000110101110100",
    "r": "000101110100100", "s": "000011110001110", "t": "010111010010011", "v": "000101101101010",
    "g": "000011101011110", " ": "000000000000000", ":": "000010000010000",
}
INK, GRID, TRAIN, EVAL = (40, 40, 40), (225, 225, 225), (31, 119, 180), (255, 127, 14)


def png_bytes(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """8-bit RGB pixels, row-major, no alpha -> a complete PNG file."""
    assert len(rgb) == width * height * 3, "pixel buffer size does not match width x height x 3"
    stride = width * 3
    raw = b"".join(b"\x00" + bytes(rgb[y * stride:(y + 1) * stride]) for y in range(height))  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


class Raster:
    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def dot(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i:i + 3] = bytes(color)

    def box(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            for x in range(min(x0, x1), max(x0, x1) + 1):
                self.dot(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, width: int = 1) -> None:
        """Bresenham; `width` > 1 thickens it with a square pen."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.box(x0, y0, x0 + width - 1, y0 + width - 1, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color=INK, scale: int = 2) -> None:
        for k, ch in enumerate(s):
            glyph = _FONT.get(ch, _FONT[" "])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = x + (k * 4 + i % 3) * scale, y + (i // 3) * scale
                    self.box(gx, gy, gx + scale - 1, gy + scale - 1, color)

    def png(self) -> bytes:
        return png_bytes(self.width, self.height, self.pixels)


def plot_losses(path: str | Path, train: list[tuple[int, float]], evals: list[tuple[int, float]] = (),
                width: int = 640, height: int = 360) -> Path:
    """Write the train loss (line) and eval loss (squares) against the step. The y axis is logarithmic when the
    losses span more than a factor of 20 (a from-scratch run starts near ln(V))."""
    points = [v for _, v in list(train) + list(evals) if math.isfinite(v) and v > 0]
    steps = [s for s, _ in list(train) + list(evals)]
    img = Raster(width, height)
    left, right, top, bottom = 70, width - 15, 30, height - 35
    if points:
        lo, hi = min(points), max(points)
        log = hi / lo > 20
        f = math.log if log else (lambda v: v)
        y_lo, y_hi = f(lo), f(hi)
        if y_hi - y_lo < 1e-12:
            y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad
        x_lo, x_hi = min(steps), max(max(steps), min(steps) + 1)

        def px(step, value):
            return (round(left + (step - x_lo) / (x_hi - x_lo) * (right - left)),
                    round(bottom - (f(value) - y_lo) / (y_hi - y_lo) * (bottom - top)))

        for k in range(5):  # horizontal grid lines with their values
            yv = y_lo + (y_hi - y_lo) * k / 4
            y = round(bottom - (bottom - top) * k / 4)
            img.line(left, y, right, y, GRID)
            img.text(5, y - 5, f"{math.exp(yv) if log else yv:.3g}")
        for k, s in enumerate((x_lo, (x_lo + x_hi) // 2, x_hi)):
            label = str(int(s))
            img.text(min(left + k * (right - left) // 2 - len(label) * 4, width - len(label) * 8), bottom + 8, label)
        kept = [(s, v) for s, v in train if math.isfinite(v) and v > 0]
        for (s0, v0), (s1, v1) in zip(kept, kept[1:]):
            img.line(*px(s0, v0), *px(s1, v1), TRAIN, width=2)
        if len(kept) == 1:
            img.box(*px(*kept[0]), *(c + 2 for c in px(*kept[0])), TRAIN)
        for s, v in evals:
            if math.isfinite(v) and v > 0:
                x, y = px(s, v)
                img.box(x - 3, y - 3, x + 3, y + 3, EVAL)
    img.line(left, top, left, bottom, INK)
    img.line(left, bottom, right, bottom, INK)
    img.box(left + 10, 10, left + 24, 16, TRAIN)
    img.text(left + 30, 8, "train loss")
    img.box(left + 130, 10, left + 136, 16, EVAL)
    img.text(left + 144, 8, "eval loss" + ("   log" if points and log else ""))
    path = Path(path)
    path.write_bytes(img.png())
    return path


# --- the run's log ------------------------------------------------------------------------------------------
class Log:
    """log.jsonl (on resume, kept up to the resumed step) and loss.png drawn from it; a no-op when not enabled
    (data-parallel ranks other than 0)."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.path, self.enabled = out / "log.jsonl", enabled
        self.records = []
        if enabled and self.path.exists() and start_step > 0:
            self.records = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= start_step]
        if enabled:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        if self.enabled:
            self.records.append(record)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if self.enabled:
            train = [(r["step"], r["loss"]) for r in self.records if r["kind"] == "train"]
            evals = [(r["step"], r["loss"]) for r in self.records if r["kind"] == "eval"]
            plot_losses(self.path.with_name("loss.png"), train, evals)


def progress_bar(enabled: bool, total: int, start: int):
    """A started rich progress bar (step, loss, tokens/s, ETA), or None; the caller updates and stops it."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s  eta"),
                        TimeRemainingColumn(), transient=False)
    progress.start()
    progress.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
    return progress
