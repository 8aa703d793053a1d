"""Regenerate the tokprune_video_smoke clips, images and documents (deterministic: seeded frames, near-lossless H.264).

    python tasks/tokprune_video_smoke/make_data.py

Ten documents: eight synthetic clips (64 x 48 px, 12 to 40 frames, a coloured shape moving over a textured background)
asked for the shape's colour, its direction or its shape, and two still images (a mixed task: Video-LLaVA reads images
through its image tower). Clips are written with av (libx264, yuv420p, 8 fps).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from lmms_tokprune.testing.tiny_video import moving_shapes, write_clip

HERE = Path(__file__).resolve().parent
CLIPS = [  # name, frames, colour, shape, direction, question kind
    ("red_circle_right", 16, "red", "circle", "right", "colour"),
    ("green_square_left", 24, "green", "square", "left", "direction"),
    ("blue_triangle_down", 12, "blue", "triangle", "down", "shape"),
    ("yellow_circle_up", 40, "yellow", "circle", "up", "direction"),
    ("blue_square_right", 20, "blue", "square", "right", "colour"),
    ("red_triangle_left", 32, "red", "triangle", "left", "shape"),
    ("green_circle_down", 8, "green", "circle", "down", "colour"),
    ("yellow_square_up", 28, "yellow", "square", "up", "shape"),
]
QUESTIONS = {
    "colour": "What colour is the moving shape?",
    "direction": "In which direction does the shape move: left, right, up or down?",
    "shape": "What shape is moving: circle, square or triangle?",
}


def main() -> None:
    docs = []
    for i, (name, frames, colour, shape, direction, kind) in enumerate(CLIPS):
        path = write_clip(HERE / "clips" / f"{name}.mp4", moving_shapes(frames, 64, 48, colour=colour, shape=shape, direction=direction, seed=i))
        answer = {"colour": colour, "direction": direction, "shape": shape}[kind]
        docs.append({"id": f"v{i}", "visual": f"clips/{path.name}", "question": QUESTIONS[kind], "answer": answer})
    for i, (colour, shape) in enumerate((("red", "square"), ("blue", "circle"))):
        frame = moving_shapes(1, 96, 72, colour=colour, shape=shape, seed=100 + i)[0]
        (HERE / "images").mkdir(exist_ok=True)
        Image.fromarray(frame).save(HERE / "images" / f"{colour}_{shape}.png")
        docs.append({"id": f"i{i}", "visual": f"images/{colour}_{shape}.png", "question": QUESTIONS["colour"], "answer": colour})
    (HERE / "data").mkdir(exist_ok=True)
    (HERE / "data" / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))


if __name__ == "__main__":
    main()
