"""Backends from the EndpointSlices of the engines' headless Service, watched through the Kubernetes API.

Only endpoints whose `ready` condition holds count (a terminating or unready pod is out at once: the
endpoints controller clears `ready` when the pod is deleted, while its preStop sleep keeps it serving).
Plain HTTP against the API server (list, then watch from the list's resourceVersion; relist on 410 Gone or a
dropped stream): the router needs one resource and `get/list/watch` on it, not a client library.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("pagoda.router.discovery")
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# The router's worst lag behind the API server while it answers: a watch that just broke, this pause, a
# list. An engine pod's preStop sleep must be longer (docs/operator-in-production.md, scale-down).
RELIST_DELAY_S = 1.0
LIST_TIMEOUT_S = 5.0
# The API server ends each watch after this long (client-go picks 5-10 min); a connection that died
# without a word is noticed by then.
WATCH_SECONDS = 300


def slice_backends(endpoint_slice: Mapping[str, Any], port_name: str | None = None) -> list[str]:
    """http://IP:PORT of each ready endpoint of one EndpointSlice (pure)."""
    ports = endpoint_slice.get("ports") or []
    matching = [p for p in ports if isinstance(p, dict) and port_name in (None, p.get("name"))]
    port = matching[0].get("port") if matching else None
    if port is None:
        return []
    urls = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is False:  # the API says: unset means ready
            continue
        for address in endpoint.get("addresses") or []:
            host = f"[{address}]" if ":" in address else address
            urls.append(f"http://{host}:{port}")
    return urls


@dataclass
class KubeAPI:
    server: str
    namespace: str
    token: str | None = None
    ssl_context: ssl.SSLContext | bool = True

    @classmethod
    def from_environment(cls, server: str | None, namespace: str | None) -> KubeAPI:
        """In-cluster settings from the service account; `server` and `namespace` override them."""
        token_file, ca_file = SERVICE_ACCOUNT / "token", SERVICE_ACCOUNT / "ca.crt"
        if server is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
            if not host:
                raise ValueError("--discovery-service needs --kube-api-server outside a cluster")
            server = f"https://{host}:{port or 443}"
        if namespace is None:
            namespace = (SERVICE_ACCOUNT / "namespace").read_text().strip()
        token = token_file.read_text().strip() if token_file.exists() else None
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file.exists() else True
        return cls(server.rstrip("/"), namespace, token, context)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class EndpointSliceWatcher:
    """Calls `on_change(urls)` with the ready backends of `service` after every change."""

    def __init__(
        self,
        api: KubeAPI,
        service: str,
        on_change: Callable[[Iterable[str]], None],
        port_name: str | None = None,
    ) -> None:
        self.api, self.service, self.on_change, self.port_name = api, service, on_change, port_name
        self.slices: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return f"{self.api.server}/apis/discovery.k8s.io/v1/namespaces/{self.api.namespace}/endpointslices"

    @property
    def params(self) -> dict[str, str]:
        return {"labelSelector": f"{SERVICE_NAME_LABEL}={self.service}"}

    def _mine(self, obj: Mapping[str, Any]) -> bool:
        # filter here too: the selector is a request the server may not honour (emulators)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return labels.get(SERVICE_NAME_LABEL) == self.service

    def _publish(self) -> None:
        self.on_change(sorted({url for urls in self.slices.values() for url in urls}))

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                version = await self._list(session)
                await self._watch(session, version)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the API server can fail in many ways; relist
                log.warning("EndpointSlice watch of %s failed (%r); relisting", self.service, error)
            await asyncio.sleep(RELIST_DELAY_S)

    async def _list(self, session: aiohttp.ClientSession) -> str | None:
        timeout = aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)
        async with session.get(
            self.url, params=self.params, headers=self.api.headers, ssl=self.api.ssl_context, timeout=timeout
        ) as r:
            r.raise_for_status()
            listing = await r.json()
        self.slices = {
            item["metadata"]["name"]: slice_backends(item, self.port_name)
            for item in listing.get("items", [])
            if self._mine(item)
        }
        self._publish()
        return (listing.get("metadata") or {}).get("resourceVersion")

    async def _watch(self, session: aiohttp.ClientSession, version: str | None) -> None:
        params = {**self.params, "watch": "true", "allowWatchBookmarks": "true"}
        params["timeoutSeconds"] = str(WATCH_SECONDS)
        if version:
            params["resourceVersion"] = version
        timeout = aiohttp.ClientTimeout(total=WATCH_SECONDS + 30, sock_read=None)
        async with session.get(
            self.url, params=params, headers=self.api.headers, ssl=self.api.ssl_context, timeout=timeout
        ) as response:
            response.raise_for_status()
            async for line in response.content:
                if line.strip():
                    self._apply(json.loads(line))

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # 410 Gone: our version is too old; relist
            raise RuntimeError(f"watch error: {obj.get('message', obj)}")
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not self._mine(obj):
            return
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.slices.pop(name, None)
        else:
            self.slices[name] = slice_backends(obj, self.port_name)
        self._publish()
