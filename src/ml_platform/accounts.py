"""Users, projects, roles and refresh tokens: who may do what, in which project."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Protocol

import redis
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ml_platform.security import (
    AccessClaims,
    AuthError,
    hash_password,
    new_refresh_token,
    password_problem,
    refresh_token_hash,
    verify_password,
    verify_unknown_user,
)
from ml_platform.store.db import Database
from ml_platform.store.models import (
    Membership,
    Project,
    RefreshToken,
    User,
    utcnow,
)


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
    family: str


class LoginBlocked(AuthError):
    """Too many login attempts for this user or address; ``wait`` seconds until the next."""

    def __init__(self, wait: int) -> None:
        super().__init__("too_many_attempts", f"too many failed logins; try again in {wait} s")
        self.wait = wait


class LoginLimiter(Protocol):
    def attempt(self, keys: list[str]) -> int:
        """Count a login attempt for these keys, then say whether it may go on: 0 if so, else
        the seconds until one may. Counting first makes parallel guesses count each."""

    def succeeded(self, keys: list[str]) -> None:
        """A correct password: the user's count starts again, and the address's forgets this
        attempt (a busy address's good logins never lock it out)."""


class MemoryLoginLimiter:
    """Per-process limiter for an embedded server without Redis (one lock for its threads)."""

    def __init__(self, attempts: int, window_seconds: int) -> None:
        self.attempts = attempts
        self.window = window_seconds
        self._attempts: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def attempt(self, keys: list[str]) -> int:
        now = time.monotonic()
        waits = []
        with self._lock:
            for key in keys:
                recent = [t for t in self._attempts.get(key, []) if now - t < self.window]
                recent.append(now)
                self._attempts[key] = recent[-(self.attempts + 1) :]  # bounded under attack
                if len(recent) > self.attempts:
                    waits.append(int(self.window - (now - recent[0])) + 1)
        return max(waits, default=0)

    def succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                if key.startswith("user:"):
                    self._attempts.pop(key, None)
                elif recent := self._attempts.get(key):
                    recent.pop()


class RedisLoginLimiter:
    """Login attempts counted in Redis, so that every API replica shares the limit."""

    def __init__(self, client: redis.Redis, prefix: str, attempts: int, window_seconds: int):
        self.client = client
        self.prefix = prefix
        self.attempts = attempts
        self.window = window_seconds

        self._forget_one = client.register_script(
            "if redis.call('exists', KEYS[1]) == 1 then redis.call('decr', KEYS[1]) end"
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}:login-failures:{key}"

    def attempt(self, keys: list[str]) -> int:
        pipe = self.client.pipeline(transaction=True)  # MULTI/EXEC: one atomic step per login
        for key in keys:
            # The window starts with the first attempt; INCR keeps the TTL. (Not EXPIRE … NX:
            # that needs Redis 7, and a Redis 6.2 answered every wrong password with a 500.)
            pipe.set(self._key(key), 0, ex=self.window, nx=True)
            pipe.incr(self._key(key))
            pipe.ttl(self._key(key))
        replies = pipe.execute()
        waits = [
            max(int(ttl), 1)
            for count, ttl in zip(replies[1::3], replies[2::3], strict=True)
            if int(count) > self.attempts
        ]
        return max(waits, default=0)

    def succeeded(self, keys: list[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for key in keys:
            if key.startswith("user:"):
                pipe.delete(self._key(key))
            else:  # DECR only a live key: on an expired one it would make a -1 with no TTL
                self._forget_one(keys=[self._key(key)], client=pipe)
        pipe.execute()


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
        if username.lower() == "me":
            raise ValueError("'me' is not a username: /users/me names whoever asks")
        problem = password_problem(username, password)
        if problem:
            raise ValueError(problem)
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

    def users(self) -> list[User]:
        with self.db.session() as session:
            return list(session.scalars(select(User).order_by(User.username)))

    def change_user(
        self,
        username: str,
        *,
        disabled: bool | None = None,
        is_admin: bool | None = None,
        password: str | None = None,
        by: Identity | None = None,
    ) -> User:
        """Disable or enable a user, make or unmake a platform admin, set a new password.

        Disabling a user, or setting their password, ends every sign-in they have: their
        refresh tokens are revoked, and with them the access tokens of those sign-ins (an
        enabled-again user signs in afresh). ``by``, the admin asking, may not disable or
        unmake themselves (another admin can): an API that locks out its last admin is one
        only the database can repair.
        """
        if by is not None and by.username == username and (disabled or is_admin is False):
            raise ValueError("you cannot disable yourself or take your own admin role")
        if password is not None:
            problem = password_problem(username, password)
            if problem:
                raise ValueError(problem)
        with self.db.session() as session:
            user = session.scalar(select(User).where(User.username == username).with_for_update())
            if user is None:
                raise LookupError(f"no user {username!r}")
            if disabled is not None:
                user.disabled = disabled
            if is_admin is not None:
                user.is_admin = is_admin
            if password is not None:
                user.password_hash = hash_password(password)
            if disabled or password is not None:
                _end_sign_ins(session, user.id)
            session.flush()
            return user

    def change_own_password(
        self,
        limiter: LoginLimiter,
        claims: AccessClaims,
        identity: Identity,
        passwords: tuple[str, str],
        address: str | None,
    ) -> None:
        """A user sets a new password (``passwords``: the current one, then the new one): the
        current one is checked under the login limits (a stolen access token is no way to
        guess it), and every other sign-in of theirs ends (the one asking goes on)."""
        current, new = passwords
        self.login(limiter, identity.username, current, address)
        problem = password_problem(identity.username, new)
        if problem:
            raise ValueError(problem)
        with self.db.session() as session:
            session.execute(
                update(User)
                .where(User.id == identity.user_id)
                .values(password_hash=hash_password(new))
            )
            _end_sign_ins(session, identity.user_id, keep=claims.family)

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

    def members(self, project_id: int) -> list[tuple[str, Role]]:
        with self.db.session() as session:
            rows = session.execute(
                select(User.username, Membership.role)
                .join(Membership, Membership.user_id == User.id)
                .where(Membership.project_id == project_id)
                .order_by(User.username)
            )
            return [(name, Role.parse(role)) for name, role in rows]

    def remove_member(self, project_id: int, username: str) -> None:
        """Take a user's role in a project away (platform admins keep seeing every project)."""
        with self.db.session() as session:
            removed = session.execute(
                delete(Membership).where(
                    Membership.project_id == project_id,
                    Membership.user_id.in_(select(User.id).where(User.username == username)),
                )
            )
            if not getattr(removed, "rowcount", 0):
                raise LookupError(f"{username!r} is not a member of this project")

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
        if user is None:
            verify_unknown_user(password)  # the same work: no telling users apart by time
            with self.db.session() as session:
                anyone = session.scalar(select(User.id).limit(1))
            if anyone is None:  # a fresh database: say what to do (it tells no user apart)
                raise AuthError(
                    "invalid_credentials",
                    "wrong username or password: this server has no users yet; create one "
                    "with DATABASE_URL=… mlp users create NAME --admin",
                )
            raise AuthError("invalid_credentials", "wrong username or password")
        if not verify_password(user.password_hash, password) or user.disabled:
            raise AuthError("invalid_credentials", "wrong username or password")
        return Identity(user.id, user.username, user.is_admin)

    def login(
        self, limiter: LoginLimiter, username: str, password: str, address: str | None
    ) -> Identity:
        """Check a password under the login limits (counted before the check)."""
        keys = login_keys(username, address)
        wait = limiter.attempt(keys)
        if wait:
            raise LoginBlocked(wait)
        identity = self.authenticate(username, password)
        limiter.succeeded(keys)
        return identity

    def logout(self, claims: AccessClaims, refresh_token: str | None = None) -> None:
        """End a sign-in: its refresh-token family, and with it every access token issued in
        it (``revoked`` says so), plus the sign-in ``refresh_token`` belongs to, if given."""
        with self.db.session() as session:
            families = {claims.family} if claims.family else set()
            if refresh_token:
                families.update(
                    session.scalars(
                        select(RefreshToken.family).where(
                            RefreshToken.token_hash == refresh_token_hash(refresh_token),
                            RefreshToken.user_id == claims.user_id,  # only one's own sign-ins
                        )
                    )
                )
            if families:
                session.execute(
                    update(RefreshToken)
                    .where(RefreshToken.family.in_(families), RefreshToken.revoked_at.is_(None))
                    .values(revoked_at=utcnow())
                )

    def revoked(self, claims: AccessClaims) -> bool:
        """Whether the sign-in an access token belongs to has ended: logged out, or revoked
        because one of its refresh tokens was replayed."""
        if claims.family is None:
            return False  # issued before sign-ins were named: it lives out its few minutes
        with self.db.session() as session:
            found = session.scalar(
                select(RefreshToken.id)
                .where(RefreshToken.family == claims.family, RefreshToken.revoked_at.is_not(None))
                .limit(1)
            )
            return found is not None

    def issue_refresh(self, identity: Identity, family: str | None = None) -> TokenPair:
        """A refresh token of a new sign-in (a new family), or the next one of ``family``."""
        token, digest = new_refresh_token()
        family = family or uuid.uuid4().hex
        with self.db.session() as session:
            session.add(
                RefreshToken(
                    token_hash=digest,
                    family=family,
                    user_id=identity.user_id,
                    expires_at=utcnow() + self.refresh_ttl,
                )
            )
        return TokenPair(token, identity, family)

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
        return self.issue_refresh(identity, family)


def _end_sign_ins(session: Session, user_id: int, keep: str | None = None) -> None:
    """Revoke every refresh token of the user but the sign-in ``keep`` (a family): those
    sign-ins' access tokens stop working too (Accounts.revoked)."""
    ending = update(RefreshToken).where(
        RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None)
    )
    if keep is not None:
        ending = ending.where(RefreshToken.family != keep)
    session.execute(ending.values(revoked_at=utcnow()))


def login_keys(username: str, client_address: str | None) -> list[str]:
    keys = [f"user:{username.lower()}"]
    if client_address:
        keys.append(f"ip:{client_address}")
    return keys
