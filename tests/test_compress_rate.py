import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norton import NortonError, parse_compress_rate
from norton.core.compress_rate import (
    MAX_ENTRIES,
    fit_compress_rate,
    format_compress_rate,
)


@pytest.mark.parametrize("text,expected", [
    ("[0.]+[0.1]*2+[0.4]*3", [0.0, 0.1, 0.1, 0.4, 0.4, 0.4]),
    ("[0.6]*6+[0.8]*7", [0.6] * 6 + [0.8] * 7),
    (" [ 0.1 , 0.2 ] * 2 + [.5] ", [0.1, 0.2, 0.1, 0.2, 0.5]),
    ("[0.1,0.2,]", [0.1, 0.2]),
    ("0.1,0.2, 0.3", [0.1, 0.2, 0.3]),
    ("0.25", [0.25]),
    ("[5e-2]*2", [0.05, 0.05]),
    ("[0.]*100", [0.0] * 100),
    ("[0.3]*0+[0.1]", [0.1]),
])
def test_grammar(text, expected):
    assert parse_compress_rate(text) == pytest.approx(expected)


def test_lists_pass_through():
    assert parse_compress_rate([0, 0.5]) == [0.0, 0.5]
    assert parse_compress_rate((0.1,)) == [0.1]
    assert parse_compress_rate(None) == []


@pytest.mark.parametrize("text,match", [
    ("[0.1]*2.5", "repeat count '2.5' is not a whole number"),
    ("[-0.1]", "negative rate"),
    ("[0.1]]", "unexpected ']'"),
    ("[0.1]*3 garbage", "unexpected character 'g'"),
    ("[1.0]", "entry 0 is 1.0; every rate must be in \\[0, 1\\)"),
    ("[0.5, 2]", "entry 1 is 2.0"),
    ("[0.1]*999999999", "more than the limit"),
    ("([0.1]*2)", "unexpected character '\\('"),
    ("__import__('os')", "unexpected character '_'"),
    ("", "it is empty"),
    ("[]", "expected a number"),
    ("[0.1]+", "expected '\\['"),
    ("0.1,,0.2", "expected a number"),
])
def test_malformed(text, match):
    with pytest.raises(NortonError, match=match):
        parse_compress_rate(text)


def test_list_entries_checked():
    with pytest.raises(NortonError, match="must be numbers"):
        parse_compress_rate([0.1, "0.2"])
    with pytest.raises(NortonError, match="must be in"):
        parse_compress_rate([float("nan")])


def test_fit_accepts_trailing_zeros_and_pads_short_lists():
    assert fit_compress_rate("[0.]*100", 13, "vgg_16_bn") == [0.0] * 13
    with pytest.warns(UserWarning, match="has 12 of 13 entries; the last 1 are taken as 0"):
        rates = fit_compress_rate("[0.21]*7+[0.75]*5", 13, "vgg_16_bn")
    assert rates[-1] == 0.0 and rates[:7] == [0.21] * 7
    assert fit_compress_rate(None, 3, "x") == [0.0] * 3


def test_fit_rejects_nonzero_extra_entries():
    with pytest.raises(NortonError, match="has 14 entries but vgg_16_bn takes 13; extra entries must be 0, entry 13 is 0.5"):
        fit_compress_rate("[0.1]*13+[0.5]", 13, "vgg_16_bn")


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.1, 0.18, 0.25, 0.5, 0.75, 0.9]), min_size=1, max_size=60))
def test_format_parse_roundtrip(rates):
    text = format_compress_rate(rates)
    assert parse_compress_rate(text) == rates
    assert parse_compress_rate(",".join(repr(r) for r in rates)) == rates


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.text(alphabet="[]0123456789.,*+- eE_x()'", max_size=30))
def test_parser_never_crashes(text):
    try:
        rates = parse_compress_rate(text)
    except NortonError:
        return
    assert len(rates) <= MAX_ENTRIES and all(0 <= r < 1 for r in rates)
