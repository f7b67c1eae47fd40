"""The backstop routes of the broker's API: `guard target check | plan | apply`.

Imports FastAPI, the API schemas, `broker.backstop` and the audit records. For the
broker's auditor groups only: the report names the database's objects, and an apply changes
them. An apply is recorded before it runs (requested) and after (applied or failed).
"""

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from guard.broker.api.schemas import BackstopReport, PolicyCatalogCheck, PolicyCatalogReport
from guard.broker.audit.record import BackstopEvent
from guard.broker.backstop import BackstopMonitor
from guard.broker.errors import BadRequest, DependencyUnavailable, NotFound
from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import PolicyError, load_policy
from guard.broker.sessions import SessionManager


def backstop_routes(
    monitor: BackstopMonitor | None,
    sessions: SessionManager,
    caller_type: Any,  # the app's authenticated-principal dependency (annotations are live)
    auditor: Callable[[Principal, str], None],
) -> APIRouter:
    router = APIRouter()

    def _monitor() -> BackstopMonitor:
        if monitor is None:
            raise NotFound("this broker does not manage database backstops")
        return monitor

    @router.get("/v1/targets/{name}/backstop", response_model=BackstopReport)
    async def backstop_report(name: str, caller: caller_type, plan: bool = False) -> BackstopReport:
        auditor(caller, "read a target's database backstop")
        drifts, planned = await asyncio.to_thread(_monitor().report, name, plan=plan)
        return BackstopReport(target=name, drift=[str(d) for d in drifts], statements=planned)

    @router.post("/v1/targets/{name}/backstop/apply", response_model=BackstopReport)
    async def backstop_apply(name: str, caller: caller_type) -> BackstopReport:
        auditor(caller, "change a target's database backstop")
        who = {"actor": caller.label, "actor_issuer": caller.issuer}
        # Recorded before anything changes: no apply without its record (fail closed).
        sessions.audit.append(BackstopEvent(name, "requested", **who))
        try:
            ran, drifts = await asyncio.to_thread(_monitor().apply, name)
        except (NotFound, DependencyUnavailable):
            raise
        except Exception as exc:
            sessions.audit.append(BackstopEvent(name, "failed", detail=type(exc).__name__, **who))
            raise DependencyUnavailable(
                f"applying the database backstop of {name} failed: {exc}",
                hint="nothing was changed (one transaction); fix the cause and apply again",
            ) from exc
        _monitor().applied(name)
        digest = hashlib.sha256("\n;\n".join(ran).encode()).hexdigest()
        left = "; ".join(str(d) for d in drifts)
        sessions.audit.append(
            BackstopEvent(name, "applied", statements=len(ran), digest=digest, detail=left, **who)
        )
        return BackstopReport(target=name, drift=[str(d) for d in drifts], statements=ran)

    @router.post("/v1/targets/{name}/policy-check", response_model=PolicyCatalogReport)
    async def policy_check(
        name: str, body: PolicyCatalogCheck, caller: caller_type
    ) -> PolicyCatalogReport:
        auditor(caller, "check a policy against a target's database")
        try:
            candidate = load_policy(body.policy, source="the policy sent")
        except PolicyError as exc:
            problems = "; ".join(f"{p.path}: {p.message}" for p in exc.errors[:5])
            raise BadRequest(f"the policy does not compile: {problems}") from exc
        target = candidate.targets.get(name)
        if target is None:
            raise BadRequest(f"the policy sent has no target {name!r}")
        problems = await asyncio.to_thread(_monitor().catalog_problems, name, target)
        return PolicyCatalogReport(target=name, problems=[str(p) for p in problems])

    return router
