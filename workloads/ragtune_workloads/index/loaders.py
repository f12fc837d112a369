"""Turning a VectorIndex's sources into plain-text documents.

Every file either becomes a `Document` or a `Skipped` entry with a reason a user can act on; one bad file never
stops a run. Formats are decided by file extension; text is what a reader would see (HTML headings become
markdown headings so the markdown chunker can respect them).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ragtune.api.base import S3Location
from ragtune.api.vectorindex import SourceSpec
from ragtune_workloads.s3 import S3LocationError, download_folder

log = logging.getLogger(__name__)

EXTENSION_FORMATS = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".pdf": "pdf",
                     ".html": "html", ".htm": "html"}
MAX_FILE_BYTES = 64 * 1024 * 1024
# A NUL byte in the first block is the cheapest reliable sign of a binary file.
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    path: str  # "<source label>/<path inside the source>": stable across runs, shown in every chunk's metadata
    title: str
    text: str
    format: str

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str

    def to_wire(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class LoadResult:
    documents: list[Document] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def extend(self, other: LoadResult) -> None:
        self.documents.extend(other.documents)
        self.skipped.extend(other.skipped)


class UnusableFile(Exception):
    """A file that cannot become a document; the message is the reason shown to the user."""


def format_of(name: str, default: str | None = None) -> str | None:
    return EXTENSION_FORMATS.get(Path(name).suffix.lower(), default)


def title_line(text: str, longest: int = 300) -> str | None:
    """A plain-text document's title by the usual convention: a short first line set off by a blank line."""
    head, blank, _ = text.lstrip().partition("\n\n")
    head = head.strip()
    return head if blank and head and "\n" not in head and len(head) <= longest else None


def title_from_name(name: str) -> str:
    return Path(name).stem.replace("_", " ").replace("-", " ").strip() or name


# ---- extraction: bytes of one file → (title, text) ----------------------------------------------------------

def decode_text(data: bytes) -> str:
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        raise UnusableFile("binary content (NUL bytes), not a text document")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnusableFile(f"binary content: not valid UTF-8 at byte {exc.start}") from None


def first_markdown_heading(text: str) -> str | None:
    match = re.search(r"^#\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)
    return match.group(1) if match else None


def extract_pdf(data: bytes) -> tuple[str | None, str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.lstrip().startswith(b"%PDF-"):
        raise UnusableFile("corrupt pdf: no %PDF- header")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise UnusableFile("encrypted pdf: cannot extract text without the password")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or None
    except UnusableFile:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise UnusableFile(f"corrupt pdf: {exc}".strip()) from None
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise UnusableFile("pdf has no extractable text (scanned images need OCR)")
    return title, text


def extract_html(data: bytes) -> tuple[str | None, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode_text(data), "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    if soup.title:
        soup.title.decompose()
    # Headings become markdown headings so sections survive into chunk metadata.
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            heading.replace_with(f"\n\n{'#' * level} {heading.get_text(' ', strip=True)}\n\n")
    for block in soup.find_all(["p", "li", "tr", "div", "br", "pre", "blockquote"]):
        block.insert_after("\n")
    text = re.sub(r"[ \t]+\n", "\n", soup.get_text())
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return title or first_markdown_heading(text), text


def extract(name: str, data: bytes, fmt: str) -> tuple[str, str]:
    """(title, text) of one file; raises UnusableFile with the reason."""
    if not data.strip():
        raise UnusableFile("empty file")
    if fmt == "pdf":
        title, text = extract_pdf(data)
    elif fmt == "html":
        title, text = extract_html(data)
    else:
        text = decode_text(data)
        title = first_markdown_heading(text) if fmt == "md" else title_line(text)
    if not text.strip():
        raise UnusableFile("no text left after extraction")
    return title or title_from_name(name), text


def load_bytes(path: str, name: str, data: bytes, formats: Iterable[str], default_format: str | None = None,
               ) -> Document | Skipped:
    fmt = format_of(name, default_format)
    if fmt is None:
        return Skipped(path, f"unsupported file type {Path(name).suffix or '(no extension)'!r}; "
                             f"supported: {', '.join(sorted(set(EXTENSION_FORMATS)))}")
    if fmt not in formats:
        return Skipped(path, f"format {fmt!r} is not enabled in spec.formats")
    try:
        title, text = extract(name, data, fmt)
    except UnusableFile as exc:
        return Skipped(path, str(exc))
    return Document(path=path, title=title, text=text, format=fmt)


# ---- sources ------------------------------------------------------------------------------------------------

def is_mount_artifact(relative: Path) -> bool:
    # ConfigMap/Secret mounts hold `..data` and `..2024_…` symlinked dirs; hidden files are never documents.
    return any(part.startswith(".") for part in relative.parts)


def load_directory(root: Path, pattern: str, label: str, formats: Iterable[str],
                   default_format: str | None = None) -> LoadResult:
    result = LoadResult()
    formats = tuple(formats)
    if not root.is_dir():
        raise FileNotFoundError(f"source directory {root} does not exist")
    for file in sorted(root.glob(pattern)):
        relative = file.relative_to(root)
        if is_mount_artifact(relative) or file.is_dir():
            continue
        path = f"{label}/{relative.as_posix()}"
        try:
            size = file.stat().st_size
            if size > MAX_FILE_BYTES:
                result.skipped.append(Skipped(path, f"file too large ({size} bytes > {MAX_FILE_BYTES})"))
                continue
            data = file.read_bytes()
        except OSError as exc:
            result.skipped.append(Skipped(path, f"unreadable: {exc.strerror or exc}"))
            continue
        loaded = load_bytes(path, file.name, data, formats, default_format)
        (result.documents if isinstance(loaded, Document) else result.skipped).append(loaded)
    return result


def load_inline(source: SourceSpec, formats: Iterable[str]) -> LoadResult:
    result = LoadResult()
    for item in source.inline or []:
        loaded = load_bytes(f"inline/{item.name}", item.name, item.text.encode(), formats, default_format="txt")
        (result.documents if isinstance(loaded, Document) else result.skipped).append(loaded)
    return result


def fetch_s3_source(location: S3Location, pattern: str, target: Path, spec_field: str) -> None:
    """Copies the objects under the s3:// folder whose path matches the source's glob into `target`; credentials
    come from the environment the operator sets from the source's credentialsSecret. An empty folder is an error,
    as a missing directory is for a volume."""
    glob = pattern.removeprefix("**/")
    listed, _ = download_folder(location.uri, location.endpoint, target, spec_field,
                                lambda path: PurePosixPath(path).match(glob))
    if not listed:
        raise S3LocationError(f"{spec_field}.uri {location.uri}: no objects under that folder; put the documents "
                              "there or correct the uri")


def source_label(source: SourceSpec, index: int) -> str:
    if source.pvc:
        return "/".join(part for part in (source.pvc.claim_name, source.pvc.path.strip("/")) if part)
    if source.config_map:
        return f"configmap/{source.config_map}"
    if source.s3:
        return source.s3.uri.rstrip("/")
    if source.inline is not None:
        return "inline"
    return f"source-{index}"


def load_sources(sources: list[SourceSpec], source_paths: list[str | None], formats: Iterable[str]) -> LoadResult:
    """All documents of all sources. A source that cannot be reached at all is an error (the run fails);
    a file that cannot be read is skipped."""
    formats = tuple(formats)
    result = LoadResult()
    for index, source in enumerate(sources):
        local = source_paths[index] if index < len(source_paths) else None
        label = source_label(source, index)
        if source.inline is not None:
            result.extend(load_inline(source, formats))
            continue
        if local is None:
            raise ValueError(f"sources[{index}] ({label}) has no local path in the index config")
        root = Path(local)
        if source.s3 and not (root.is_dir() and any(root.iterdir())):
            root.mkdir(parents=True, exist_ok=True)
            fetch_s3_source(source.s3, source.glob, root, f"sources[{index}].s3")
        # ConfigMap keys often carry no extension; treat those as plain text.
        default = "txt" if source.config_map else None
        pattern = "*" if source.config_map else source.glob
        result.extend(load_directory(root, pattern, label, formats, default))
    return result
