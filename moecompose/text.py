"""Small text helpers shared by messages, reports and diffs."""

from __future__ import annotations

from collections.abc import Sequence


def ranges(indices: Sequence[int], dash: str = "-", open_end: bool = False) -> str:
    """Sorted indices as ranges: ``(0, 1, 2, 5)`` -> ``"0-2, 5"``; with ``open_end`` the
    last range reads ``"5-end"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = [str(s) if s == e else f"{s}{dash}{e}" for s, e in spans]
    if open_end and text:
        text[-1] = f"{spans[-1][0]}{dash}end"
    return ", ".join(text)
