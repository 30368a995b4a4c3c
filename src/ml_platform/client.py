"""A Python client of the REST API: ``Client(url, token)``; also what ``mlp --server`` uses."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx


class ApiClientError(RuntimeError):
    """The server answered with an error; ``code`` is the API's stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status = status
        self.code = code


@dataclass
class Client:
    """Talks to one server as one user, in one project; refreshes its token when it expires."""

    url: str
    token: str | None = None
    refresh_token: str | None = None
    project: str = "default"
    timeout: float = 30.0
    on_tokens: Any = None  # called with (access, refresh) after a login or a refresh
    #: How long a read waits out a server that is away for a moment -- restarting (it cannot
    #: be reached, though it answered this client before: asked again after 0.5, 1, 2, 4, 5,
    #: 5 … s) or without its database or Redis (503 with Retry-After: asked again when told)
    #: -- before it fails. A server never reached (a wrong address) fails at once.
    unavailable_wait: float = 60.0
    on_wait: Any = None  # called with a line saying why, before each such wait
    _http: httpx.Client = field(init=False, repr=False)
    _reached: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        deadline = time.monotonic() + self.unavailable_wait
        # A read is asked again (it changes nothing); a write is not: it fails, and the caller
        # decides (a 503 means it was not done, but a retry is the caller's call).
        read = method in ("GET", "HEAD")
        unreachable = 0
        while True:
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                why = f"cannot reach {self.url}: {exc}"
                pause = min(0.5 * 2**unreachable, 5.0)
                unreachable += 1
                if not (read and self._reached) or time.monotonic() + pause > deadline:
                    raise ApiClientError(0, "unreachable", why) from None
                if self.on_wait is not None:
                    self.on_wait(f"{why}: asking again in {pause:g} s")
                time.sleep(pause)
                continue
            self._reached = True
            pause = _retry_after(response) if read else None
            if pause is None or time.monotonic() + pause > deadline:
                break
            if self.on_wait is not None:
                code, message = _error_of(response)
                self.on_wait(f"{message} ({code}): asking again in {pause:g} s")
            time.sleep(pause)
        if response.status_code == 401 and retry and self.refresh_token:
            code = _error_of(response)[0]
            if code == "token_expired":
                self.refresh()
                return self._request(method, path, retry=False, **kwargs)
        if response.status_code >= 400:
            code, message = _error_of(response)
            raise ApiClientError(response.status_code, code, message)
        if response.status_code == 204:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    def _store_tokens(self, body: dict[str, Any]) -> None:
        self.token = body["access_token"]
        self.refresh_token = body["refresh_token"]
        if self.on_tokens is not None:
            self.on_tokens(self.token, self.refresh_token)

    def login(self, username: str, password: str) -> None:
        body = self._request(
            "POST", "/api/v1/auth/token", json={"username": username, "password": password}
        )
        self._store_tokens(body)

    def refresh(self) -> None:
        body = self._request(
            "POST", "/api/v1/auth/refresh", retry=False, json={"refresh_token": self.refresh_token}
        )
        self._store_tokens(body)

    def logout(self) -> None:
        """End this sign-in on the server: the access token and every refresh token of it."""
        self._request("POST", "/api/v1/auth/logout", json={"refresh_token": self.refresh_token})
        self.token = self.refresh_token = None

    def _project(self, path: str) -> str:
        return f"/api/v1/projects/{self.project}{path}"

    def submit(
        self,
        workflow: str,
        params: dict[str, Any] | None = None,
        max_concurrency: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"workflow": workflow, "params": params or {}}
        if max_concurrency is not None:
            body["max_concurrency"] = max_concurrency
        result: dict[str, Any] = self._request("POST", self._project("/runs"), json=body)
        return result

    def run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", self._project(f"/runs/{run_id}"))
        return result

    def runs(
        self,
        state: str | None = None,
        limit: int = 20,
        offset: int = 0,
        *,
        workflow: str | None = None,
        schedule: str | None = None,
    ) -> list[dict[str, Any]]:
        """Runs, newest first; of one state, workflow (module:function) or schedule."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        filters = (("state", state), ("workflow", workflow), ("schedule", schedule))
        params |= {key: value for key, value in filters if value}
        page = self._request("GET", self._project("/runs"), params=params)
        items: list[dict[str, Any]] = page["items"]
        return items

    def progress(self, run_id: str, show: int = 10) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "GET", self._project(f"/runs/{run_id}/progress"), params={"show": show}
        )
        return result

    def tasks(self, run_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", self._project(f"/runs/{run_id}/tasks"))
        return result

    def metrics(
        self,
        run_id: str,
        *,
        task: str | None = None,
        name: str | None = None,
        limit: int = 10_000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """The points the run's tasks logged (of one task or name), ``limit`` from ``offset``:
        while a page comes back full, ask again from ``offset + limit``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        params |= {key: value for key, value in (("task", task), ("name", name)) if value}
        result: list[dict[str, Any]] = self._request(
            "GET", self._project(f"/runs/{run_id}/metrics"), params=params
        )
        return result

    def metric_summaries(self, run_id: str) -> list[dict[str, Any]]:
        """Each task's metrics, one line per name (last value, points, range)."""
        result: list[dict[str, Any]] = self._request(
            "GET", self._project(f"/runs/{run_id}/metrics/summary")
        )
        return result

    def delete_run(self, run_id: str) -> None:
        self._request("DELETE", self._project(f"/runs/{run_id}"))

    def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", self._project(f"/runs/{run_id}/cancel"))
        return result

    def retry(
        self, run_id: str, from_task: str | None = None, latest: bool = False
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"from_task": from_task} if from_task else {}
        if latest:
            body["latest"] = True
        result: dict[str, Any] = self._request(
            "POST", self._project(f"/runs/{run_id}/retry"), json=body
        )
        return result

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request(
            "GET", self._project(f"/runs/{run_id}/artifacts")
        )
        return result

    def download_artifact(self, run_id: str, sha256: str, write: Callable[[bytes], object]) -> None:
        """Stream the artifact's bytes to ``write``, a chunk at a time (a model may not fit in
        memory). An expired access token is renewed once, as for any other request."""
        path = self._project(f"/runs/{run_id}/artifacts/{sha256}")
        for renewed in (False, True):
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            try:
                with self._http.stream("GET", path, headers=headers) as response:
                    if response.status_code < 400:
                        for chunk in response.iter_bytes(1 << 20):
                            write(chunk)
                        return
                    response.read()
            except httpx.TransportError as exc:
                raise ApiClientError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None
            code, message = _error_of(response)
            if not (response.status_code == 401 and code == "token_expired") or renewed:
                raise ApiClientError(response.status_code, code, message)
            if not self.refresh_token:
                raise ApiClientError(response.status_code, code, message)
            self.refresh()

    def pools(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/api/v1/pools")
        return result

    def set_pool(self, name: str, slots: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "PUT", f"/api/v1/pools/{quote(name, safe='')}", json={"slots": slots}
        )
        return result

    def remove_pool(self, name: str) -> None:
        self._request("DELETE", f"/api/v1/pools/{quote(name, safe='')}")

    def schedules(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", self._project("/schedules"))
        return result

    def create_schedule(
        self, name: str, workflow: str, cron: str, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = {"name": name, "workflow": workflow, "cron": cron, "params": params or {}}
        result: dict[str, Any] = self._request("POST", self._project("/schedules"), json=body)
        return result

    def change_schedule(self, name: str, **change: Any) -> dict[str, Any]:
        """``enabled``, ``cron`` and/or ``params``, as the API's PATCH takes them."""
        result: dict[str, Any] = self._request(
            "PATCH", self._project(f"/schedules/{quote(name, safe='')}"), json=change
        )
        return result

    def delete_schedule(self, name: str) -> None:
        self._request("DELETE", self._project(f"/schedules/{quote(name, safe='')}"))

    def logs(
        self, run_id: str, task: str, attempt: int | None = None, offset: int = 0
    ) -> dict[str, Any]:
        params: dict[str, int] = {"offset": offset}
        if attempt:
            params["attempt"] = attempt
        result: dict[str, Any] = self._request(
            "GET", self._project(f"/runs/{run_id}/tasks/{task}/logs"), params=params
        )
        return result


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before asking again, if the server said it is unavailable for now
    (503 with Retry-After in seconds, at most 10); else None."""
    if response.status_code != 503:
        return None
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return min(max(seconds, 0.1), 10.0)


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "http_error", response.text[:200] or response.reason_phrase


class Credentials:
    """Tokens per server in ``$ML_PLATFORM_HOME/credentials.json``, readable by the owner only."""

    def __init__(self, home: Path) -> None:
        self.path = home / "credentials.json"

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data: dict[str, dict[str, str]] = json.loads(self.path.read_text())
            return data
        except FileNotFoundError:
            return {}

    def get(self, server: str) -> dict[str, str] | None:
        return self._load().get(server.rstrip("/"))

    def save(self, server: str, access: str, refresh: str) -> None:
        data = self._load()
        data[server.rstrip("/")] = {"access_token": access, "refresh_token": refresh}
        self._write(data)

    def forget(self, server: str) -> None:
        data = self._load()
        if data.pop(server.rstrip("/"), None) is not None:
            self._write(data)

    def _write(self, data: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, self.path)
