"""Notifications: Slack incoming webhook, PagerDuty Events API v2, e-mail over SMTP.

Each channel is on when its secret is in the environment (SLACK_WEBHOOK; PAGERDUTY_TOKEN — the
PagerDuty integration's routing key; SMTP_HOST with SMTP_TO, and SMTP_USER / SMTP_PASSWORD
when the server needs a login) and skipped with a printed line otherwise. E-mail always goes
through STARTTLS: a server that does not offer it is refused. A failing notification is
reported, never raised: it must not fail a deploy that succeeded.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage

import httpx

PAGERDUTY_URL = os.environ.get("PAGERDUTY_EVENTS_URL", "https://events.pagerduty.com/v2/enqueue")
EVENTS = ("deploy-succeeded", "deploy-failed", "rollback", "build-failed", "security-alert")


@dataclass(frozen=True)
class Event:
    kind: str
    environment: str
    summary: str
    url: str | None = None

    @property
    def failed(self) -> bool:
        return self.kind in ("deploy-failed", "rollback", "build-failed", "security-alert")


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
    """A trigger for failures (deduplicated per environment), a resolve on recovery."""
    dedup = f"ml-platform-deploy-{event.environment}"
    if event.failed:
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": dedup,
            "payload": {
                "summary": f"{event.kind} on {event.environment}: {event.summary}"[:1024],
                "source": f"ml-platform/{event.environment}",
                "severity": "critical" if event.kind == "security-alert" else "error",
                "component": "ml-platform",
            },
        }
    return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup}


def send(
    event: Event,
    env: Mapping[str, str] | None = None,
    say: Callable[[str], None] = print,
    post: Callable[..., httpx.Response] = httpx.post,
) -> dict[str, str]:
    """Send to every configured channel; return each channel's result ("sent", "skipped", …)."""
    env = os.environ if env is None else env
    results: dict[str, str] = {}
    targets = []
    if env.get("SLACK_WEBHOOK"):
        targets.append(("slack", env["SLACK_WEBHOOK"], slack_payload(event)))
    else:
        results["slack"] = "skipped: SLACK_WEBHOOK is not set"
    if env.get("PAGERDUTY_TOKEN"):
        url = env.get("PAGERDUTY_EVENTS_URL", PAGERDUTY_URL)
        targets.append(("pagerduty", url, pagerduty_payload(event, env["PAGERDUTY_TOKEN"])))
    else:
        results["pagerduty"] = "skipped: PAGERDUTY_TOKEN is not set"
    if env.get("SMTP_HOST") and env.get("SMTP_TO"):
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
    for channel, result in results.items():
        say(f"notify {channel}: {result}")
    return results


def send_email(event: Event, env: Mapping[str, str]) -> str:
    """One message over SMTP with STARTTLS (verified against the system's CAs or SMTP_CA_FILE)."""
    message = EmailMessage()
    message["Subject"] = f"[ml-platform] {event.kind} on {event.environment}"
    message["From"] = env.get("SMTP_FROM", "ml-platform@localhost")
    message["To"] = env["SMTP_TO"]
    message.set_content(f"{event.summary}\n\n{event.url or ''}".strip() + "\n")
    context = ssl.create_default_context(cafile=env.get("SMTP_CA_FILE") or None)
    try:
        with smtplib.SMTP(env["SMTP_HOST"], int(env.get("SMTP_PORT", "587")), timeout=10) as smtp:
            smtp.ehlo()
            if not smtp.has_extn("starttls"):
                return "FAILED: the server does not offer STARTTLS; not sending in clear text"
            smtp.starttls(context=context)
            smtp.ehlo()
            if env.get("SMTP_USER"):
                smtp.login(env["SMTP_USER"], env.get("SMTP_PASSWORD", ""))
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        return f"FAILED: {type(exc).__name__}: {exc}"[:300]
    return "sent"
