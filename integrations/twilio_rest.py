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


def dial_twiml(to_number: str, *, caller_id: str) -> str:
    """``<Response><Dial callerId="...">to_number</Dial></Response>``. Pure."""
    response = VoiceResponse()
    response.dial(to_number, caller_id=caller_id)
    return str(response.to_xml())


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
        """Connect the caller to a person, showing them ``caller_id`` (chosen by the policy in
        :mod:`voice_server.caller_id`). Refused, permanently, without one or when it is ``to_number``
        itself: a ``<Dial>`` without ``callerId`` passes the customer's own number to the person dialled,
        which is what masking forbids, and a person should never see their own number calling."""
        if not caller_id:
            raise CallControlError(
                "no caller ID for the transfer: Twilio would show the customer's number",
                permanent=True,
                call_sid=call_sid,
            )
        if caller_id == to_number:
            raise CallControlError(
                "the transfer's caller ID is the number being dialled", permanent=True, call_sid=call_sid
            )
        await self._update(call_sid, dial_twiml(to_number, caller_id=caller_id))

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
