"""The one clock: epoch milliseconds and stored moments in every form a server keeps them."""

from datetime import UTC, datetime, timedelta, timezone

from cairn_contracts import clock

MOMENT = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
MS = 1_767_323_045_678


def test_datetimes_and_epoch_ms_convert_both_ways_naive_read_as_utc() -> None:
    assert clock.to_ms(MOMENT) == MS
    assert clock.to_ms(MOMENT.replace(tzinfo=None)) == MS
    assert clock.to_ms(MOMENT.astimezone(timezone(timedelta(hours=2)))) == MS
    assert clock.from_ms(MS) == MOMENT and clock.from_ms(MS).tzinfo == UTC
    assert clock.iso(MOMENT.replace(tzinfo=None)) == "2026-01-02T03:04:05.678000+00:00"


def test_now_is_aware_utc_and_in_milliseconds() -> None:
    before = clock.now_ms()
    now = clock.utcnow()
    assert now.tzinfo == UTC
    assert before <= clock.to_ms(now) <= clock.now_ms()


def test_stored_moments_parse_in_every_form_and_refuse_the_rest() -> None:
    assert clock.parse_moment("2026-01-02T03:04:05.678Z") == MOMENT
    assert clock.parse_moment("2026-01-02T05:04:05.678+02:00") == MOMENT
    assert clock.parse_moment("soon") is None and clock.parse_moment(12) is None and clock.parse_moment("") is None
    assert clock.stored_ms(MS) == MS and clock.stored_ms(float(MS)) == MS
    assert clock.stored_ms(MOMENT) == MS and clock.stored_ms("2026-01-02T03:04:05.678") == MS
    assert clock.stored_ms(True) is None and clock.stored_ms(None) is None and clock.stored_ms("x") is None
    assert clock.from_ms_field(MS) == MOMENT
    assert clock.from_ms_field(None) is None and clock.from_ms_field(True) is None and clock.from_ms_field("1") is None
