"""bench/RESULTS.md: each benchmark script owns one "## " section and replaces only that one."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the section whose heading is text's first line; every other section stays."""
    heading = text.splitlines()[0]
    text = text.rstrip("\n") + "\n\n"  # one blank line before the next section
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")
