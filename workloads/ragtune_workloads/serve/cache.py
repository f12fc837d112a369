"""Small LRU caches that belong to one index version.

Query embeddings and retrieval results are only valid for the index version they were computed against: the
first lookup that sees a new active version empties the cache, so no request is answered from the old one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

MISSING = object()


class VersionedCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.version: Any = None
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def switch(self, version: Any) -> bool:
        """Makes `version` the one entries belong to; True (and empty) when it changed."""
        with self._lock:
            if version == self.version:
                return False
            self.version = version
            self._entries.clear()
            return True

    def get(self, key: Hashable, version: Any) -> Any:
        with self._lock:
            if version != self.version or key not in self._entries:
                self.misses += 1
                return MISSING
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]

    def put(self, key: Hashable, value: Any, version: Any) -> None:
        """Stores only for the current version: a result computed against a version that was replaced meanwhile
        is dropped rather than served later."""
        if self.max_entries <= 0:
            return
        with self._lock:
            if version != self.version:
                return
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
