"""`python -m ragtune.manifests write|verify`: the generated files and their drift check.

Generated from the pydantic models and the RBAC rules: crds/*.yaml and the chart's copy under
charts/ragtune/crds/. `verify` exits non-zero and names every file that differs.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from .api.crdgen import render_all
from .rbac import chart_rules_file

ROOT = Path(__file__).resolve().parents[2]
CRD_DIRS = [ROOT / "crds", ROOT / "charts" / "ragtune" / "crds"]
CHART_RULES = ROOT / "charts" / "ragtune" / "files" / "operator-rules.yaml"


def generated() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for name, text in render_all().items():
        for directory in CRD_DIRS:
            files[directory / name] = text
    files[CHART_RULES] = chart_rules_file()
    return files


def stale_files(files: dict[Path, str]) -> list[Path]:
    """Generated files that differ, are missing, or are left over in a generated directory."""
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    for directory in CRD_DIRS:
        if directory.exists():
            stale += [p for p in sorted(directory.glob("*.yaml")) if p not in files]
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["write", "verify"])
    args = parser.parse_args(argv)
    files = generated()
    if args.command == "write":
        for directory in CRD_DIRS:
            directory.mkdir(parents=True, exist_ok=True)
            for leftover in directory.glob("*.yaml"):
                if leftover not in files:
                    leftover.unlink()
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        print(f"wrote {len(files)} files")
        return 0
    stale = stale_files(files)
    for path in stale:
        current = path.read_text().splitlines() if path.exists() else []
        expected = files.get(path, "").splitlines()
        sys.stdout.writelines(line + "\n" for line in list(difflib.unified_diff(
            current, expected, str(path.relative_to(ROOT)), "generated", lineterm=""))[:40])
    if stale:
        print(f"{len(stale)} generated file(s) out of date: run `make manifests`", file=sys.stderr)
        return 1
    print("generated files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
