"""benchmarks/RESULTS.md is shared by several scripts: each owns one section, between two marker lines, and
rewrites only that section, keeping the rest of the file (other scripts' sections and hand-written text).

    <!-- BEGIN vs_trl:smol (written by a script; edits inside are overwritten) -->
    ...
    <!-- END vs_trl:smol -->

A section whose markers are not in the file yet is appended at the end.
"""

from __future__ import annotations

from pathlib import Path

TITLE = "# tether benchmarks: results"


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- BEGIN {key} (written by a script; edits inside are overwritten) -->", f"<!-- END {key} -->"


def replace_section(text: str, key: str, body: str) -> str:
    """`text` with the section `key` set to `body` (its markers included); everything else unchanged."""
    begin, end = _markers(key)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"<!-- BEGIN {key} ")]
    stops = [i for i, line in enumerate(lines) if line == end]
    if len(starts) > 1 or len(stops) > 1 or len(starts) != len(stops) or (starts and stops[0] < starts[0]):
        raise ValueError(
            f"RESULTS.md: section {key!r} has broken markers ({len(starts)} begin, {len(stops)} end)"
        )
    if starts:
        new = lines[: starts[0]] + block.splitlines() + lines[stops[0] + 1 :]
        return "\n".join(new) + "\n"
    head = text.rstrip() if text.strip() else TITLE
    return f"{head}\n\n{block}\n"


def write_section(path: Path, key: str, body: str) -> None:
    """Rewrite the section `key` of the file at `path` (created with a title if missing)."""
    text = path.read_text() if path.exists() else ""
    path.write_text(replace_section(text, key, body))
