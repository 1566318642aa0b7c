"""Watch the config file for content changes, the way kubelet updates a ConfigMap volume.

kubelet swaps a ``..data`` symlink to a new timestamped directory, so the file's own inode (and
any watch on it) never sees the change. We poll the *content* through the path instead: hash it
every ``poll_interval_s``, and report a change only once the same new content was read twice
``debounce_s`` apart, so a file caught half-written is never applied.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("sidecar.config")


def content_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # mid-swap, or removed: try again next tick


class ConfigWatcher:
    """Calls ``on_change`` when the file's content settles on a new value."""

    def __init__(
        self,
        path: str,
        on_change: Callable[[], Awaitable[object]],
        poll_interval_s: Callable[[], float],
        debounce_s: Callable[[], float],
    ) -> None:
        self.path = Path(path)
        self._on_change = on_change
        self._poll_interval_s = poll_interval_s
        self._debounce_s = debounce_s
        self.applied_hash = content_hash(self.path)

    def mark_applied(self) -> None:
        """Record the current content as seen (after a reload triggered some other way)."""
        self.applied_hash = content_hash(self.path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s())
            seen = content_hash(self.path)
            if seen is None or seen == self.applied_hash:
                continue
            await asyncio.sleep(self._debounce_s())
            if content_hash(self.path) != seen:
                continue  # still being written: look again next tick
            self.applied_hash = seen
            try:
                await self._on_change()
            except Exception:
                log.exception("config reload failed")
