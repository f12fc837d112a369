"""Loading sources and chunking them: every bad file is skipped with its reason, every chunk is traceable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ragtune.api.vectorindex import InlineDocument, SourceSpec
from ragtune_workloads.index.chunking import chunk_document, markdown_sections, token_offsets
from ragtune_workloads.index.loaders import Document, load_sources, title_line

ALL_FORMATS = ("txt", "md", "pdf", "html")


def pdf_with_text(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct cross-reference table."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


@pytest.fixture
def mixed_directory(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "guide").mkdir(parents=True)
    (root / "notes.txt").write_text("Wing loading and stall speed.\n")
    (root / "guide" / "setup.md").write_text("# Setup\n\nInstall the wing.\n\n## Checks\n\nCheck the flaps.\n")
    (root / "page.html").write_text("<html><head><title>Flow Page</title><script>var x = 1;</script></head>"
                                    "<body><h1>Boundary layers</h1><p>Laminar flow separates.</p></body></html>")
    (root / "paper.pdf").write_bytes(pdf_with_text("Shock waves in supersonic flow"))
    # Every kind of bad file:
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text("   \n\n")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    (root / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 9 0 R\n" + os.urandom(64))
    (root / "fake.pdf").write_bytes(b"this is not a pdf at all")
    (root / "scripts-only.html").write_text("<html><script>alert(1)</script></html>")
    (root / "report.docx").write_bytes(b"PK\x03\x04")
    (root / "dangling.md").symlink_to(root / "does-not-exist.md")
    return root


def skipped_reasons(result) -> dict[str, str]:
    return {entry.path: entry.reason for entry in result.skipped}


def test_bad_files_are_skipped_with_their_reason_and_good_ones_load(mixed_directory):
    result = load_sources([SourceSpec(pvc={"claimName": "docs"})], [str(mixed_directory)], ALL_FORMATS)

    loaded = {doc.path: doc for doc in result.documents}
    assert sorted(loaded) == ["docs/guide/setup.md", "docs/notes.txt", "docs/page.html", "docs/paper.pdf"]
    assert "Shock waves in supersonic flow" in loaded["docs/paper.pdf"].text
    assert loaded["docs/guide/setup.md"].title == "Setup"
    assert loaded["docs/page.html"].title == "Flow Page"
    assert "var x" not in loaded["docs/page.html"].text

    reasons = skipped_reasons(result)
    assert reasons["docs/empty.txt"] == "empty file"
    assert reasons["docs/blank.md"] == "empty file"
    assert "binary" in reasons["docs/image.txt"]
    assert "not valid UTF-8" in reasons["docs/latin1.txt"]
    assert reasons["docs/corrupt.pdf"].startswith("corrupt pdf")
    assert reasons["docs/fake.pdf"] == "corrupt pdf: no %PDF- header"
    assert reasons["docs/scripts-only.html"] == "no text left after extraction"
    assert "unsupported file type '.docx'" in reasons["docs/report.docx"]
    assert reasons["docs/dangling.md"].startswith("unreadable")
    assert len(result.skipped) == 9


def test_formats_not_enabled_are_skipped_not_loaded(mixed_directory):
    result = load_sources([SourceSpec(pvc={"claimName": "docs"}, glob="*.pdf")], [str(mixed_directory)], ("txt",))
    assert result.documents == []
    assert skipped_reasons(result)["docs/paper.pdf"] == "format 'pdf' is not enabled in spec.formats"


def test_configmap_mount_keys_load_and_mount_internals_are_ignored(tmp_path):
    mount = tmp_path / "cm"
    data = mount / "..2026_11_25_10_00_00.123"
    data.mkdir(parents=True)
    (data / "faq").write_text("How do I reset the gauge? Hold the button.")
    (data / "intro.md").write_text("# Intro\n\nHello.")
    (mount / "..data").symlink_to(data.name)
    for key in ("faq", "intro.md"):  # how kubelet lays out a ConfigMap volume
        (mount / key).symlink_to(Path("..data") / key)

    result = load_sources([SourceSpec(config_map="handbook")], [str(mount)], ALL_FORMATS)

    assert sorted(doc.path for doc in result.documents) == ["configmap/handbook/faq", "configmap/handbook/intro.md"]
    assert result.skipped == []


def test_inline_documents_load_and_empty_ones_are_skipped():
    source = SourceSpec(inline=[InlineDocument(name="faq.md", text="# FAQ\n\nAnswers."),
                                InlineDocument(name="empty.txt", text="")])
    result = load_sources([source], [None], ALL_FORMATS)
    assert [(doc.path, doc.title) for doc in result.documents] == [("inline/faq.md", "FAQ")]
    assert skipped_reasons(result) == {"inline/empty.txt": "empty file"}


def test_a_missing_source_directory_fails_the_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sources([SourceSpec(pvc={"claimName": "docs"})], [str(tmp_path / "nope")], ALL_FORMATS)


# ---- chunking -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.model_max_length = 10**9
    return tok


def test_token_chunks_have_the_configured_size_and_overlap_and_exact_offsets(tokenizer):
    text = " ".join(f"word{i} flows over the wing at angle {i}." for i in range(120))
    doc = Document(path="docs/long.txt", title="long", text=text, format="txt")

    chunks = chunk_document(doc, tokenizer, "tokens", size=64, overlap=16)

    offsets = token_offsets(tokenizer, text)
    assert len(chunks) == -(-(len(offsets) - 16) // 48)  # as few windows as 64-token windows allow
    lengths = []
    for chunk in chunks:
        assert chunk.text == text[chunk.start:chunk.end]
        assert (chunk.doc_path, chunk.title) == ("docs/long.txt", "long")
        lengths.append(len(token_offsets(tokenizer, chunk.text)))
    assert max(lengths) <= 64 and max(lengths) - min(lengths) <= 1  # balanced: no short tail chunk
    assert [chunk.number for chunk in chunks] == list(range(len(chunks)))
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    starts = [next(i for i, (s, _) in enumerate(offsets) if s == chunk.start) for chunk in chunks]
    ends = [next(i for i, (_, e) in enumerate(offsets) if e == chunk.end) for chunk in chunks]
    assert {end - next_start + 1 for end, next_start in zip(ends, starts[1:])} <= {16, 17}  # shared tokens


def test_markdown_chunks_never_cross_a_heading_and_carry_the_section_path(tokenizer):
    text = ("# Guide\n\nIntro text about wings.\n\n## Install\n\n" + "Bolt the spar. " * 60 +
            "\n\n```\n# not a heading inside code\n```\n\n### Torque\n\nUse 40 Nm.\n\n## Checks\n\nCheck flaps.\n")
    doc = Document(path="docs/guide.md", title="Guide", text=text, format="md")

    chunks = chunk_document(doc, tokenizer, "markdown", size=64, overlap=8)

    sections = {chunk.section for chunk in chunks}
    assert sections == {"Guide", "Guide > Install", "Guide > Install > Torque", "Guide > Checks"}
    for chunk in chunks:
        assert chunk.text == text[chunk.start:chunk.end]
        body = chunk.text.lstrip()
        assert not any(line.startswith("## ") for line in body.splitlines()[1:]), chunk.text
    install = [chunk for chunk in chunks if chunk.section == "Guide > Install"]
    assert len(install) > 1  # the long section was windowed by tokens
    assert any("# not a heading inside code" in chunk.text for chunk in install)


def test_a_heading_with_no_body_joins_the_next_section():
    sections = markdown_sections("# Title\n\n## Part\n\nBody text.\n")
    assert [(s.heading, s.start) for s in sections] == [("Title > Part", 0)]


def test_a_plain_text_title_is_its_short_first_line_set_off_by_a_blank_line():
    assert title_line("Flow past a cylinder\n\nThe wake of ...") == "Flow past a cylinder"
    assert title_line("\n  Flow past a cylinder  \n\nbody") == "Flow past a cylinder"
    assert title_line("one paragraph\nthat runs on\n\nbody") is None  # a paragraph, not a title
    assert title_line("no blank line after it\nbody") is None
    assert title_line("x" * 301 + "\n\nbody") is None
