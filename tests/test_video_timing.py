"""Frame selection from timestamps against libavfilter's own ``trim`` and ``fps`` filters, fed tiny
frames that carry their index, with the same timestamps, durations and end of stream."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from penguin_vl.video.timing import (
    Timeline,
    _fps_slots_sequential,
    cli_microseconds,
    d2q,
    fps_slots,
    index_sample,
    rescale,
    thin,
    trim_window,
)

MICROSECOND = Fraction(1, 1_000_000)


def libavfilter_picks(
    pts: list[int], durations: list[int], time_base: Fraction, fps: float, trim_us: int | None = None
) -> tuple[list[int], Fraction]:
    """Indices of the frames FFmpeg's filters emit, and the output time base."""
    graph = av.filter.Graph()
    chain = [graph.add("buffer", video_size="4x1", pix_fmt="gray", time_base=str(time_base), pixel_aspect="1/1")]
    if trim_us is not None:
        chain.append(graph.add("trim", f"start=0:duration={trim_us}us"))
    chain += [graph.add("fps", f"fps={fps!r}:round=down"), graph.add("buffersink")]
    for a, b in zip(chain, chain[1:], strict=False):
        a.link_to(b)
    graph.configure()
    out: list[int] = []
    time_bases: list[Fraction] = []

    def drain() -> None:
        while True:
            try:
                frame = graph.vpull()
            except (av.BlockingIOError, av.EOFError):
                return
            out.append(int(frame.to_ndarray()[0].view("<u4")[0]))
            time_bases.append(frame.time_base)

    for i, (p, d) in enumerate(zip(pts, durations, strict=True)):
        tag = np.array([i], dtype="<u4").view(np.uint8).reshape(1, 4)
        frame = av.VideoFrame.from_ndarray(tag, format="gray")
        frame.pts, frame.duration, frame.time_base = p, d, time_base
        try:
            graph.vpush(frame)
        except av.EOFError:  # trim has ended the stream
            break
        drain()
    else:
        graph.vpush(None)
    drain()
    return out, (time_bases[0] if time_bases else None)


def planned_picks(pts: list[int], durations: list[int], time_base: Fraction, fps: float, trim_us: int | None = None):
    timeline = Timeline(np.array(pts, dtype=np.int64), np.array(durations, dtype=np.int64))
    # libavfilter's buffer source ends the stream at the last frame's time plus its duration, as the
    # command line does; offsets are applied to the timestamps before they get here
    kept, shifted, end = trim_window(timeline, time_base, 0, trim_us)
    return kept[fps_slots(shifted, end, time_base, d2q(fps))].tolist()


@pytest.mark.parametrize("fps", [1.0, 2.0, 0.3, 7.5, 29.97, 60.0, 1 / 3])
@pytest.mark.parametrize(
    ("time_base", "step"), [(Fraction(1, 15360), 512), (Fraction(1, 90000), 3003), (Fraction(1, 1000), 40)]
)
def test_constant_rate_matches_fps_filter(fps: float, time_base: Fraction, step: int) -> None:
    n = 173
    pts = [7 * step + i * step for i in range(n)]
    durations = [step] * n
    expected, out_tb = libavfilter_picks(pts, durations, time_base, fps)
    assert planned_picks(pts, durations, time_base, fps) == expected
    assert out_tb == 1 / d2q(fps)


@settings(max_examples=30, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 400), min_size=1, max_size=60),
    start=st.integers(-500, 3000),
    last_duration=st.integers(0, 600),
    fps=st.sampled_from([0.5, 1.0, 3.0, 12.5, 24.0, 100.0]),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_variable_timestamps_match_fps_filter(gaps, start, last_duration, fps, shuffle, seed) -> None:
    time_base = Fraction(1, 1000)
    pts = (start + np.cumsum(gaps)).tolist()
    if shuffle:  # out of order: the filter's state machine, step by step
        np.random.default_rng(seed).shuffle(pts)
    durations = [40] * (len(pts) - 1) + [last_duration]
    expected, _ = libavfilter_picks(pts, durations, time_base, fps)
    assert planned_picks(pts, durations, time_base, fps) == expected


@settings(max_examples=25, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 90), min_size=1, max_size=50),
    start=st.integers(-800, 400),
    trim_ms=st.integers(1, 2500),
    fps=st.sampled_from([1.0, 4.0, 10.0]),
)
def test_trim_matches_trim_filter(gaps, start, trim_ms, fps) -> None:
    time_base = Fraction(1, 1000)
    pts = (start + np.cumsum(gaps)).tolist()
    durations = [33] * len(pts)
    expected, _ = libavfilter_picks(pts, durations, time_base, fps, trim_us=trim_ms * 1000)
    assert planned_picks(pts, durations, time_base, fps, trim_us=trim_ms * 1000) == expected


@settings(max_examples=100, deadline=None)
@given(slots=st.lists(st.integers(-20, 200), min_size=1, max_size=40), end=st.integers(-30, 260))
def test_vectorised_slots_equal_state_machine(slots, end) -> None:
    slots = sorted(slots)
    vectorised = fps_slots(np.array(slots), end, Fraction(1), Fraction(1))
    assert vectorised.tolist() == _fps_slots_sequential(slots, end).tolist()


def test_rescale_rounding() -> None:
    assert rescale(3, Fraction(1, 2), Fraction(1)) == 2  # 1.5: halves away from zero
    assert rescale(-3, Fraction(1, 2), Fraction(1)) == -2
    assert rescale(-3, Fraction(1, 2), Fraction(1), down=True) == -2
    assert rescale(5, Fraction(1, 3), Fraction(1), down=True) == 1
    assert rescale(1_370_000, MICROSECOND, Fraction(1, 1000)) == 1370


def test_d2q_is_ffmpegs_rational() -> None:
    assert d2q(2.0) == 2
    assert d2q(0.3) == Fraction(3, 10)
    assert d2q(29.97) == Fraction(2997, 100)
    assert d2q(1 / 3) == Fraction(1, 3)
    with pytest.raises(ValueError, match="frame rate"):
        d2q(0.0)


def test_cli_microseconds_truncate_like_av_parse_time() -> None:
    assert cli_microseconds(7.5) == 7_500_000
    assert cli_microseconds(0.1 + 0.2) == 300_000  # "0.30000000000000004"
    assert cli_microseconds(2.9999999999999996) == 2_999_999
    assert cli_microseconds(12) == 12_000_000


def test_thin_is_linspace_when_over() -> None:
    assert thin(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert thin(29, 5).tolist() == np.linspace(0, 28, 5, dtype=int).tolist()


def test_index_sample_rules() -> None:
    # GIF of 40 frames at fps 1: segments of 25 frames, the middle of each
    assert index_sample(40, 25, 1.0, 180, None, None).tolist() == [12, 37]
    # folder of 23 frames at 3 fps, fps 1: every third frame from the second
    assert index_sample(23, 3, 1.0, 180, None, None).tolist() == list(range(1, 23, 3))
    # more seconds than max_frames: linspace over the range
    assert index_sample(100, 3, 1.0, 10, None, None).tolist() == np.linspace(0, 99, 10, dtype=int).tolist()
    # start/end cut at int(t * rate) - 1; reversed and equal bounds are mended as the reference does
    assert index_sample(100, 3, 3.0, 180, 2.0, 4.0).tolist() == list(range(5, 12))
    assert index_sample(100, 3, 3.0, 180, 4.0, 2.0).tolist() == list(range(5, 12))
    assert index_sample(100, 3, 3.0, 180, 2.0, 2.0).tolist() == list(range(5, 9))
    assert len(index_sample(10, 3, 1.0, 180, 9.0, None)) == 0
    with pytest.raises(ValueError, match="fps=4.0"):
        index_sample(10, 3, 4.0, 180, None, None)
