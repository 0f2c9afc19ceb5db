"""Webhooks: which URLs a job may call back (no server-side request forgery), and one signed delivery.

Deliveries follow the Standard Webhooks spec (webhook-id, webhook-timestamp, webhook-signature: HMAC-SHA256
of "id.timestamp.body" with WEBHOOK_SECRET), so receivers verify them with any Standard Webhooks library.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

log = logging.getLogger(__name__)

ATTEMPTS = 5
BACKOFF = 4  # each wait is 4x the one before: with a first retry after 7.5 s, 5 tries span about 10 minutes
TIMEOUT = httpx.Timeout(5.0, connect=2.0)
MAX_URL_LENGTH = 2048


def refusal(url: str, allowed_hosts: list[str]) -> str | None:
    """Why a job may not call this URL back, or None. Only hosts listed in WEBHOOK_ALLOWED_HOSTS (a name,
    or name:port) are called, so a client cannot make the service reach into its own network."""
    if not allowed_hosts:
        return "webhooks are disabled on this service (WEBHOOK_ALLOWED_HOSTS is empty)"
    if len(url) > MAX_URL_LENGTH:
        return f"the webhook URL is longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "the webhook is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "the webhook must be an http:// or https:// URL"
    if parts.username or parts.password:
        return "the webhook URL must not carry credentials"
    host = parts.hostname.lower()
    if host not in allowed_hosts and f"{host}:{port}" not in allowed_hosts:
        return f"the webhook host {host!r} is not allowed here (WEBHOOK_ALLOWED_HOSTS)"
    return None


def retry_at(attempts: int, first_retry_s: float, now: float) -> float | None:
    """When to try again after `attempts` failed tries, or None: the last try has been made."""
    if attempts >= ATTEMPTS:
        return None
    return now + first_retry_s * BACKOFF ** (attempts - 1)


async def deliver(client: httpx.AsyncClient, signer: Webhook, url: str, message_id: str, body: str) -> int | None:
    """POST one signed message. The receiver's status, or None when it could not be reached.
    Redirects are not followed: the client was allowed this URL, not wherever it points."""
    now = datetime.now(timezone.utc)
    headers = {
        "content-type": "application/json",
        "user-agent": "resnet18-classifier-webhooks",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer.sign(message_id, now, body),
    }
    try:
        response = await client.post(url, content=body.encode(), headers=headers, timeout=TIMEOUT, follow_redirects=False)
    except httpx.HTTPError as error:
        log.warning("webhook %s to %s could not be delivered: %s", message_id, url, type(error).__name__)
        return None
    return response.status_code
