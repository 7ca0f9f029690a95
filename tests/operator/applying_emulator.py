"""kmock with server-side apply, as far as the operator's tests need it.

kmock treats every PATCH as a JSON merge patch, so an applied manifest that drops a field would leave
the field in place, as a merge patch does. A real API server applying `application/apply-patch+yaml`
removes the fields the same field manager applied last time and no longer applies (unless another
manager owns them too). This emulator keeps each manager's last applied configuration per object and
turns an apply into the merge patch with those semantics: fields it dropped become nulls. Lists are
atomic here (a real server merges some lists by key, e.g. containers by name); with one manager per
object the outcome is the same. An apply to a missing object creates it, as on a real server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock

APPLY_PATCH = "application/apply-patch+yaml"


def apply_as_merge_patch(previous: Any, applied: Any) -> Any:
    """The merge patch that turns what a manager applied before into what it applies now."""
    if not (isinstance(previous, Mapping) and isinstance(applied, Mapping)):
        return applied
    patch: dict[str, Any] = {key: None for key in previous if key not in applied}
    for key, value in applied.items():
        patch[key] = apply_as_merge_patch(previous.get(key), value)
    return patch


@attrs.define(kw_only=True)
class ApplyingEmulator(kmock.KubernetesEmulator):
    applied: dict[tuple[Any, ...], Any] = attrs.field(factory=dict, init=False)
    apply_requests: list[kmock.Request] = attrs.field(factory=list, init=False)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        content_type = request.headers.get("Content-Type", "")
        if request.method == kmock.method.PATCH and content_type.startswith(APPLY_PATCH):
            translated = self._as_merge_patch(request)
            # kmock's reactions recognise a request by identity in the request log: log the translation.
            self._requests[next(i for i, r in enumerate(self._requests) if r is request)] = translated
            request = translated
        return await super()._handle(request)

    def _as_merge_patch(self, request: kmock.Request) -> kmock.Request:
        manager = request.params.get("fieldManager")
        if not manager:  # a real server answers 400: apply needs a field manager
            raise kmock.KubernetesError("fieldManager is required for apply patch")
        self.apply_requests.append(request)
        object_key = (request.resource, request.namespace, request.name)
        manager_key = (*object_key, manager)
        previous = self.applied.get(manager_key)
        self.applied[manager_key] = request.data
        if object_key not in self.objects or self.objects[object_key].deleted:
            return attrs.evolve(request, method=kmock.method.POST, action=kmock.action.CREATE)
        return attrs.evolve(request, data=apply_as_merge_patch(previous, request.data))
