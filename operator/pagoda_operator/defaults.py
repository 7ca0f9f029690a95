"""What an LLMDeployment takes from the operator rather than its spec, pinned into the object.

The engine image defaults to the chart's version and the engine's UID to the chart's setting. Read afresh
on every reconcile, a `helm upgrade` of the operator would change every pod template at once and roll
every model in the cluster together. Instead the values in force when a spec generation is first
reconciled are written into an annotation on the LLMDeployment and reused until the spec changes (a
spec change rolls the pods anyway, and then picks up the operator's current defaults).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pagoda_operator.builders import DEFAULT_ENGINE_IMAGE, RUN_AS_USER
from pagoda_operator.spec import GROUP

ANNOTATION = f"{GROUP}/operator-defaults"


@dataclass(frozen=True)
class OperatorDefaults:
    engine_image: str
    run_as_user: int | None
    generation: int | None = None  # the spec generation they were pinned for
    router_image: str | None = None  # None: the engine image (it holds `pagoda router`)

    @classmethod
    def current(cls, generation: int | None = None) -> OperatorDefaults:
        """The chart's settings now (PAGODA_ENGINE_IMAGE, PAGODA_ROUTER_IMAGE,
        PAGODA_ENGINE_RUN_AS_USER: "" = the platform's)."""
        run_as_user = os.environ.get("PAGODA_ENGINE_RUN_AS_USER", str(RUN_AS_USER)).strip()
        return cls(
            engine_image=os.environ.get("PAGODA_ENGINE_IMAGE") or DEFAULT_ENGINE_IMAGE,
            run_as_user=int(run_as_user) if run_as_user else None,
            generation=generation,
            router_image=os.environ.get("PAGODA_ROUTER_IMAGE") or None,
        )

    @classmethod
    def pinned(cls, body: Mapping[str, Any]) -> OperatorDefaults | None:
        """The pinned values, None when absent or unreadable (a hand edit): then they are pinned anew."""
        raw = ((body.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
        try:
            found = json.loads(raw) if raw else None
            return cls(**found) if isinstance(found, dict) else None
        except (TypeError, ValueError):
            return None

    @property
    def annotation_patch(self) -> dict[str, Any]:
        return {"metadata": {"annotations": {ANNOTATION: json.dumps(asdict(self), sort_keys=True)}}}
