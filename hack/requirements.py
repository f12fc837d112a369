"""Prints the requirements of ragtune's dependency groups, one per line: `requirements.py PYPROJECT EXTRA[,EXTRA]`.

The project's own dependencies plus those of each named extra, with self-references such as ragtune[index]
expanded. Used by hack/wheelhouse.sh and by the Dockerfiles (dependencies install before the sources are copied,
so a code change rebuilds only the last layer). Standard library only.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: str, extras: str) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    groups, seen, out = project["optional-dependencies"], set(), list(project["dependencies"])

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for req in groups[name]:
            self_ref = re.fullmatch(r"ragtune\[([^\]]+)\]", req.strip())
            if self_ref:
                for sub in self_ref.group(1).split(","):
                    add(sub.strip())
            else:
                out.append(req)

    for name in extras.split(","):
        add(name.strip())
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2])))
