"""Stream IDs: the one rule for what names a stream, shared by every layer."""

from __future__ import annotations

from .errors import InvalidStreamIdError

__all__ = ["MAX_STREAM_ID_BYTES", "validate_stream_id"]

#: Longest stream ID, in UTF-8 bytes.
MAX_STREAM_ID_BYTES = 256


def validate_stream_id(stream_id: object) -> str:
    """Return ``stream_id`` if it is a valid stream ID, else raise :class:`InvalidStreamIdError`.

    A valid ID is a non-empty ``str`` of at most 256 UTF-8 bytes with no NUL
    character (NUL ends the topic on the wire, which is what makes
    subscriptions match stream IDs exactly).

    >>> validate_stream_id("session-1")
    'session-1'
    """
    if not isinstance(stream_id, str):
        raise InvalidStreamIdError(f"must be a str, not {type(stream_id).__name__}")
    if not stream_id:
        raise InvalidStreamIdError("must not be empty")
    if "\x00" in stream_id:
        raise InvalidStreamIdError("must not contain NUL")
    try:
        size = len(stream_id.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise InvalidStreamIdError("is not valid UTF-8") from exc
    if size > MAX_STREAM_ID_BYTES:
        raise InvalidStreamIdError(f"is {size} UTF-8 bytes, more than {MAX_STREAM_ID_BYTES}")
    return stream_id
