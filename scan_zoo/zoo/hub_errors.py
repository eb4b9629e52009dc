"""Network failures of Hub calls as one line: what was attempted, at which endpoint, and what went wrong.

huggingface_hub raises whatever its HTTP stack raises (``httpx2.ConnectError``, timeouts, remote protocol
errors, ``HfHubHTTPError`` for 4xx/5xx answers) and logs a warning before each retry. :func:`hub_call` turns
all of these into a :class:`~scan_zoo.common.errors.UserError` of one line and keeps the retry warnings quiet while
the call runs, so a user sees one message, not a 70-line traceback preceded by "Retrying in 1s".
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from scan_zoo.common.errors import UserError

_MAX_DETAIL = 300


def network_error_types() -> tuple:
    """The exception types of a failed request, from every HTTP stack huggingface_hub may use."""
    types: list = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            types.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    try:
        # optional: huggingface_hub may run without requests (httpx)
        import requests

        types.append(requests.RequestException)
    except ImportError:
        pass
    try:
        # optional: older huggingface_hub releases lack .errors
        from huggingface_hub.errors import HfHubHTTPError

        types.append(HfHubHTTPError)
    except ImportError:
        pass
    return tuple(types)


def describe(error: BaseException, token: str | None = None) -> str:
    """``<type>[ HTTP <status>]: <first line of the message>``, token scrubbed, shortened, on one line."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if token:
        text = text.replace(token, "***")
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > _MAX_DETAIL:
        text = text[:_MAX_DETAIL] + "..."
    head = type(error).__name__ + (f" HTTP {status}" if isinstance(status, int) else "")
    return f"{head}: {text}" if text else head


@contextlib.contextmanager
def quiet_hub_logging() -> Iterator[None]:
    """huggingface_hub's warnings (one per retry) off while the block runs; errors still show."""
    hf_logger = logging.getLogger("huggingface_hub")
    old = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(old)


#: what huggingface_hub raises when a server's answer is not what the Hub would send (a missing key, an
#: unparsable URL or JSON document)
MALFORMED_REPLY = (KeyError, TypeError, ValueError)


@contextlib.contextmanager
def hub_call(
    what: str, endpoint: str | None, token: str | None = None, after: str = "", replies: bool = False
) -> Iterator[None]:
    """Run Hub requests; a network or HTTP failure becomes ``UserError("<what> at <endpoint> failed: ...")``.

    ``after`` is appended to the message (e.g. what was, or was not, recorded). With ``replies``, the block
    holds only client calls, so an error parsing a reply (:data:`MALFORMED_REPLY`) is the server's too.
    """
    errors = network_error_types()
    where = endpoint or _default_endpoint()
    tail = f"; {after}" if after else ""
    with quiet_hub_logging():
        try:
            yield
        except errors as e:
            raise UserError(f"{what} at {where} failed: {describe(e, token)}{tail}") from None
        except MALFORMED_REPLY as e:
            if not replies:
                raise
            raise UserError(
                f"{what} at {where} failed: the server's reply is malformed ({describe(e, token)}){tail}"
            ) from None


def _default_endpoint() -> str:
    try:
        # optional: this message must not fail when huggingface_hub is broken
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:
        return "the Hub"
