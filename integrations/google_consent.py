"""Connecting a Google account: the installed-app OAuth flow with PKCE (RFC 7636, S256).

:func:`authorization_request` makes the consent URL (offline access, so Google issues a refresh token),
:func:`code_from_redirect` reads the code off the redirect, and :func:`exchange_code` trades it at the
client's ``token_uri`` for the tokens :class:`~integrations.google_oauth.GoogleGrants` then stores. The
exchange sends the client secret and the code: give it an ``http`` client behind the egress gate
(:func:`integrations.egress.httpx_client`); a refused host or redirect is a :class:`ConnectError`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from integrations.egress import EgressRefused
from integrations.google_calendar import SCOPES
from integrations.google_oauth import GrantTokens, OAuthClient

CONNECT_SCOPES = (*SCOPES, "openid", "email")  # openid + email: the token answer names the account


class ConnectError(Exception):
    """Connecting an account failed (consent refused, code rejected); the message is for the operator."""


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """The consent URL to open, and what the code exchange must repeat (PKCE verifier, redirect)."""

    url: str
    redirect_uri: str
    state: str
    code_verifier: str = field(repr=False)


def authorization_request(
    client: OAuthClient, redirect_uri: str, *, scopes: Sequence[str] = CONNECT_SCOPES
) -> AuthorizationRequest:
    """The consent URL for ``client``: offline access (a refresh token) and ``prompt=consent`` (Google
    issues a refresh token only on consent, also when the account had connected before)."""
    verifier = secrets.token_urlsafe(64)  # 86 characters of the unreserved set (43..128 allowed)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    state = secrets.token_urlsafe(16)
    query = urlencode(
        {
            "client_id": client.client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "scope": " ".join(scopes),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
            "access_type": "offline",
            "prompt": "consent",
        }
    )
    separator = "&" if "?" in client.auth_uri else "?"
    return AuthorizationRequest(f"{client.auth_uri}{separator}{query}", redirect_uri, state, verifier)


def code_from_redirect(text: str, expected_state: str | None) -> str:
    """The authorization code from what the browser was sent back with: the whole redirect URL, its
    query string, or the bare code. A state that does not match (another attempt's redirect, or a forged
    one) and an error Google sent instead of a code raise :class:`ConnectError`."""
    text = text.strip()
    query = urlsplit(text).query if "://" in text else text.lstrip("?")
    if "=" not in query:
        return text  # a bare code pasted by the operator
    params = {key: values[0] for key, values in parse_qs(query).items()}
    if "error" in params:
        raise ConnectError(f"Google did not grant access: {params['error']} {params.get('error_description', '')}")
    if expected_state is not None and params.get("state") != expected_state:
        raise ConnectError("the redirect belongs to another connect attempt (state does not match)")
    code = params.get("code")
    if not code:
        raise ConnectError("the redirect carries no authorization code")
    return code


async def exchange_code(
    client: OAuthClient, request: AuthorizationRequest, code: str, *, http: httpx.AsyncClient
) -> GrantTokens:
    """Exchange the authorization code at the client's ``token_uri`` (with the PKCE verifier)."""
    try:
        answer = await http.post(
            client.token_uri,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": request.redirect_uri,
                "client_id": client.client_id,
                "client_secret": client.client_secret,
                "code_verifier": request.code_verifier,
            },
        )
    except httpx.HTTPError as exc:
        raise ConnectError(f"cannot reach the token endpoint {client.token_uri}: {exc!r}") from None
    except EgressRefused as exc:
        raise ConnectError(f"the token exchange with {client.token_uri} was refused: {exc}") from exc
    try:
        body = answer.json()
    except ValueError:
        body = {}
    if answer.status_code != 200 or not isinstance(body, dict):
        reason = f"{body.get('error')}: {body.get('error_description')}" if isinstance(body, dict) else ""
        raise ConnectError(f"the token endpoint refused the code ({answer.status_code} {reason})")
    if not body.get("refresh_token"):
        raise ConnectError(
            "Google answered without a refresh token: remove voicebook's access at "
            "https://myaccount.google.com/permissions and connect again"
        )
    expires_in = body.get("expires_in")
    return GrantTokens(
        refresh_token=str(body["refresh_token"]),
        access_token=body.get("access_token"),
        expires_at=datetime.now(UTC) + timedelta(seconds=int(expires_in)) if expires_in else None,
        scopes=tuple(str(body.get("scope") or " ".join(CONNECT_SCOPES)).split()),
        subject=_email_of(body.get("id_token")),
    )


def _email_of(id_token: object) -> str | None:
    """The ``email`` claim of an ID token. Not verified: it came straight from the token endpoint over
    TLS (OpenID Connect Core 3.1.3.7 allows that), and it only labels the grant for ``google status``."""
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        return None
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    email = claims.get("email") if isinstance(claims, dict) else None
    return str(email) if email else None


# -- the grants in the ledger --------------------------------------------------------------------
