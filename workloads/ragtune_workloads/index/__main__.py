"""`python -m ragtune_workloads.index --config /etc/ragtune/config.json`: one indexing run for a VectorIndex.

Exit 0 with the result reported; on failure exit 1 with a one-line reason on stderr, which the operator turns
into the VectorIndex's Failed condition.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from ragtune.api.workload import IndexConfig
from ragtune_workloads.reporting import Reporter

from .embedding import EmbeddingModelError
from .pipeline import IndexRunError, run_index
from .store import StoreError

EXPECTED_ERRORS = (EmbeddingModelError, StoreError, IndexRunError, FileNotFoundError, ValueError, RuntimeError)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ragtune_workloads.index")
    parser.add_argument("--config", required=True, help="IndexConfig JSON rendered by the operator")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        config = IndexConfig.model_validate(json.loads(Path(args.config).read_text()))
    except (OSError, ValueError, ValidationError) as exc:
        print(f"invalid index config {args.config}: {one_line(exc)}", file=sys.stderr)
        return 2
    reporter = Reporter()
    try:
        result = run_index(config, reporter)
    except EXPECTED_ERRORS as exc:
        print(f"indexing failed: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # anything else still ends as one readable line, with the trace in the log
        logging.getLogger(__name__).exception("indexing failed")
        print(f"indexing failed: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return 1
    reporter.result(result)
    logging.getLogger(__name__).info("done: %s", json.dumps({k: v for k, v in result.items() if k != "skipped"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
