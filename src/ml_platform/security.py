"""Passwords, tokens and the secret key: the service's security helpers in one place."""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ml_platform.config import Settings

AUDIENCE = "ml-platform-api"
ISSUER = "ml-platform"
ALGORITHM = "HS256"
MIN_SECRET_LENGTH = 32
WEAK_SECRETS = frozenset(
    {"secret", "changeme", "change-me", "password", "test-secret-key-for-ci", "development"}
)
STRICT_ENVIRONMENTS = frozenset({"staging", "production"})

_hasher = PasswordHasher()
#: At most this many password hashes and checks at once in a process. Each takes argon2's
#: 64 MiB and a core for ≈ 0.1 s: a burst of sign-ins (a fleet of CI jobs, a password spray
#: across many users) waits its turn instead of taking the memory of the API's pod (its 40
#: request threads at once: 2.5 GiB, over its limit of 1 GiB; the out-of-memory killer then
#: ends every request it serves).
HASHES_AT_ONCE = 4
_hashing = threading.BoundedSemaphore(HASHES_AT_ONCE)


class ConfigurationError(RuntimeError):
    """The service must not start with this configuration; the message says what to fix."""


class AuthError(Exception):
    """A credential was refused; ``code`` is stable for clients, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def hash_password(password: str) -> str:
    with _hashing:
        return _hasher.hash(password)


@functools.cache
def _dummy_hash() -> str:
    """A hash to check unknown users' passwords against: the same work as for known ones."""
    return hash_password(secrets.token_urlsafe(16))


def verify_unknown_user(password: str) -> None:
    """Spend the time a password check takes, for a user that does not exist."""
    verify_password(_dummy_hash(), password)


#: The weakest password accepted, as zxcvbn scores it (0–4): 3 is "safely unguessable",
#: at least 10⁸ guesses, and it refuses the 30,000 most common passwords, keyboard walks,
#: repeats and dates.
MIN_PASSWORD_SCORE = 3
MIN_PASSWORD_LENGTH = 12


def password_problem(username: str, password: str) -> str | None:
    """Why this password may not be set for this user, or None when it may."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"password must have at least {MIN_PASSWORD_LENGTH} characters"
    if username and username.lower() in password.lower():
        return "password must not contain the username"
    from zxcvbn import zxcvbn  # its word lists cost ≈ 0.1 s to load: only when a password is set

    verdict = zxcvbn(password[:100], user_inputs=[username])
    if verdict["score"] < MIN_PASSWORD_SCORE:
        warning = verdict["feedback"]["warning"] or "it is too easy to guess"
        return f"password is too weak: {warning.rstrip('.')}; try a few unrelated words"
    return None


def verify_password(password_hash: str, password: str) -> bool:
    try:
        with _hashing:
            return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def resolve_secret_key(settings: Settings) -> str:
    """The signing key: required and strong in staging and production.

    In development without ``SECRET_KEY`` a random key is created once under the platform home
    (mode 0600), so tokens survive restarts of a local server.
    """
    key = settings.secret_key
    if settings.environment in STRICT_ENVIRONMENTS:
        if not key:
            raise ConfigurationError(
                f"SECRET_KEY must be set when ENVIRONMENT={settings.environment}"
            )
        if len(key) < MIN_SECRET_LENGTH or key.lower() in WEAK_SECRETS or len(set(key)) < 10:
            raise ConfigurationError(
                f"SECRET_KEY is too weak for ENVIRONMENT={settings.environment}: use at least "
                f"{MIN_SECRET_LENGTH} random characters (e.g. `python -c "
                "'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        return key
    if key:
        return key
    path = Path(settings.home) / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


@dataclass(frozen=True)
class AccessClaims:
    user_id: int
    jti: str
    expires_at: datetime
    #: The refresh-token family (the sign-in) this access token was issued in.
    family: str | None = None


class TokenSigner:
    """Short-lived access JWTs with ``exp``, ``iat``, ``jti``, ``aud`` and ``iss``."""

    def __init__(self, secret: str, ttl: timedelta) -> None:
        self._secret = secret
        self.ttl = ttl

    def issue(self, user_id: int, family: str | None = None, now: datetime | None = None) -> str:
        issued = now or datetime.now(UTC)
        claims: dict[str, Any] = {
            "fam": family,
            "sub": str(user_id),
            "iat": issued,
            "exp": issued + self.ttl,
            "jti": uuid.uuid4().hex,
            "aud": AUDIENCE,
            "iss": ISSUER,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "jti", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the access token has expired; refresh it") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token_invalid", "the access token is not for this service") from None
        except jwt.PyJWTError:
            raise AuthError("token_invalid", "the access token is not valid") from None
        try:
            user_id = int(claims["sub"])
        except ValueError:
            raise AuthError("token_invalid", "the access token is not valid") from None
        expires = datetime.fromtimestamp(claims["exp"], UTC)
        family = claims.get("fam")
        return AccessClaims(
            user_id, claims["jti"], expires, family if isinstance(family, str) else None
        )


def new_refresh_token() -> tuple[str, str]:
    """A random refresh token and the hash under which it is stored."""
    token = secrets.token_urlsafe(32)
    return token, refresh_token_hash(token)


def refresh_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
