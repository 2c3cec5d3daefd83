"""Print the first code block under a README heading, verbatim, so CI runs what the README shows.

    python .ci/readme_snippet.py "## Quickstart" | python -
    python .ci/readme_snippet.py "## Quickstart" --language python --readme README.md
    python .ci/readme_snippet.py "**Smoke run.**" --language ""

The heading is the start of a line: a markdown heading, or a paragraph's bold lead-in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FENCE = "```"


def snippet(text: str, heading: str, language: str) -> str:
    """The body of the first ```language block after the line starting with ``heading``,
    within its section."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        raise LookupError(f"heading {heading!r} not found")
    level = len(heading) - len(heading.lstrip("#"))
    for i in range(start + 1, len(lines)):
        line = lines[i]
        depth = len(line) - len(line.lstrip("#"))
        if 0 < depth <= level and line[depth:depth + 1] == " ":
            break
        if line.strip() == FENCE + language:
            end = lines.index(FENCE, i + 1)
            return "\n".join(lines[i + 1:end]) + "\n"
    raise LookupError(f"no {FENCE}{language} block under {heading!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("heading", help='the start of the heading line, e.g. "## Quickstart"')
    parser.add_argument("--language", default="python", help="the fence's language tag (python)")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "README.md")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(snippet(args.readme.read_text(), args.heading, args.language))
    except LookupError as exc:
        parser.exit(1, f"{parser.prog}: error: {args.readme}: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
