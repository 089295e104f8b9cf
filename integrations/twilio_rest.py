"""Control of live calls through Twilio's REST API (twilio's own client): transfer to a person, hang up.

Both update the call with new TwiML. The twilio client is synchronous, so calls run in a worker thread;
they happen once or twice per call, never per audio frame.
"""

from __future__ import annotations

import asyncio

from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from integrations.egress import Allowlist, guard_session
from integrations.metrics import provider_request


class CallControlError(RuntimeError):
    """Twilio refused or could not be reached. ``permanent`` is True when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool, call_sid: str) -> None:
        super().__init__(f"{message} (call_sid={call_sid})")
        self.permanent = permanent
        self.call_sid = call_sid


class TwilioCallControl:
    def __init__(
        self, account_sid: str, auth_token: str, *, api_base_url: str | None = None, egress: Allowlist | None = None
    ) -> None:
        """``egress``: the hosts requests may go to (:mod:`integrations.egress`); None sends anywhere."""
        http_client = TwilioHttpClient()
        if egress is not None and http_client.session is not None:
            guard_session(http_client.session, egress)
        self._client = Client(account_sid, auth_token, http_client=http_client)
        if api_base_url is not None:
            self._client.api.base_url = api_base_url.rstrip("/")

    async def transfer(self, call_sid: str, to_number: str, *, caller_id: str | None) -> None:
        """Connect the caller to a person. The business's number is shown as caller ID, never the
        caller's own."""
        response = VoiceResponse()
        response.dial(to_number, caller_id=caller_id)
        await self._update(call_sid, str(response.to_xml()))

    async def hangup(self, call_sid: str) -> None:
        response = VoiceResponse()
        response.hangup()
        await self._update(call_sid, str(response.to_xml()))

    async def _update(self, call_sid: str, twiml: str) -> None:
        def update() -> None:
            self._client.api.v2010.account.calls(call_sid).update(twiml=twiml)

        try:
            with provider_request("twilio", "calls.update"):
                await asyncio.to_thread(update)
        except TwilioRestException as error:
            permanent = error.status in (400, 401, 403, 404)
            raise CallControlError(
                f"Twilio refused the call update: {error.msg}", permanent=permanent, call_sid=call_sid
            ) from error
        except OSError as error:
            raise CallControlError(
                f"Twilio could not be reached: {error}", permanent=False, call_sid=call_sid
            ) from error
