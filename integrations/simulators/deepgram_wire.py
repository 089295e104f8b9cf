"""The Deepgram simulator's wire contract: strict schemas of every message it sends (``extra="forbid"``,
exact types, cross-field rules such as ``speech_final`` implying ``is_final``) and Deepgram's HTTP error
body. The SDK parses leniently, so these checks are what make a protocol mistake fail a test."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from starlette.responses import JSONResponse, Response

# -- the strict schema of what the server sends ----------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Word(_Strict):
    word: str = Field(min_length=1)
    start: float = Field(ge=0)
    end: float = Field(ge=0)
    confidence: float = Field(ge=0, le=1)
    punctuated_word: str = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> Word:
        if self.end < self.start:
            raise ValueError("a word ends before it starts")
        return self


class Alternative(_Strict):
    transcript: str
    confidence: float = Field(ge=0, le=1)
    words: list[Word]


class Channel(_Strict):
    alternatives: list[Alternative] = Field(min_length=1)


class ModelInfo(_Strict):
    name: str
    version: str
    arch: str


class ResultsMetadata(_Strict):
    request_id: str
    model_info: ModelInfo
    model_uuid: str


class Results(_Strict):
    type: Literal["Results"]
    channel_index: list[int] = Field(min_length=2, max_length=2)
    duration: float = Field(ge=0)
    start: float = Field(ge=0)
    is_final: bool
    speech_final: bool
    from_finalize: bool
    channel: Channel
    metadata: ResultsMetadata

    @model_validator(mode="after")
    def _consistent(self) -> Results:
        if self.speech_final and not self.is_final:
            raise ValueError("speech_final implies is_final")
        if self.from_finalize and not self.is_final:
            raise ValueError("from_finalize implies is_final")
        end = self.start + self.duration + 1e-6
        for word in self.channel.alternatives[0].words:
            if word.start < self.start - 1e-6 or word.end > end:
                raise ValueError(f"word {word.word!r} lies outside the result's window")
        return self


class SpeechStarted(_Strict):
    type: Literal["SpeechStarted"]
    channel: list[int] = Field(min_length=2, max_length=2)
    timestamp: float = Field(ge=0)


class UtteranceEnd(_Strict):
    type: Literal["UtteranceEnd"]
    channel: list[int] = Field(min_length=2, max_length=2)
    last_word_end: float = Field(ge=0)


class Metadata(_Strict):
    type: Literal["Metadata"]
    transaction_key: str
    request_id: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: str
    duration: float = Field(ge=0)
    channels: int = Field(ge=1)


class ConfigureSuccess(_Strict):
    type: Literal["ConfigureSuccess"]
    request_id: str
    keyterms: list[str]


class Error(_Strict):
    type: Literal["Error"]
    variant: str
    description: str


ServerMessage = Annotated[
    Results | SpeechStarted | UtteranceEnd | Metadata | ConfigureSuccess | Error, Field(discriminator="type")
]
_SERVER_MESSAGE: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


def validate_listen_message(message: Mapping[str, Any]) -> None:
    """Raise ``pydantic.ValidationError`` unless ``message`` is a well-formed server message."""
    _SERVER_MESSAGE.validate_python(dict(message))


# -- HTTP errors -----------------------------------------------------------------------------------


def error_response(status: int, err_code: str, err_msg: str, headers: Mapping[str, str] | None = None) -> Response:
    """Deepgram's JSON error body."""
    request_id = str(uuid.uuid4())
    body = {"err_code": err_code, "err_msg": err_msg, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers={"dg-request-id": request_id, **(headers or {})})


def authorised(headers: Mapping[str, str], api_key: str) -> bool:
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "token" and key == api_key


def fault_response(status: int, retry_after_s: int) -> Response:
    if status == 429:
        return error_response(429, "TOO_MANY_REQUESTS", "Too many requests.", {"retry-after": str(retry_after_s)})
    return error_response(
        status, "INTERNAL_SERVER_ERROR", "Simulated server error.", {"retry-after": str(retry_after_s)}
    )


# -- speak -----------------------------------------------------------------------------------------


class SpeakMetadata(_Strict):
    type: Literal["Metadata"]
    request_id: str
    model_name: str
    model_version: str
    model_uuid: str


class Flushed(_Strict):
    type: Literal["Flushed"]
    sequence_id: int = Field(ge=0)


class Cleared(_Strict):
    type: Literal["Cleared"]
    sequence_id: int = Field(ge=0)


class Warning(_Strict):
    type: Literal["Warning"]
    description: str
    code: str


SpeakServerMessage = Annotated[SpeakMetadata | Flushed | Cleared | Warning, Field(discriminator="type")]
_SPEAK_MESSAGE: TypeAdapter[SpeakServerMessage] = TypeAdapter(SpeakServerMessage)


def validate_speak_message(message: Mapping[str, Any]) -> None:
    """Raise ``pydantic.ValidationError`` unless ``message`` is a well-formed speak server message."""
    _SPEAK_MESSAGE.validate_python(dict(message))
