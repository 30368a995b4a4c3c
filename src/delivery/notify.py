"""Notifications: Slack incoming webhook, PagerDuty Events API v2, e-mail over SMTP.

Each event goes to the channels the spec's table routes it to (ROUTES). Each channel is on
when its secret is in the environment (SLACK_WEBHOOK; PAGERDUTY_TOKEN — the PagerDuty
integration's routing key; SMTP_HOST with SMTP_TO, and SMTP_USER / SMTP_PASSWORD when the
server needs a login) and skipped with a printed line otherwise. E-mail always goes through
STARTTLS: a server that does not offer it is refused. A failing notification is reported,
never raised: it must not fail a deploy that succeeded.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import urlsplit

import httpx

PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
#: Who hears of what: the spec's table, plus a failed restore (a deploy failure that left an
#: unverified state live) and a finished manual rollback.
ROUTES: dict[str, tuple[str, ...]] = {
    "build-failed": ("slack", "email"),
    "security-alert": ("pagerduty", "email"),
    "deploy-succeeded": ("slack",),
    "deploy-failed": ("pagerduty", "slack", "email"),
    "restore-failed": ("pagerduty", "slack", "email"),
    "rollback": ("slack",),
}
EVENTS = tuple(ROUTES)
#: Incidents are kept apart by environment and class: a good deploy resolves the last failed
#: deploy's incident, never an open security alert.
CLASSES = {"security-alert": "security", "build-failed": "build"}


@dataclass(frozen=True)
class Event:
    kind: str
    environment: str
    summary: str
    url: str | None = None

    @property
    def failed(self) -> bool:
        return self.kind not in ("deploy-succeeded", "rollback")

    @property
    def dedup_key(self) -> str:
        return f"ml-platform-{self.environment}-{CLASSES.get(self.kind, 'deploy')}"


def _url(env: Mapping[str, str], name: str) -> tuple[str | None, str | None]:
    """(the URL in ``name``, stripped) or (None, why it is not used)."""
    raw = env.get(name, "").strip()
    if not raw:
        return None, f"{name} is not set"
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.netloc or any(c.isspace() for c in raw):
        return None, f"{name} is not an http(s) URL"
    return raw, None


def pipeline_event(env: Mapping[str, str]) -> str | None:
    """The event a finished CI pipeline reports (BUILD_FAILED, DEPLOY_FAILED, DEPLOYED), if any."""
    if env.get("BUILD_FAILED") == "true":
        return "build-failed"
    if env.get("DEPLOY_FAILED") == "true":
        return "deploy-failed"
    if env.get("DEPLOYED") == "true":
        return "deploy-succeeded"
    return None


def slack_payload(event: Event) -> dict[str, object]:
    icon = ":red_circle:" if event.failed else ":large_green_circle:"
    text = f"{icon} {event.kind} on {event.environment}: {event.summary}"
    blocks: list[dict[str, object]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
    ]
    if event.url:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": event.url}]})
    return {"text": text, "blocks": blocks}


def pagerduty_payload(event: Event, routing_key: str) -> dict[str, object]:
    """A trigger for a failure; a resolve of the same class's incident on recovery."""
    if event.failed:
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": event.dedup_key,
            "payload": {
                "summary": f"{event.kind} on {event.environment}: {event.summary}"[:1024],
                "source": f"ml-platform/{event.environment}",
                "severity": "critical" if event.kind == "restore-failed" else "error",
                "component": "ml-platform",
            },
        }
    return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": event.dedup_key}


def send(
    event: Event,
    env: Mapping[str, str] | None = None,
    say: Callable[[str], None] = print,
    post: Callable[..., httpx.Response] = httpx.post,
) -> dict[str, str]:
    """Send to the channels the event is routed to; each channel's result ("sent", "skipped: …",
    "FAILED: …"). Never raises: a notification must not fail a deploy that succeeded."""
    env = os.environ if env is None else env
    routes = ROUTES.get(event.kind, ("slack",))
    results: dict[str, str] = {}
    targets: list[tuple[str, str, dict[str, object]]] = []
    slack, why = _url(env, "SLACK_WEBHOOK")
    if "slack" in routes:
        if slack:
            targets.append(("slack", slack, slack_payload(event)))
        else:
            results["slack"] = f"skipped: {why}"
    token = env.get("PAGERDUTY_TOKEN", "").strip()
    # A recovery resolves the incident its failure opened, where PagerDuty is configured.
    if "pagerduty" in routes or (token and not event.failed):
        pagerduty, why = _url(
            {"PAGERDUTY_EVENTS_URL": PAGERDUTY_URL, **env}, "PAGERDUTY_EVENTS_URL"
        )
        if not token:
            results["pagerduty"] = "skipped: PAGERDUTY_TOKEN is not set"
        elif pagerduty is None:
            results["pagerduty"] = f"skipped: {why}"
        else:
            targets.append(("pagerduty", pagerduty, pagerduty_payload(event, token)))
    if "email" in routes:
        if env.get("SMTP_HOST", "").strip() and env.get("SMTP_TO", "").strip():
            results["email"] = send_email(event, env)
        else:
            results["email"] = "skipped: SMTP_HOST and SMTP_TO are not set"
    for channel, url, payload in targets:
        try:
            response = post(url, json=payload, timeout=10)
            response.raise_for_status()
            results[channel] = "sent"
        except httpx.HTTPError as exc:
            results[channel] = f"FAILED: {type(exc).__name__}: {exc}"[:300]
    for channel, result in sorted(results.items()):
        say(f"notify {channel}: {result}")
    return results


def send_email(event: Event, env: Mapping[str, str]) -> str:
    """One message over SMTP with STARTTLS (verified against the system's CAs or SMTP_CA_FILE)."""
    message = EmailMessage()
    message["Subject"] = f"[ml-platform] {event.kind} on {event.environment}"
    message["From"] = env.get("SMTP_FROM", "ml-platform@localhost")
    message["To"] = env["SMTP_TO"].strip()
    message.set_content(f"{event.summary}\n\n{event.url or ''}".strip() + "\n")
    context = ssl.create_default_context(cafile=env.get("SMTP_CA_FILE") or None)
    try:
        port = int(env.get("SMTP_PORT", "587").strip() or "587")
        with smtplib.SMTP(env["SMTP_HOST"].strip(), port, timeout=10) as smtp:
            smtp.ehlo()
            if not smtp.has_extn("starttls"):
                return "FAILED: the server does not offer STARTTLS; not sending in clear text"
            smtp.starttls(context=context)
            smtp.ehlo()
            if env.get("SMTP_USER"):
                smtp.login(env["SMTP_USER"], env.get("SMTP_PASSWORD", ""))
            smtp.send_message(message)
    except (OSError, ValueError, smtplib.SMTPException) as exc:
        return f"FAILED: {type(exc).__name__}: {exc}"[:300]
    return "sent"
