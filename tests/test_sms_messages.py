"""Message templates, SMS segment counting and inbound keywords: pure functions, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from booking.business import Business
from booking.domain import Booking, BookingStatus, Customer, Interval
from booking.messages import (
    GSM7,
    MAX_BODY_CHARS,
    UCS2,
    BookingView,
    Keyword,
    MessageKind,
    booking_reference,
    classify_inbound,
    language_of,
    render,
    segments,
)

# Monday 7 December 2026, 14:30 UTC = 09:30 in New York (EST), 06:30 in Los Angeles (PST).
START = datetime(2026, 12, 7, 14, 30, tzinfo=UTC)


def view(**changes: object) -> BookingView:
    fields: dict[str, object] = {
        "reference": "A1B2C3",
        "service_name": "General check-up",
        "start": START,
        "business_name": "Riverside Family Clinic",
        "business_zone": "America/New_York",
        "customer_name": "Ana",
    }
    fields.update(changes)
    return BookingView(**fields)  # type: ignore[arg-type]


def test_english_confirmation_carries_every_token() -> None:
    text = render(MessageKind.CONFIRMATION, "en", view(link="https://clinic.example/b/A1B2C3"))
    assert text == (
        "Hi Ana, your General check-up at Riverside Family Clinic is confirmed for Mon Dec 7, 9:30 AM EST. "
        "Ref A1B2C3. Manage: https://clinic.example/b/A1B2C3"
    )


def test_spanish_confirmation_in_the_customers_zone() -> None:
    text = render(MessageKind.CONFIRMATION, "es-MX", view(customer_zone="America/Los_Angeles"))
    assert text == (
        "Hola Ana: su cita de General check-up en Riverside Family Clinic queda confirmada para el "
        "lunes 7 de diciembre, 06:30 PST. Ref A1B2C3."
    )


def test_a_series_is_confirmed_once_with_its_count() -> None:
    english = render(MessageKind.CONFIRMATION, "en", view(occurrences=6))
    assert "confirmed for Mon Dec 7, 9:30 AM EST (first of 6). Ref A1B2C3." in english
    spanish = render(MessageKind.CONFIRMATION, "es", view(occurrences=6))
    assert "para el lunes 7 de diciembre, 09:30 EST (primera de 6). Ref A1B2C3." in spanish
    assert "first of" not in render(MessageKind.REMINDER, "en", view(occurrences=6))


def test_each_kind_differs_and_names_the_time_in_both_languages() -> None:
    for locale, when in (("en", "Mon Dec 7, 9:30 AM EST"), ("es", "lunes 7 de diciembre, 09:30 EST")):
        texts = {kind: render(kind, locale, view()) for kind in MessageKind}
        assert len(set(texts.values())) == len(MessageKind)
        assert all(when in text and "A1B2C3" in text for text in texts.values())


def test_reschedule_names_the_old_and_new_time() -> None:
    moved = view(previous_start=START - timedelta(days=1), start=START + timedelta(hours=26))
    english = render(MessageKind.RESCHEDULE, "en", moved)
    assert "from Sun Dec 6, 9:30 AM EST to Tue Dec 8, 11:30 AM EST" in english
    spanish = render(MessageKind.RESCHEDULE, "es", moved)
    assert "del domingo 6 de diciembre, 09:30 EST pasa al martes 8 de diciembre, 11:30 EST" in spanish


def test_time_follows_daylight_saving() -> None:
    summer = view(start=datetime(2026, 7, 6, 13, 30, tzinfo=UTC))
    assert "Mon Jul 6, 9:30 AM EDT" in render(MessageKind.REMINDER, "en", summer)


def test_missing_name_unknown_locale_and_footer() -> None:
    text = render(MessageKind.REMINDER, "fr", view(customer_name=None), stop_footer=True)
    assert text.startswith("Hi, reminder:") and text.endswith("Reply STOP to opt out.")
    assert language_of("ES_us") == "es" and language_of(None) == "en"


def test_view_from_booking_and_business(business: Business) -> None:
    customer = Customer(id="c1", phone="+12125550123", name="Ana López", time_zone=None)
    booking = Booking(
        id="0190f3a2b4c5d6e7f8a9b0c1d2e3f4ab",
        resource_id=business.resources[0].id,
        service_id="checkup",
        customer=customer,
        start=START,
        end=START + timedelta(minutes=30),
        block=Interval(START, START + timedelta(minutes=40)),
        status=BookingStatus.CONFIRMED,
        version=1,
        created_at=START,
        updated_at=START,
    )
    resolved = BookingView.of(booking, business)
    assert resolved.reference == "E3F4AB" == booking_reference(booking.id)
    assert resolved.zone_name == business.timezone
    assert "Ana López" in render(MessageKind.CANCELLATION, "en", resolved)


# -- segments -------------------------------------------------------------------------------------


def test_gsm7_single_segment_boundary() -> None:
    assert segments("a" * 160) == segments("a" * 160).__class__(GSM7, 1, 160, 160)
    assert segments("a" * 161).segments == 2
    assert segments("a" * 306).segments == 2 and segments("a" * 307).segments == 3
    assert segments("").segments == 0


def test_gsm7_extension_characters_count_twice_and_are_not_split() -> None:
    assert segments("€" * 80) == segments("€" * 80).__class__(GSM7, 1, 80, 160)
    assert segments("€" * 81).segments == 2
    # 152 plain septets then a 2-septet '{': it does not fit part one's last septet, so it moves on.
    split = segments("a" * 152 + "{" + "a" * 10)
    assert (split.units, split.segments) == (164, 2)
    assert segments("a" * 152 + "{" + "a" * 152).segments == 3  # 306 septets, yet three parts


def test_ucs2_boundary_and_characters_outside_the_bmp() -> None:
    assert segments("á" * 70) == segments("á" * 70).__class__(UCS2, 1, 70, 70)
    assert segments("á" * 71).segments == 2
    assert segments("á" * 134).segments == 2 and segments("á" * 135).segments == 3
    emoji = segments("😀" * 35)
    assert (emoji.encoding, emoji.characters, emoji.units, emoji.segments) == (UCS2, 35, 70, 1)
    assert segments("😀" * 36).segments == 2
    # 134 units would fill two parts of 67, but the pair after unit 66 cannot be split: three parts.
    assert segments("á" * 66 + "😀" + "á" * 66).segments == 3


def test_one_non_gsm_character_switches_the_whole_text() -> None:
    assert segments("a" * 100).segments == 1
    assert segments("a" * 99 + "ó").segments == 2


def test_spanish_templates_stay_gsm7_except_where_a_word_needs_an_accent() -> None:
    monday = render(MessageKind.CONFIRMATION, "es", view())
    assert segments(monday).encoding == GSM7
    saturday = render(MessageKind.CONFIRMATION, "es", view(start=START + timedelta(days=5)))
    assert "sábado" in saturday and segments(saturday).encoding == UCS2


def test_rendered_messages_fit_the_body_limit() -> None:
    long = view(customer_name="N" * 500, link="https://clinic.example/" + "x" * 100)
    for kind in MessageKind:
        text = render(kind, "es", long, stop_footer=True)
        assert len(text) < MAX_BODY_CHARS and "N" * 41 not in text


# -- keywords -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "keyword"),
    [
        ("STOP", Keyword.OPT_OUT),
        ("  stop\n", Keyword.OPT_OUT),
        ("StopAll", Keyword.OPT_OUT),
        ("unsubscribe", Keyword.OPT_OUT),
        ("Cancel", Keyword.OPT_OUT),
        ("end", Keyword.OPT_OUT),
        ("QUIT", Keyword.OPT_OUT),
        ("start", Keyword.OPT_IN),
        ("Yes", Keyword.OPT_IN),
        ("UNSTOP", Keyword.OPT_IN),
        ("help", Keyword.HELP),
        (" Info ", Keyword.HELP),
        ("please stop", None),
        ("STOP!", None),
        ("yes please", None),
        ("", None),
    ],
)
def test_classify_inbound(body: str, keyword: Keyword | None) -> None:
    assert classify_inbound(body) is keyword
