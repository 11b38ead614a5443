"""The labeling app's pages: static files from ``rlhf/assets/labeling`` and a safe Markdown subset.

The HTML files hold no data. Their scripts fetch JSON and build the DOM with ``textContent``,
never ``innerHTML``, so model output (which may contain HTML or script) is always shown as text.
Instructions written in Markdown are turned into a small JSON block tree here, and the page
builds elements from it the same way: no HTML from a file ever reaches the browser as markup.
"""

from __future__ import annotations

import re
from importlib import resources

# Only these files are served; a request for any other name is a 404, never a file read.
ASSETS = {
    "label.html": "text/html; charset=utf-8",
    "admin.html": "text/html; charset=utf-8",
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "label.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
}


def asset(name: str) -> bytes:
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files("rlhf").joinpath("assets", "labeling", name).read_bytes()


_INLINE = re.compile(r"(\*\*[^*\n]+\*\*|`[^`\n]+`|\*[^*\n]+\*|_[^_\n]+_)")


def _spans(text: str) -> list[dict[str, str]]:
    """Inline Markdown: **bold**, *italic* / _italic_, `code`; everything else is plain text."""
    out = []
    for part in _INLINE.split(text):
        if not part:
            continue
        if part.startswith("**") and part.endswith("**") and len(part) > 4:
            out.append({"t": "b", "s": part[2:-2]})
        elif part.startswith("`") and part.endswith("`") and len(part) > 2:
            out.append({"t": "code", "s": part[1:-1]})
        elif part[0] in "*_" and part[-1] == part[0] and len(part) > 2:
            out.append({"t": "i", "s": part[1:-1]})
        else:
            out.append({"t": "text", "s": part})
    return out


def markdown_blocks(text: str) -> list[dict]:
    """Headings (#, ##, ###), bullet (-, *) and numbered (1.) lists, paragraphs.

    Consecutive lines join into one paragraph; a blank line ends it. Anything else (HTML, links,
    images) stays literal text: instructions are for reading, not for embedding.
    """
    blocks: list[dict] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append({"t": "p", "spans": _spans(" ".join(para))})
            para.clear()

    for raw in text.splitlines():
        line = raw.strip()
        listed = re.match(r"^[-*]\s+(.*)$", line) or re.match(r"^\d+[.)]\s+(.*)$", line)
        if listed:
            flush()
            kind = "ul" if line[0] in "-*" else "ol"
            item = _spans(listed.group(1))
            if blocks and blocks[-1]["t"] == kind and blocks[-1].get("open"):
                blocks[-1]["items"].append(item)
            else:
                blocks.append({"t": kind, "items": [item], "open": True})
            continue
        if blocks:
            blocks[-1].pop("open", None)  # any other line ends a list
        heading = re.match(r"^(#{1,3})\s+(.*)$", line)
        if not line:
            flush()
        elif heading:
            flush()
            blocks.append({"t": "h", "level": len(heading.group(1)), "spans": _spans(heading.group(2))})
        else:
            para.append(line)
    flush()
    for b in blocks:
        b.pop("open", None)
    return blocks
