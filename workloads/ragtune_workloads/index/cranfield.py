"""Reading the Cranfield collection (documents, queries, judgments) for tests and benchmarks."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

FIELD = re.compile(r"^\.([ITABW])(?:\s+(\d+))?\s*$")


@dataclass(frozen=True)
class CranfieldDoc:
    id: int
    title: str
    text: str

    @property
    def file_name(self) -> str:
        return f"{self.id:04d}.txt"

    def as_text(self) -> str:
        return f"{self.title}\n\n{self.text}\n"


def parse_records(raw: str) -> list[dict[str, str]]:
    records: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    key = None
    for line in raw.splitlines():
        match = FIELD.match(line)
        if match and match.group(1) == "I":
            current = {"I": match.group(2)}
            records.append(current)
            key = None
        elif match:
            key = match.group(1)
            current.setdefault(key, "")
        elif current is not None and key:
            current[key] += line.strip() + " "
    return records


def load_documents(root: Path) -> list[CranfieldDoc]:
    return [CranfieldDoc(int(r["I"]), " ".join(r.get("T", "").split()), " ".join(r.get("W", "").split()))
            for r in parse_records((root / "cran.all.1400").read_text(errors="replace"))]


def load_queries(root: Path) -> list[str]:
    """Queries in file order: judgments number them 1..225 by position, not by their `.I` field."""
    return [" ".join(r.get("W", "").split()) for r in parse_records((root / "cran.qry").read_text())]


def load_judgments(root: Path, max_grade: int = 4) -> dict[int, dict[int, int]]:
    """query position (1-based) → {doc id: grade} for grades 1..max_grade (1 is the most relevant)."""
    judged: dict[int, dict[int, int]] = {}
    for line in (root / "cranqrel").read_text().split("\n"):
        parts = line.split()
        if len(parts) >= 3 and 1 <= int(parts[2]) <= max_grade:
            judged.setdefault(int(parts[0]), {})[int(parts[1])] = int(parts[2])
    return judged


def recall_at(ranked: Sequence[int], relevant: Iterable[int], k: int) -> float:
    relevant = set(relevant)
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def ndcg_at(ranked: Sequence[int], grades: dict[int, int], k: int) -> float:
    """Gain 5 - grade, so grade 1 (most relevant) counts most."""
    def gain(doc: int) -> float:
        return float(5 - grades[doc]) if doc in grades else 0.0
    dcg = sum(gain(doc) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((5 - g for g in grades.values()), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def unique_docs(ranked_paths: Iterable[str]) -> list[int]:
    """Doc ids in rank order from chunk paths like `label/0042.txt`, each doc once (first chunk wins)."""
    seen: list[int] = []
    for path in ranked_paths:
        doc = int(Path(path).stem)
        if doc not in seen:
            seen.append(doc)
    return seen


def write_corpus(docs: Iterable[CranfieldDoc], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        (directory / doc.file_name).write_text(doc.as_text())
