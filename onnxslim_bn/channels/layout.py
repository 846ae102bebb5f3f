"""Channel layouts: which channels of which spaces a tensor carries along its channel axis.

A *channel space* is a set of channels that live or die together. Every tensor whose axis 1
carries pruneable channels has a :data:`Layout`: the spaces laid end to end along that axis
(one segment for an ordinary activation, several after a channel concatenation).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """``size`` consecutive channels of one space, from channel ``offset`` of the space (a
    Split or Slice on the channel axis takes part of a space); each channel spans ``repeat``
    entries (``repeat`` > 1 after a C*H*W flatten: channel c owns entries c*H*W .. (c+1)*H*W-1)."""

    space: int
    size: int
    repeat: int = 1
    offset: int = 0


def cut(layout: Layout, start: int, end: int) -> Layout:
    """The channels [start, end) of a layout, as segments (of parts) of the same spaces."""
    out, pos = [], 0
    for seg in layout:
        lo, hi = max(start, pos), min(end, pos + seg.size)
        if lo < hi:
            out.append(Segment(seg.space, hi - lo, seg.repeat, seg.offset + lo - pos))
        pos += seg.size
    return tuple(out)


Layout = tuple[Segment, ...]


def width(layout: Layout) -> int:
    """Number of entries along the channel axis (channels times their repeat)."""
    return sum(s.size * s.repeat for s in layout)


def channels(layout: Layout) -> int:
    return sum(s.size for s in layout)


def sizes(layout: Layout) -> str:
    return "+".join(str(s.size) for s in layout)
