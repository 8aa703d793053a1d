"""Video documents: a clip path -> 8 RGB frames, read exactly as lmms-eval's own `video_llava` model reads them.

lmms-eval 0.7.3 (`models/model_utils/load_video.py::read_video`, pyav backend, called with `num_frm=8`): open the file
with av; unless the path names webm / mkv, take the frame count the container announces (`stream.frames`), sample the
indices `np.linspace(0, n - 1, min(n, 8), dtype=int)` and decode frames in order keeping those; otherwise (webm / mkv, or
the stream path failing: no announced count) decode every frame (`container.demux`). Frames as `to_ndarray("rgb24")`.

Where lmms-eval's model fails the document (it has no per-document errors, so the run is lost) we either refuse the
document with one line or take a documented sane reading:
- fewer than 8 frames: refused (`VideoError`). lmms-eval pads the pixels with zero frames but leaves the prompt at the
  shorter clip's placeholder count, and the model then raises on the mismatch;
- a container that announces no frame count or cannot be seeked (a raw H.264 stream), and webm / mkv files with more
  than 8 frames: every frame is decoded and 8 are taken at `np.linspace(0, n - 1, 8)` (lmms-eval hands all of them to
  the processor and fails on the count); for n == 8 this is exactly lmms-eval's reading;
- a file that av cannot open or decode (not a video, empty, truncated): refused with av's own first line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

NUM_FRAMES = 8  # Video-LLaVA's frames per video (lmms-eval's video_llava asserts 8)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif", ".h264", ".ts", ".3gp")


class VideoError(ValueError):
    """A video document that cannot be read as Video-LLaVA's 8 frames (one line, the harness records it)."""


@dataclass
class VideoClip:
    """A video document: its path and, once read, its 8 frames (uint8 [8, H, W, 3]) and the frame count it had."""

    path: str
    frames: Optional[np.ndarray] = field(default=None, repr=False)
    total_frames: int = 0
    indices: Optional[List[int]] = None

    @property
    def size(self) -> Optional[tuple]:
        """(width, height) of its frames once read."""
        return None if self.frames is None else (int(self.frames.shape[2]), int(self.frames.shape[1]))

    def read(self, num_frames: int = NUM_FRAMES) -> "VideoClip":
        """This clip with its frames read (itself when already read)."""
        if self.frames is not None:
            return self
        frames, total, indices = read_frames(self.path, num_frames)
        return VideoClip(self.path, frames, total, indices)


def is_video_path(item: Any) -> bool:
    """A lmms-eval visual that names a video file (a path string, or a one-element list / tuple of one)."""
    if isinstance(item, (list, tuple)) and len(item) == 1:
        item = item[0]
    return isinstance(item, str) and os.path.splitext(item)[1].lower() in VIDEO_SUFFIXES


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _decode_all(path: str) -> list:
    import av

    with av.open(path) as container:
        return [frame for packet in container.demux(video=0) for frame in packet.decode()]


def _decode_at(path: str, indices: np.ndarray) -> list:
    """lmms-eval's `record_video_length_stream`: decode in order, keep the frames at `indices`, stop after the last."""
    import av

    wanted, last, out = set(indices.tolist()), int(indices[-1]), []
    with av.open(path) as container:
        container.streams.video[0].thread_type = "AUTO"
        for i, frame in enumerate(container.decode(video=0)):
            if i > last:
                break
            if i in wanted:
                out.append(frame)
    return out


def read_frames(path: str, num_frames: int = NUM_FRAMES):
    """(frames uint8 [num_frames, H, W, 3], frames in the clip, the indices taken); VideoError when it cannot."""
    import av

    if not os.path.isfile(path):
        raise VideoError(f"video {path!r} does not exist")
    name = os.path.basename(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"video {name!r} has no video stream")
            announced = int(container.streams.video[0].frames or 0)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as err:
        raise VideoError(f"video {name!r} cannot be opened: {_first_line(err)}") from None
    stream_path = "webm" not in path and "mkv" not in path and announced > 0
    try:
        if stream_path:
            total = announced
            indices = np.linspace(0, total - 1, min(total, num_frames), dtype=int)
            frames = _decode_at(path, indices)
            if len(frames) != len(indices):  # the container announced more frames than it holds: count them
                stream_path = False
        if not stream_path:
            every = _decode_all(path)
            total = len(every)
            if total == 0:
                raise VideoError(f"video {name!r} holds no decodable frame")
            indices = np.linspace(0, total - 1, num_frames if total >= num_frames else total, dtype=int)
            frames = [every[i] for i in indices]
        if total < num_frames:
            raise VideoError(f"video {name!r} has {total} frames; Video-LLaVA takes {num_frames} (lmms-eval's video_llava fails on it too)")
        array = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, RuntimeError) as err:
        raise VideoError(f"video {name!r} cannot be decoded: {_first_line(err)}") from None
    return array, total, [int(i) for i in indices]
