"""`python -m ragtune_workloads.finetune --config FILE`

Exit 0 with the result reported; otherwise a non-zero code and one line on stderr (also written as the
container's termination message) that the operator copies into the FineTuneJob's Failed condition.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from ragtune.api.workload import CONFIG_FILE, CONFIG_MOUNT, FineTuneConfig

from ragtune_workloads.reporting import TERMINATION_LOG

from .errors import ConfigError, FineTuneError

UNEXPECTED_EXIT = 1


def load_config(path: Path) -> FineTuneConfig:
    try:
        return FineTuneConfig.model_validate_json(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise ConfigError(f"config {path}: {where}: {first['msg']}") from None


def fail(reason: str, code: int) -> int:
    line = " ".join(reason.split())  # one line, whatever the exception carried
    sys.stdout.flush()
    print(f"finetune failed: {line}", file=sys.stderr, flush=True)
    try:
        if TERMINATION_LOG.parent.exists():
            TERMINATION_LOG.write_text(f"finetune failed: {line}"[:4000])
    except OSError:
        pass
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ragtune_workloads.finetune",
                                     description="Fine-tune a LoRA adapter as a FineTuneConfig describes.")
    parser.add_argument("--config", type=Path, default=Path(CONFIG_MOUNT) / CONFIG_FILE)
    args = parser.parse_args(argv)
    # Logs go to stdout so that stderr ends with the one-line reason on failure.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s")

    from .run import run  # after logging is set up; it imports the data layer only

    try:
        config = load_config(args.config)
        result = run(config)
    except FineTuneError as exc:
        return fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as exc:  # unexpected: keep the traceback in the log, the reason on the last line
        traceback.print_exc(file=sys.stdout)
        return fail(f"{type(exc).__name__}: {exc}", UNEXPECTED_EXIT)
    print(f"finetune succeeded: adapter {result['uri']} digest {result['digest']} "
          f"promotable={str(result['promotable']).lower()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
