"""A contact sheet: a few frames of each of several clips in one JPEG, one clip a row, to look at a
run at a glance.

    python -m pipeline.media.contact_sheet OUT SHEET.jpg [--clips 8] [--frames 6]

OUT is a `reel render` output (any fsspec URI): its metadata gives each clip's video and prompt.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pipeline import storage
from pipeline.media.encode import decode_mp4, encode_jpeg

GAP = 2  # pixels between frames and rows


def sheet(clips: list[np.ndarray], frames: int = 6, scale: int = 2, background: int = 255) -> np.ndarray:
    """Rows of `frames` evenly spaced frames of each clip (T, H, W, 3), each frame scaled up by
    `scale` (nearest neighbour, so pixels stay pixels); clips of other sizes are centred in the
    largest one's cell."""
    if not clips:
        raise ValueError("no clips for the contact sheet")
    cell_h = max(c.shape[1] for c in clips) * scale
    cell_w = max(c.shape[2] for c in clips) * scale
    out = np.full((len(clips) * (cell_h + GAP) - GAP, frames * (cell_w + GAP) - GAP, 3), background, np.uint8)
    for r, clip in enumerate(clips):
        picks = np.linspace(0, len(clip) - 1, frames).round().astype(int)
        for c, t in enumerate(picks):
            img = clip[t].repeat(scale, axis=0).repeat(scale, axis=1)
            y = r * (cell_h + GAP) + (cell_h - img.shape[0]) // 2
            x = c * (cell_w + GAP) + (cell_w - img.shape[1]) // 2
            out[y:y + img.shape[0], x:x + img.shape[1]] = img
    return out


def spritesheet_grid(frame_count: int, tiles: int = 16, columns: int = 4) -> tuple[int, int]:
    """(columns, rows) of the spritesheet of a clip of `frame_count` frames: at most `tiles` tiles,
    whole rows only. Each tile is a frame's size plus GAP pixels between tiles."""
    columns = max(1, min(columns, frame_count))
    return columns, max(columns, min(tiles, frame_count) // columns * columns) // columns


def spritesheet(frames: np.ndarray, tiles: int = 16, columns: int = 4) -> np.ndarray:
    """A grid of evenly spaced frames of a clip (T, H, W, 3), left to right, top to bottom: the
    Videos API's `spritesheet` variant and the gallery's hover-scrub strip (`spritesheet_grid`)."""
    columns, rows = spritesheet_grid(len(frames), tiles, columns)
    picks = np.linspace(0, len(frames) - 1, columns * rows).round().astype(int)
    return sheet([frames[picks[i:i + columns]] for i in range(0, columns * rows, columns)], frames=columns, scale=1)


def sheet_of_run(out: str, clips: int = 8, frames: int = 6) -> tuple[np.ndarray, list[str]]:
    """(the sheet, its rows' "id: prompt" lines) of the first `clips` clips of a render output, by id."""
    meta = storage.read_parquet_dataset(storage.join(out, "metadata"), columns=["id", "prompt", "video_uri"])
    if meta is None or meta.num_rows == 0:
        raise ValueError(f"no rendered clips under {out}")
    rows = sorted(meta.to_pylist(), key=lambda r: r["id"])[:clips]
    videos = [decode_mp4(storage.read_bytes(r["video_uri"])) for r in rows]
    return sheet(videos, frames), [f"{r['id']}: {r['prompt']}" for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.media.contact_sheet", description=__doc__.split("\n")[0])
    p.add_argument("out", metavar="OUT", help="a reel render output")
    p.add_argument("sheet", metavar="SHEET.jpg", help="where to write the sheet (any fsspec URI)")
    p.add_argument("--clips", type=int, default=8, help="rows (clips, by id) (default: %(default)s)")
    p.add_argument("--frames", type=int, default=6, help="frames per row (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        image, lines = sheet_of_run(a.out, a.clips, a.frames)
    except ValueError as e:
        print(f"contact_sheet: {e}", file=sys.stderr)
        return 2
    storage.write_bytes_atomic(a.sheet, encode_jpeg(image, quality=95))
    print("\n".join(f"row {i + 1}  {line}" for i, line in enumerate(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
