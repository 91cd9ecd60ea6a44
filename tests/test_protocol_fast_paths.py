"""The quick paths of base64url and canonical JSON decoding refuse exactly what the careful ones
refuse."""

from __future__ import annotations

import base64
import os
import string

import pytest

from protocol import b64, canonical
from protocol.errors import BadFormat

URL_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


def _reference(text: str) -> bytes | None:
    """What a strict decoder reads: the bytes whose unpadded encoding is exactly ``text``."""
    if len(text) % 4 == 1 or any(c not in URL_ALPHABET for c in text):
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return data if base64.urlsafe_b64encode(data).rstrip(b"=").decode() == text else None


@pytest.mark.parametrize("size", range(0, 40))
def test_base64url_reads_each_encoding_and_refuses_every_other_last_character(size: int) -> None:
    data = os.urandom(size)
    text = b64.encode(data)
    assert b64.decode(text) == data
    for last in URL_ALPHABET if text else "":
        variant = text[:-1] + last
        expected = _reference(variant)
        if expected is None:
            with pytest.raises(BadFormat, match="base64url"):
                b64.decode(variant, "jws payload")
        else:
            assert b64.decode(variant) == expected


@pytest.mark.parametrize("text", ["abc=", "ab+c", "a/bc", "a", "abcde", "ab c", "é", "ab\ncd"])
def test_base64url_refuses_what_is_not_unpadded_base64url(text: str) -> None:
    with pytest.raises(BadFormat, match="jws signature: not base64url"):
        b64.decode(text, "jws signature")


TOO_LONG = "1" * 21


@pytest.mark.parametrize("doc", [
    f'{{"a":{TOO_LONG}}}', f'{{"a": {TOO_LONG}}}', f'{{"a":-{TOO_LONG}}}', f'{{"a":[1,{TOO_LONG}]}}',
    f'{{"a":[ {TOO_LONG}]}}', f'{{"a":{{"b":{TOO_LONG}}}}}', f'{{"a":\t{TOO_LONG}}}', f'{{"a":\n{TOO_LONG}}}',
    f'{{"x":"{TOO_LONG}","a":{TOO_LONG}}}',
])
def test_an_integer_of_too_many_digits_is_refused_wherever_it_is(doc: str) -> None:
    with pytest.raises(BadFormat, match="an integer of 21 digits"):
        canonical.loads_object(doc.encode())


@pytest.mark.parametrize("doc", [
    f'{{"a":"{TOO_LONG}"}}', f'{{"a":"x:{TOO_LONG}","b":[1,2]}}', f'{{"a":"[{TOO_LONG}]"}}',
    '{"a":12345678901234567890,"b":-12345678901234567890}',
])
def test_digits_in_strings_and_integers_of_twenty_digits_are_read(doc: str) -> None:
    import json

    assert canonical.loads_object(doc.encode()) == json.loads(doc)


@pytest.mark.parametrize("doc, error", [
    ('{"a":1,"a":2}', "duplicate key 'a'"), ('{"b":{"a":1,"a":1}}', "duplicate key 'a'"),
    ('{"a":1.0}', "floats are not allowed"), ('{"a":1e3}', "floats are not allowed"),
    ('{"a":Infinity}', "Infinity is not valid JSON"), ('[1]', "must be a JSON object"),
    (f'{{"a":1,"a":{TOO_LONG}}}', "an integer of 21 digits|duplicate key"),
])
def test_what_canonical_json_refuses(doc: str, error: str) -> None:
    with pytest.raises(BadFormat, match=error):
        canonical.loads_object(doc.encode())
