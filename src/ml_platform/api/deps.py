"""Dependencies: the app's services, the current user, and their role in the project."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ml_platform.accounts import Accounts, Identity, LoginLimiter, Role, TokenPair
from ml_platform.dispatch import Dispatch, Dispatcher
from ml_platform.security import AccessClaims, AuthError, TokenSigner
from ml_platform.service import Platform, Submitted

log = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False)


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class SignIn:
    """A verified access token and the user it speaks for."""

    claims: AccessClaims
    identity: Identity


@dataclass
class Services:
    platform: Platform
    accounts: Accounts
    signer: TokenSigner
    limiter: LoginLimiter
    dispatcher: Dispatcher | None

    def signed_in(self, access_token: str) -> SignIn:
        """Who an access token speaks for: signed by us, unexpired, not ended by a sign-out,
        of a user who still exists and is enabled. Raises AuthError otherwise."""
        claims = self.signer.verify(access_token)
        if self.accounts.revoked(claims):
            raise AuthError("token_revoked", "this sign-in has ended; log in again")
        identity = self.accounts.identity(claims.user_id)
        if identity is None:
            raise AuthError("token_invalid", "the user no longer exists or is disabled")
        return SignIn(claims, identity)

    def publish(self, submitted: Submitted) -> str:
        """Hand a new run's first attempts to the workers (the embedded server's scheduler
        finds them in the database); return the run's id.

        The run is stored already. If Redis does not answer, the request still succeeds (an
        error would have the client submit the run again): the scheduler publishes every due
        attempt again once per lease, and these with them."""
        self.publish_queued(submitted.queued, f"run {submitted.run_id[:8]} stored")
        return submitted.run_id

    def publish_queued(self, queued: list[Dispatch], done: str) -> None:
        """Hand attempts just queued (``done`` says by what) to the workers; if Redis does not
        answer, the scheduler publishes them within a lease (see publish)."""
        if self.dispatcher is not None and queued:
            try:
                self.dispatcher.publish(queued)
            except redis.RedisError as exc:
                log.warning(
                    "%s; Redis did not take its tasks (%s): the scheduler publishes them"
                    " within a lease",
                    done,
                    exc,
                )

    def access_token(self, pair: TokenPair) -> str:
        """A new access token of the sign-in that ``pair`` belongs to."""
        return self.signer.issue(pair.user.user_id, pair.family)


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """Add ``router``'s routes to ``app`` as they were built, once per process, when the
    module declaring them was imported. ``app.include_router`` would wrap the router and build
    every route of it again for this app at its first request (≈ 0.1 s of a core, 0.27 s
    under coverage: the test suite builds apps by the hundred) only to add nothing: no
    prefix, tag, dependency or response is added here, and ours declare no low-priority
    routes (which ``router.routes`` would not hold). One thing an include would give and this
    does not: an app's ``dependency_overrides`` do not reach these routes (nothing of ours
    sets any; a test that wants other services gives the app other ``Services``)."""
    app.router.routes.extend(router.routes)


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]


def current_sign_in(
    svc: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> SignIn:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401,
            "not_authenticated",
            "send an access token: Authorization: Bearer …",
            {"WWW-Authenticate": "Bearer"},
        )
    try:
        return svc.signed_in(credentials.credentials)
    except AuthError as exc:
        raise ApiError(401, exc.code, exc.message, {"WWW-Authenticate": "Bearer"}) from None


SignInDep = Annotated[SignIn, Depends(current_sign_in)]


def current_identity(sign_in: SignInDep) -> Identity:
    return sign_in.identity


IdentityDep = Annotated[Identity, Depends(current_identity)]


@dataclass(frozen=True)
class ProjectAccess:
    project_id: int
    name: str
    role: Role
    identity: Identity


def _access(minimum: Role) -> Callable[[str, Services, Identity], ProjectAccess]:
    """A dependency that admits users with at least ``minimum`` role in the path's project."""

    def dependency(project: str, svc: ServicesDep, identity: IdentityDep) -> ProjectAccess:
        found = svc.accounts.role_in(identity, project)
        if found is None:
            # Another project's resources answer 404, never 403: their existence is private.
            raise ApiError(404, "not_found", f"no project {project!r}")
        row, role = found
        if role < minimum:
            raise ApiError(
                403,
                "forbidden",
                f"this needs the {minimum.label} role in {project!r}; you are {role.label}",
            )
        return ProjectAccess(row.id, row.name, role, identity)

    return dependency


Viewer = Annotated[ProjectAccess, Depends(_access(Role.VIEWER))]
Editor = Annotated[ProjectAccess, Depends(_access(Role.EDITOR))]
ProjectAdmin = Annotated[ProjectAccess, Depends(_access(Role.ADMIN))]
