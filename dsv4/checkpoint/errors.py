"""The one error type of checkpoint reading and validation, and how it lists many problems at once.

Checkpoint problems come in bulk (a wrong config mis-shapes thousands of tensors), so every check collects
all of them and raises once; each group is sorted, counted, and cut after `limit` lines.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint on disk that is malformed or does not match the model config."""


def problem_report(headline: str, groups: dict[str, list[str]], limit: int = 50) -> str:
    """`headline (a: 3, b: 1)` followed by each non-empty group, sorted, at most `limit` lines each."""
    groups = {title: sorted(lines) for title, lines in groups.items() if lines}
    counts = ", ".join(f"{len(lines)} {title}" for title, lines in groups.items())
    out = [f"{headline} ({counts})"]
    for title, lines in groups.items():
        out.append(f"  {title} ({len(lines)}):")
        out.extend(f"    {line}" for line in lines[:limit])
        if len(lines) > limit:
            out.append(f"    ... and {len(lines) - limit} more")
    return "\n".join(out)
