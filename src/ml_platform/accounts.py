"""Users, projects, roles and refresh tokens: who may do what, in which project."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Protocol

import redis
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from ml_platform.security import (
    AuthError,
    hash_password,
    new_refresh_token,
    refresh_token_hash,
    verify_password,
)
from ml_platform.store.db import Database
from ml_platform.store.models import (
    Membership,
    Project,
    RefreshToken,
    User,
    utcnow,
)

MIN_PASSWORD_LENGTH = 12


class Role(IntEnum):
    """Project roles; a higher role can do everything a lower one can."""

    VIEWER = 1
    EDITOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"role must be viewer, editor or admin, not {name!r}") from None

    @property
    def label(self) -> str:
        return self.name.lower()


class Conflict(ValueError):
    """The resource already exists."""


@dataclass(frozen=True)
class Identity:
    user_id: int
    username: str
    is_admin: bool


@dataclass(frozen=True)
class TokenPair:
    refresh_token: str
    user: Identity


class LoginLimiter(Protocol):
    def blocked_for(self, keys: list[str]) -> int:
        """Seconds until a login for these keys is allowed again (0: allowed now)."""

    def failed(self, keys: list[str]) -> None: ...

    def succeeded(self, keys: list[str]) -> None: ...


class MemoryLoginLimiter:
    """Per-process limiter for an embedded server without Redis."""

    def __init__(self, attempts: int, window_seconds: int) -> None:
        self.attempts = attempts
        self.window = window_seconds
        self._failures: dict[str, list[float]] = {}

    def _recent(self, key: str) -> list[float]:
        now = time.monotonic()
        kept = [t for t in self._failures.get(key, []) if now - t < self.window]
        self._failures[key] = kept
        return kept

    def blocked_for(self, keys: list[str]) -> int:
        waits = [
            int(self.window - (time.monotonic() - recent[0])) + 1
            for key in keys
            if len(recent := self._recent(key)) >= self.attempts
        ]
        return max(waits, default=0)

    def failed(self, keys: list[str]) -> None:
        for key in keys:
            self._recent(key).append(time.monotonic())

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            if key.startswith("user:"):
                self._failures.pop(key, None)


class RedisLoginLimiter:
    """Failed logins counted in Redis, so that every API replica shares the limit."""

    def __init__(self, client: redis.Redis, prefix: str, attempts: int, window_seconds: int):
        self.client = client
        self.prefix = prefix
        self.attempts = attempts
        self.window = window_seconds

    def _key(self, key: str) -> str:
        return f"{self.prefix}:login-failures:{key}"

    def blocked_for(self, keys: list[str]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self._key(key))
            pipe.ttl(self._key(key))
        replies = pipe.execute()
        waits = [
            max(int(ttl), 1)
            for count, ttl in zip(replies[::2], replies[1::2], strict=True)
            if count is not None and int(count) >= self.attempts
        ]
        return max(waits, default=0)

    def failed(self, keys: list[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for key in keys:
            # The window starts with the first failure; INCR keeps the TTL. (Not EXPIRE … NX:
            # that needs Redis 7, and a Redis 6.2 answered every wrong password with a 500.)
            pipe.set(self._key(key), 0, ex=self.window, nx=True)
            pipe.incr(self._key(key))
        pipe.execute()

    def succeeded(self, keys: list[str]) -> None:
        user_keys = [self._key(k) for k in keys if k.startswith("user:")]
        if user_keys:
            self.client.delete(*user_keys)


class Accounts:
    """Use cases about people: users, memberships, logins and token rotation."""

    def __init__(self, db: Database, refresh_ttl: timedelta) -> None:
        self.db = db
        self.refresh_ttl = refresh_ttl

    # -- users and projects ----------------------------------------------------------------

    def create_user(self, username: str, password: str, *, is_admin: bool = False) -> Identity:
        if (
            not username
            or len(username) > 100
            or not username.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            raise ValueError("username must be 1-100 letters, digits, '.', '-' or '_'")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
        try:
            with self.db.session() as session:
                user = User(
                    username=username, password_hash=hash_password(password), is_admin=is_admin
                )
                session.add(user)
                session.flush()
                return Identity(user.id, user.username, user.is_admin)
        except IntegrityError:
            raise Conflict(f"user {username!r} already exists") from None

    def identity(self, user_id: int) -> Identity | None:
        with self.db.session() as session:
            user = session.get(User, user_id)
            if user is None or user.disabled:
                return None
            return Identity(user.id, user.username, user.is_admin)

    def create_project(self, name: str, owner: Identity) -> Project:
        if not name or len(name) > 100:
            raise ValueError("project name must be 1-100 characters")
        try:
            with self.db.session() as session:
                project = Project(name=name)
                session.add(project)
                session.flush()
                session.add(Membership(user_id=owner.user_id, project_id=project.id, role="admin"))
                return project
        except IntegrityError:
            raise Conflict(f"project {name!r} already exists") from None

    def set_member(self, project_id: int, username: str, role: Role) -> None:
        with self.db.session() as session:
            user = session.scalar(select(User).where(User.username == username))
            if user is None:
                raise LookupError(f"no user {username!r}")
            membership = session.scalar(
                select(Membership).where(
                    Membership.user_id == user.id, Membership.project_id == project_id
                )
            )
            if membership is None:
                session.add(Membership(user_id=user.id, project_id=project_id, role=role.label))
            else:
                membership.role = role.label

    def role_in(self, identity: Identity, project_name: str) -> tuple[Project, Role] | None:
        """The project and the user's role in it, or None when the user may not see it."""
        with self.db.session() as session:
            project = session.scalar(select(Project).where(Project.name == project_name))
            if project is None:
                return None
            if identity.is_admin:
                return project, Role.ADMIN
            role = session.scalar(
                select(Membership.role).where(
                    Membership.user_id == identity.user_id, Membership.project_id == project.id
                )
            )
            return None if role is None else (project, Role.parse(role))

    def projects_of(self, identity: Identity) -> list[tuple[Project, Role]]:
        with self.db.session() as session:
            if identity.is_admin:
                return [
                    (p, Role.ADMIN) for p in session.scalars(select(Project).order_by(Project.name))
                ]
            rows = session.execute(
                select(Project, Membership.role)
                .join(Membership, Membership.project_id == Project.id)
                .where(Membership.user_id == identity.user_id)
                .order_by(Project.name)
            )
            return [(project, Role.parse(role)) for project, role in rows]

    # -- logins and refresh tokens ---------------------------------------------------------

    def authenticate(self, username: str, password: str) -> Identity:
        with self.db.session() as session:
            user = session.scalar(select(User).where(User.username == username))
        if user is None or user.disabled or not verify_password(user.password_hash, password):
            raise AuthError("invalid_credentials", "wrong username or password")
        return Identity(user.id, user.username, user.is_admin)

    def issue_refresh(self, identity: Identity, family: str | None = None) -> str:
        token, digest = new_refresh_token()
        with self.db.session() as session:
            session.add(
                RefreshToken(
                    token_hash=digest,
                    family=family or uuid.uuid4().hex,
                    user_id=identity.user_id,
                    expires_at=utcnow() + self.refresh_ttl,
                )
            )
        return token

    def rotate(self, token: str) -> TokenPair:
        """Spend a refresh token for a new one of the same family.

        Presenting a token that was already spent means it was stolen or replayed: the whole
        family is revoked, so that neither party can go on with it.
        """
        now = utcnow()
        with self.db.session() as session:
            row = session.scalar(
                select(RefreshToken)
                .where(RefreshToken.token_hash == refresh_token_hash(token))
                .with_for_update()
            )
            if row is None:
                raise AuthError("token_invalid", "unknown refresh token")
            if row.used_at is not None or row.revoked_at is not None:
                session.execute(
                    update(RefreshToken)
                    .where(RefreshToken.family == row.family, RefreshToken.revoked_at.is_(None))
                    .values(revoked_at=now)
                )
                family, user_id = row.family, row.user_id
                reused = True
            else:
                reused = False
                if row.expires_at < now:
                    raise AuthError("token_expired", "the refresh token has expired; log in again")
                row.used_at = now
                family, user_id = row.family, row.user_id
        if reused:
            raise AuthError(
                "token_reused",
                "this refresh token was already used; every session of it is revoked",
            )
        identity = self.identity(user_id)
        if identity is None:
            raise AuthError("token_invalid", "the user no longer exists or is disabled")
        return TokenPair(self.issue_refresh(identity, family), identity)


def login_keys(username: str, client_address: str | None) -> list[str]:
    keys = [f"user:{username.lower()}"]
    if client_address:
        keys.append(f"ip:{client_address}")
    return keys
