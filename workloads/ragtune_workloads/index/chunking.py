"""Splitting documents into chunks measured in the embedding model's own tokens.

Offsets come from the tokenizer's offset mapping, so every chunk's text is exactly `document.text[start:end]` and
can be traced back to the source. The markdown strategy first cuts at headings (outside fenced code) and then
windows each section, so no chunk spans two sections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from .loaders import Document

HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
FENCE = re.compile(r"^\s*(```|~~~)")


class Tokenizer(Protocol):
    def __call__(self, text: str, **kwargs): ...


@dataclass(frozen=True)
class Section:
    heading: str  # "Guide > Install": the heading path, "" before the first heading
    start: int
    end: int


@dataclass(frozen=True)
class Chunk:
    doc_path: str
    title: str
    section: str
    number: int
    start: int
    end: int
    text: str

    def metadata(self) -> dict[str, object]:
        return {"path": self.doc_path, "title": self.title, "section": self.section, "chunk": self.number,
                "start": self.start, "end": self.end}


def token_offsets(tokenizer: Tokenizer, text: str) -> list[tuple[int, int]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
    return [(start, end) for start, end in encoded["offset_mapping"] if end > start]


def windows(count: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[first, last) token ranges covering `count` tokens: as few windows of at most `size` tokens as possible,
    all of the same length, consecutive ones sharing `overlap` tokens (or one more, from rounding). Equal lengths
    matter: a fixed stride leaves a short tail window that is mostly overlap and matches queries by chance."""
    if count <= size:
        return [(0, count)] if count else []
    n = -(-(count - overlap) // (size - overlap))  # ceil: the fewest windows that fit
    length = -(-(count + (n - 1) * overlap) // n)  # ceil: ≤ size by the choice of n
    starts = [i * (count - length) // (n - 1) for i in range(n)]
    return [(start, start + length) for start in starts]


def markdown_sections(text: str) -> list[Section]:
    """Sections of a markdown text; a heading with no body of its own stays with the section that follows."""
    starts: list[tuple[int, str]] = [(0, "")]
    path: list[tuple[int, str]] = []
    in_fence = False
    offset = 0
    for line in text.splitlines(keepends=True):
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (match := HEADING.match(line.rstrip("\r\n"))):
            level = len(match.group(1))
            path = [(lvl, name) for lvl, name in path if lvl < level] + [(level, match.group(2))]
            starts.append((offset, " > ".join(name for _, name in path)))
        offset += len(line)
    sections = []
    for index, (start, heading) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(text)
        sections.append(Section(heading, start, end))
    merged: list[Section] = []
    pending_start: int | None = None
    for section in sections:
        body = text[section.start:section.end]
        only_heading = not body.strip() or (HEADING.match(body.strip()) and "\n" not in body.strip())
        if only_heading and section is not sections[-1]:
            pending_start = section.start if pending_start is None else pending_start
            continue
        start = pending_start if pending_start is not None else section.start
        merged.append(Section(section.heading, start, section.end))
        pending_start = None
    return [section for section in merged if text[section.start:section.end].strip()]


def chunk_span(text: str, offsets: list[tuple[int, int]], base: int, size: int, overlap: int,
               ) -> list[tuple[int, int]]:
    """Character spans (absolute, i.e. plus `base`) of the token windows over `offsets`."""
    return [(base + offsets[first][0], base + offsets[last - 1][1]) for first, last in
            windows(len(offsets), size, overlap)]


def chunk_document(document: Document, tokenizer: Tokenizer, strategy: str, size: int, overlap: int,
                   ) -> list[Chunk]:
    if strategy == "markdown":
        sections = markdown_sections(document.text)
    else:
        sections = [Section("", 0, len(document.text))]
    chunks: list[Chunk] = []
    for section in sections:
        section_text = document.text[section.start:section.end]
        offsets = token_offsets(tokenizer, section_text)
        for start, end in chunk_span(section_text, offsets, section.start, size, overlap):
            chunks.append(Chunk(document.path, document.title, section.heading, len(chunks), start, end,
                                document.text[start:end]))
    return chunks
