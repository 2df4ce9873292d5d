"""The progress bar every long loop shows: one tensor per step, gone when done, off with -q."""

from __future__ import annotations


def bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)
