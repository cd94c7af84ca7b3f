"""decord (what the pipeline decodes with) against PyAV's sequential decode: the same frames at
random indices, in random order, for the codecs of the datasets the platform reads."""

from __future__ import annotations

from fractions import Fraction

import av
import decord
import numpy as np
import pytest

# the container/codec pairs of the datasets: SSv2 (VP9 webm), Diving48 and Kinetics (H.264
# mp4), UCF101 and HMDB51 (MPEG-4 Part 2 avi)
CODECS = [("libvpx-vp9", "webm"), ("libx264", "mp4"), ("mpeg4", "avi")]


def textured_frames(t: int = 24, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Moving stripes in colour plus noise: every frame differs, so an off-by-one shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    colour = np.array([1.0, 0.7, 0.4])
    frames = [
        (np.sin(xx / 5 + i / 3 + yy / 9) * 60 + 120)[..., None] * colour
        + rng.integers(0, 30, (h, w, 1))
        for i in range(t)
    ]
    return np.stack(frames).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec, ext", CODECS)
def test_decord_equals_pyav_at_random_indices_in_random_order(tmp_path, codec, ext):
    frames = textured_frames()
    path = tmp_path / f"clip.{ext}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(12))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:  # the reference: every frame, in order
        sequential = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(sequential) == len(frames)
    reader = decord.VideoReader(str(path), num_threads=1)
    assert len(reader) == len(sequential)
    rng = np.random.default_rng(1)
    for _ in range(3):  # seeks forwards and backwards, repeats included
        indices = rng.integers(0, len(reader), size=10)
        got = reader.get_batch(indices.tolist()).asnumpy()
        np.testing.assert_array_equal(got, sequential[indices])
    # and the content is the video's, not just its shape (lossy, so close, not equal)
    assert np.abs(sequential.astype(int) - frames.astype(int)).mean() < 12
