"""Table definitions of the ledger, the system of record (SQLAlchemy Core).

The same tables run on SQLite (embedded default) and PostgreSQL (production). Migrations in
``booking/ledger/migrations`` create them; these objects are what queries are built from. The database
itself refuses two active bookings of one resource whose blocks overlap: an exclusion constraint on
PostgreSQL, triggers on SQLite (see the first migration).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB

# Names for constraints, so migrations and error handling can refer to them on both databases.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

MAX_BLOCK = timedelta(days=3)
"""The longest a booking's block may last (the database checks it): a day of service plus a day of buffer
on each side. Overlap searches use it as a lower bound on ``block_start`` so they scan days, not history."""

OVERLAP_CONSTRAINT = "bookings_no_overlap"
"""Name of the PostgreSQL exclusion constraint, and the message of the SQLite trigger's RAISE."""


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC instant. ``timestamptz`` on PostgreSQL; on SQLite a fixed-width naive UTC text, which
    sorts and compares correctly as text (the overlap triggers rely on that)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")


def _id(name: str = "id", *constraints: ForeignKey, **kwargs: Any) -> Column[str]:
    return Column(name, String(64), *constraints, **kwargs)


resources = Table(
    "resources",
    metadata,
    _id(primary_key=True),
    Column("name", Text, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("calendar_id", Text),
    Column("active", Boolean, nullable=False, default=True),
    Column("synced_at", UTCDateTime, nullable=False),
)

services = Table(
    "services",
    metadata,
    _id(primary_key=True),
    Column("name", Text, nullable=False),
    Column("duration_minutes", Integer, nullable=False),
    Column("buffer_before_minutes", Integer, nullable=False),
    Column("buffer_after_minutes", Integer, nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("synced_at", UTCDateTime, nullable=False),
)

service_resources = Table(
    "service_resources",
    metadata,
    _id("service_id", ForeignKey("services.id"), primary_key=True),
    _id("resource_id", ForeignKey("resources.id"), primary_key=True),
)

customers = Table(
    "customers",
    metadata,
    _id(primary_key=True),
    # Personal data is ciphertext (booking/ledger/pii.py); the phone is looked up by its blind index.
    Column("phone", Text, nullable=False),
    Column("phone_index", String(64), nullable=False, unique=True),
    Column("name", Text),
    Column("email", Text),
    Column("time_zone", String(64)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

booking_series = Table(
    "booking_series",
    metadata,
    _id(primary_key=True),
    Column("rrule", Text, nullable=False),
    Column("time_zone", String(64), nullable=False),
    Column("first_start_local", String(32), nullable=False),
    Column("idempotency_key", String(255), unique=True),
    Column("request_hash", String(64)),
    Column("created_at", UTCDateTime, nullable=False),
)

bookings = Table(
    "bookings",
    metadata,
    _id(primary_key=True),
    _id("resource_id", ForeignKey("resources.id"), nullable=False),
    _id("service_id", ForeignKey("services.id"), nullable=False),
    _id("customer_id", ForeignKey("customers.id"), nullable=False),
    _id("series_id", ForeignKey("booking_series.id")),
    Column("status", String(16), nullable=False),
    Column("start_at", UTCDateTime, nullable=False),
    Column("end_at", UTCDateTime, nullable=False),
    Column("block_start", UTCDateTime, nullable=False),
    Column("block_end", UTCDateTime, nullable=False),
    Column("source", String(32), nullable=False),
    Column("notes", Text),
    # What the customer said about texts when booking (booking.domain.SmsConsent).
    Column("sms_consent", String(16), nullable=False, server_default="implied"),
    # The business's number the booking was made on (E.164): its texts go from that number.
    Column("line_number", String(16)),
    Column("version", Integer, nullable=False),
    # The request that created a single booking (a series keeps its key on booking_series).
    Column("idempotency_key", String(255), unique=True),
    Column("request_hash", String(64)),
    # Who made the latest change and why: the history triggers copy them into booking_events.
    Column("changed_by", Text, nullable=False),
    Column("change_reason", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("block_start <= start_at AND start_at < end_at AND end_at <= block_end", name="times_ordered"),
    CheckConstraint("status IN ('confirmed', 'cancelled', 'completed', 'no_show')", name="status_known"),
    Index("ix_bookings_resource_block", "resource_id", "block_start"),
    Index("ix_bookings_customer", "customer_id", "start_at"),
    Index("ix_bookings_series", "series_id"),
    Index("ix_bookings_updated_at", "updated_at"),  # what changed since the last CRM push
)

# Written only by database triggers (see the first migration), on every insert and every change of
# status, time or resource, so no code path can change a booking without leaving its history.
booking_events = Table(
    "booking_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    _id("booking_id", ForeignKey("bookings.id"), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("from_status", String(16)),
    Column("to_status", String(16), nullable=False),
    Column("actor", Text, nullable=False),
    Column("details", JSONDocument, nullable=False),
    Index("ix_booking_events_booking", "booking_id", "id"),
    Index("ix_booking_events_actor", "actor"),  # what one call ("call:<sid>") did to bookings
)

calls = Table(
    "calls",
    metadata,
    Column("call_sid", String(64), primary_key=True),
    Column("account_sid", String(64), nullable=False),
    Column("from_number", Text, nullable=False),  # ciphertext, as is to_number
    Column("to_number", Text, nullable=False),
    Column("from_index", String(64), nullable=False),  # the caller's blind index
    Column("direction", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("refused_reason", Text),
    Column("stream_sid", String(64)),
    Column("end_reason", String(64)),
    Column("ended_at", UTCDateTime),
    Column("duration_seconds", Integer),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("transcript_deleted_at", UTCDateTime),  # retention removed the transcript and recording
    Index("ix_calls_from_index", "from_index", "created_at"),
)

# One row per distinct status callback: (call, SequenceNumber or status) recognises a replay.
call_status_events = Table(
    "call_status_events",
    metadata,
    Column("call_sid", String(64), ForeignKey("calls.call_sid"), primary_key=True),
    Column("dedupe_key", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("sequence", Integer),
    Column("duration_seconds", Integer),
    Column("at", UTCDateTime, nullable=False),
)

# What was said, turn by turn; an agent turn holds only what the caller heard.
call_turns = Table(
    "call_turns",
    metadata,
    Column("call_sid", String(64), ForeignKey("calls.call_sid"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("role", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("truncated", Boolean, nullable=False),
    Column("tool", String(64)),
    Column("at", UTCDateTime, nullable=False),
)

EFFECT_STATUSES = ("pending", "running", "done", "dead", "cancelled")

# The transactional outbox: every provider call a booking change causes (calendar event, SMS), written in
# the same transaction as the change, claimed by workers with a lease (see booking/outbox.py). The id
# orders the effects of one booking: a row runs only once every earlier row of its booking has settled.
effects = Table(
    "effects",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    # A booking's effect names its booking; a call's (its report, CRM sync, triggers) names its call;
    # a housekeeping effect (the retention sweep) names neither.
    _id("booking_id", ForeignKey("bookings.id")),
    Column("kind", String(32), nullable=False),
    Column("payload", JSONDocument, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("due_at", UTCDateTime, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", UTCDateTime),
    Column("last_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("done_at", UTCDateTime),
    # booking id + kind + booking version: what providers dedupe on, and what makes a replayed change
    # unable to enqueue its effects twice.
    Column("idempotency_key", String(255), nullable=False, unique=True),
    CheckConstraint("status IN ('pending', 'running', 'done', 'dead', 'cancelled')", name="status_known"),
    Index("ix_effects_status_due", "status", "due_at"),
    Index("ix_effects_booking", "booking_id", "id"),
    Column("call_sid", String(64)),
    Index("ix_effects_call", "call_sid", "id"),
    # The W3C traceparent of the span that enqueued it (a call's tool call): the worker's span for each
    # attempt is its child. Null when that change was not traced.
    Column("traceparent", String(55)),
)

# One row per text we sent (or heard of through a delivery receipt), with its furthest status: receipts
# arrive late, twice or out of order, and a message never moves back (delivered beats sent).
sms_messages = Table(
    "sms_messages",
    metadata,
    Column("message_sid", String(64), primary_key=True),
    # The outbox effect that sent it: from the send's answer, or from the receipt's ?effect= when that
    # answer was lost. Not a foreign key: a receipt may name an effect this ledger has since pruned.
    Column("effect_key", String(255)),
    _id("booking_id"),
    Column("to_number", Text, nullable=False),  # ciphertext
    Column("to_index", String(64), nullable=False),  # its blind index
    Column("status", String(16), nullable=False),
    Column("error_code", Integer),
    Column("segments", Integer),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_sms_messages_effect_key", "effect_key"),
    Index("ix_sms_messages_updated", "updated_at"),
    Index("ix_sms_messages_to_index", "to_index", "created_at"),
)

# Every distinct receipt, once: (message, status) recognises a replay, since Twilio sends no sequence.
sms_status_events = Table(
    "sms_status_events",
    metadata,
    Column("message_sid", String(64), ForeignKey("sms_messages.message_sid"), primary_key=True),
    Column("status", String(16), primary_key=True),
    Column("error_code", Integer),
    Column("received_at", UTCDateTime, nullable=False),
)

# Whether a number may be texted: its current state only (one primary-key read before every send). A
# number that opts back in keeps its row with opted_out false, so the row says who changed it, when, how.
sms_suppressions = Table(
    "sms_suppressions",
    metadata,
    Column("phone_index", String(64), primary_key=True),  # the number's blind index
    Column("phone", Text, nullable=False),  # ciphertext
    Column("opted_out", Boolean, nullable=False),
    Column("keyword", String(32)),
    Column("changed_at", UTCDateTime, nullable=False),
    Column("source", String(32), nullable=False),
)

# A text on its way: written just before the request to Twilio, removed when Twilio refused it. A mark
# with no message recorded for its effect means an earlier attempt's outcome is unknown (its answer was
# lost, its worker died), so the next attempt looks for the text at Twilio before sending it again.
sms_sends = Table(
    "sms_sends",
    metadata,
    Column("effect_key", String(255), primary_key=True),
    Column("to_number", Text, nullable=False),  # ciphertext
    Column("started_at", UTCDateTime, nullable=False),
)

# OAuth grants a provider gave this deployment (Google Calendar through a user's own account), one per
# (provider, account name). The tokens are ciphertext: integrations encrypt them before they reach the
# ledger, so a copy of the database alone never yields a usable token.
oauth_tokens = Table(
    "oauth_tokens",
    metadata,
    Column("provider", String(32), primary_key=True),
    Column("account", String(64), primary_key=True),  # the operator's name for the grant ("default")
    Column("client_id", String(255), nullable=False),  # a refresh token only works with its own client
    Column("subject", String(320)),  # the provider's account (an email) when it said which
    Column("refresh_token", LargeBinary, nullable=False),
    Column("access_token", LargeBinary),
    Column("expires_at", UTCDateTime),  # of the access token
    Column("scopes", Text, nullable=False),  # space-separated, as granted
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),  # the provider refused the refresh token (invalid_grant)
)

# End-of-call reports, one immutable row per version: a regeneration adds a version, nothing is updated.
call_reports = Table(
    "call_reports",
    metadata,
    Column("call_sid", String(64), ForeignKey("calls.call_sid"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("schema_version", Integer, nullable=False),
    Column("body", JSONDocument, nullable=False),
    Column("produced_by", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Who did what to sensitive records (a report generated, edited, exported, a transcript read), append only.
audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", String(32), nullable=False),
    Column("subject_kind", String(32), nullable=False),
    Column("subject_id", String(255), nullable=False),
    Column("details", JSONDocument, nullable=False),
    Index("ix_audit_events_subject", "subject_kind", "subject_id", "id"),
    # The hash chain (booking/ledger/audit.py): the previous entry's hash and this entry's own.
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
)

# The audit chain's newest id and hash, one row: appends lock it, so two never chain onto one entry.
audit_chain_head = Table(
    "audit_chain_head",
    metadata,
    Column("chain", String(32), primary_key=True),
    Column("last_id", BigInteger, nullable=False),
    Column("entry_hash", String(64), nullable=False),
)

# Bearer tokens of the admin API, each with a role (viewer, operator, admin) and an optional tenant. Only
# a SHA-256 of each token is kept: tokens are long random strings, so a fast hash cannot be reversed by
# guessing, and a lookup costs one indexed read.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("tenant", String(64)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
    Column("last_used_at", UTCDateTime),
    CheckConstraint("role IN ('viewer', 'operator', 'admin')", name="role_known"),
)

# The two-way CRM sync (booking/crm_pull.py): how far each pull has read, on the CRM's own clock (the
# latest modification time it has seen), so a skew between our clock and the CRM's never skips an edit.
crm_sync_state = Table(
    "crm_sync_state",
    metadata,
    Column("name", String(64), primary_key=True),  # which pull ("airtable.appointments")
    Column("watermark", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Edits in the CRM the ledger did not take: both sides changed and the ledger's change was later, or the
# edit cannot be applied (an unknown booking, a status the ledger has no transition to). Kept until
# someone resolves them; one row per CRM row, field and CRM modification time, however often it is read.
crm_conflicts = Table(
    "crm_conflicts",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    _id("booking_id"),  # not a foreign key: an id the ledger does not know is itself a conflict
    Column("record_id", String(64), nullable=False),  # the CRM's row
    Column("field", String(32), nullable=False),
    Column("ledger_value", Text),
    Column("airtable_value", Text),
    Column("ledger_at", UTCDateTime),
    Column("airtable_at", UTCDateTime, nullable=False),
    Column("winner", String(16), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime),
    CheckConstraint("winner IN ('ledger', 'neither')", name="winner_known"),
    Index("ix_crm_conflicts_change", "record_id", "field", "airtable_at", unique=True),
    Index("ix_crm_conflicts_resolved_at", "resolved_at", "id"),
)

# Consent decisions (booking/consent.py), one row each, never updated: the history is the proof. The person
# is their number's blind index only (null when the caller withheld it), so the rows carry no plaintext and
# a withdrawal can outlive an erasure.
consents = Table(
    "consents",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("subject_index", String(64)),
    Column("kind", String(16), nullable=False),
    Column("decision", String(16), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("wording_version", String(64), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("call_sid", String(64)),  # not a foreign key: a decision outlives the call's erasure
    _id("booking_id"),
    CheckConstraint("kind IN ('recording', 'transcription', 'sms')", name="kind_known"),
    CheckConstraint("decision IN ('granted', 'declined', 'revoked')", name="decision_known"),
    Index("ix_consents_subject", "subject_index", "kind", "at"),
    Index("ix_consents_call", "call_sid"),
)

# The exact words each consent was asked with, by version: a decision's proof includes what the person
# heard or read. Written once per version, never changed.
consent_wordings = Table(
    "consent_wordings",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("text", Text, nullable=False),
    Column("first_used_at", UTCDateTime, nullable=False),
)

# The business's own phone numbers (booking/ledger/numbers_repository.py): what Twilio sold us, what each
# number serves, its compliance state and what the last `voicebook numbers verify` found. Not personal
# data: the numbers are the business's, stored in plain E.164.
phone_numbers = Table(
    "phone_numbers",
    metadata,
    Column("number", String(16), primary_key=True),  # E.164
    Column("sid", String(34), nullable=False),  # Twilio's PN...
    Column("country", String(2), nullable=False),
    Column("type", String(16), nullable=False),
    Column("voice", Boolean, nullable=False),
    Column("sms", Boolean, nullable=False),
    Column("mms", Boolean, nullable=False),
    Column("messaging_service_sid", String(34)),
    Column("friendly_name", Text),
    Column("resources", JSONDocument, nullable=False),  # resource ids it serves; [] = the whole business
    Column("a2p_status", String(16), nullable=False),
    Column("toll_free_verification", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_verified_at", UTCDateTime),
    Column("last_verification", JSONDocument),  # the mismatches found then; [] = none
    CheckConstraint("type IN ('local', 'mobile', 'toll-free')", name="type_known"),
    CheckConstraint(
        "a2p_status IN ('not_required', 'unregistered', 'pending', 'approved', 'failed')", name="a2p_status_known"
    ),
    CheckConstraint(
        "toll_free_verification IN ('not_required', 'unverified', 'pending', 'approved', 'rejected')",
        name="toll_free_verification_known",
    ),
    Index("ix_phone_numbers_sid", "sid", unique=True),
)
