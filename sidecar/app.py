"""The sidecar process: ``main -> Config -> Sidecar(config).serve()``.

Owns the listeners, the current snapshot (swapped on reload), the event bus with its
subscribers (metrics, access log), and the lifecycle: start, reload, graceful drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.accesslog import AccessLog
from sidecar.admin import AdminServer
from sidecar.audit import AuditLog
from sidecar.config.loader import ConfigError, LoadedConfig, load_file
from sidecar.config.redact import redacted
from sidecar.config.watch import ConfigWatcher
from sidecar.egress.gate import EgressGate
from sidecar.events import ConfigReloaded, EventBus
from sidecar.http.server import ProxyListener
from sidecar.metrics import Metrics
from sidecar.policies.state import PolicyState
from sidecar.proxy import Proxy
from sidecar.runtime import Snapshot, build_snapshot, retired_upstreams
from sidecar.upstream.resolver import Resolver

log = logging.getLogger("sidecar")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Sidecar:
    """One running sidecar: two listeners, a snapshot, and the services around them."""

    def __init__(
        self,
        loaded: LoadedConfig,
        config_path: str | None = None,
        *,
        registry: CollectorRegistry | None = None,
        access_log: bool | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.config_path = config_path
        self.events = EventBus()
        self.resolver = resolver if resolver is not None else Resolver()  # tests inject one
        self.policies = PolicyState(self.events)  # limiters and budgets outlive reloads
        self.snapshot: Snapshot = build_snapshot(
            loaded, None, self.resolver, events=self.events, policies=self.policies
        )
        self.metrics = Metrics(self.events, self._current, registry)
        self.access_log = AccessLog(self.events)
        self.access_log.enabled = (
            loaded.config.access_log.enabled if access_log is None else access_log
        )
        self.audit = AuditLog(self.events, lambda: self.snapshot.config.audit)
        self.egress = EgressGate(self._current, self.events, self.resolver)
        self.proxy = Proxy(self._current, self.events, self.egress)
        self.listener = ProxyListener(self.proxy, lambda: self.snapshot.config.http)
        self.admin = AdminServer(self)
        self.proxy_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.last_error: dict[str, Any] | None = None
        self.draining = False
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: ConfigWatcher | None = None
        self._reload_lock = asyncio.Lock()
        self.events.emit(ConfigReloaded(True, loaded.text_hash, None, {}))

    def _current(self) -> Snapshot:
        return self.snapshot

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.snapshot.config
        self.proxy_address = await self.listener.start(*_split(config.listen.proxy))
        self.admin_address = await self.admin.start(*_split(config.listen.admin))
        self._spawn(self._janitor(), "pool-janitor")
        self.audit.start()
        if self.config_path and config.reload.watch:
            self._watcher = ConfigWatcher(
                self.config_path,
                lambda: self.reload(trigger="file"),
                lambda: self.snapshot.config.reload.poll_interval_s,
                lambda: self.snapshot.config.reload.debounce_s,
            )
            self._spawn(self._watcher.run(), "config-watcher")
        log.info(
            "listening: proxy %s:%d, admin %s:%d",
            *self.proxy_address,
            *self.admin_address,
        )

    async def serve(self, install_signals: bool = True) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`request_stop`), then drain and stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(
                signal.SIGHUP, lambda: self._spawn(self.reload(trigger="SIGHUP"), "reload")
            )
        await self._stopping.wait()
        await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        self.draining = True
        grace = self.snapshot.config.shutdown_grace_s
        log.info("draining for up to %.1fs", grace)
        await self.listener.drain(grace)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for upstream in self.snapshot.upstreams.values():
            await upstream.pool.aclose()
        await self.egress.aclose()
        self.access_log.flush()
        await self.audit.stop()
        await self.admin.stop()

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.proxy_address is None:
            return False, "starting"
        return True, "ok"

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for upstream in self.snapshot.upstreams.values():
                upstream.pool.prune()
            self.egress.prune()

    # reload ------------------------------------------------------------------------------------
    async def reload(self, trigger: str = "admin") -> dict[str, Any]:
        """Load the config file again; apply it only if it is entirely valid."""
        async with self._reload_lock:
            if not self.config_path:
                return {"ok": False, "error": "no --config file to reload (embedded default)"}
            try:
                loaded = load_file(self.config_path)
            except ConfigError as exc:
                self.last_error = {"message": str(exc), "at": time.time(), "trigger": trigger}
                log.error(
                    "config reload (%s) rejected, keeping the running config: %s", trigger, exc
                )
                self.events.emit(ConfigReloaded(False, None, str(exc), {}))
                return {"ok": False, "error": str(exc)}
            result = self.apply(loaded)
            if self._watcher is not None:
                self._watcher.mark_applied()
            log.info("config reloaded (%s): %s", trigger, result["changes"])
            return result

    def apply(self, loaded: LoadedConfig) -> dict[str, Any]:
        """Swap in a new snapshot built from ``loaded``; retire what it no longer uses."""
        old = self.snapshot
        new = build_snapshot(loaded, old, self.resolver, events=self.events, policies=self.policies)
        changes = _diff(old, new)
        restart = [
            f"listen.{key}"
            for key in ("proxy", "admin")
            if getattr(old.config.listen, key) != getattr(new.config.listen, key)
        ]
        self.snapshot = new
        self.access_log.enabled = new.config.access_log.enabled
        self.last_error = None
        for upstream in retired_upstreams(old, new):
            upstream.retired = True
            self._spawn(upstream.pool.aclose(), f"retire-{upstream.name}")
        self.events.emit(ConfigReloaded(True, loaded.text_hash, None, changes))
        result: dict[str, Any] = {"ok": True, "hash": loaded.text_hash, "changes": changes}
        if restart:
            result["restart_required"] = restart
            log.warning("config keys %s changed: they take effect after a restart", restart)
        return result

    def config_report(self) -> dict[str, Any]:
        snapshot = self.snapshot
        return {
            "hash": snapshot.loaded.text_hash,
            "source": snapshot.loaded.source,
            "loaded_at": snapshot.loaded_at,
            "last_error": self.last_error,
            "config": redacted(snapshot.config.model_dump(mode="json")),
        }


def _diff(old: Snapshot, new: Snapshot) -> dict[str, list[str]]:
    changes: dict[str, list[str]] = {}

    def compare(kind: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        modified = sorted(k for k in set(before) & set(after) if before[k] != after[k])
        for label, names in (("added", added), ("removed", removed), ("modified", modified)):
            if names:
                changes[f"{kind}_{label}"] = names

    compare("upstreams", dict(old.config.upstreams), dict(new.config.upstreams))
    compare(
        "routes",
        {r.label: r for r in old.config.routes},
        {r.label: r for r in new.config.routes},
    )
    return changes
