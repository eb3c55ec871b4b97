"""Whether a download server can be reached now: one HEAD request, bounded as a whole by a short timeout.

huggingface_hub, given an endpoint it cannot reach and no cached copy, retries its metadata request
with backoff (5 retries, 1 + 2 + 4 + 8 + 8 s of sleep: ~25 s when the connection is refused) and
with a 60 s timeout per attempt (several minutes for a server that accepts connections and never
answers). Asking once first, with a short timeout and no retry, tells a download that will happen
from one that cannot, so a load fails in about a second with what to do, or reads the cached copy.

The timeout bounds the first answer only (connect, and the reply to the HEAD request); the
downloads themselves keep huggingface_hub's timeouts (``HF_HUB_DOWNLOAD_TIMEOUT``, per read), so a
large file on a slow link is not cut short.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import urllib.error
import urllib.request

from mec_hub import __version__

# Seconds to wait for a server's first answer before calling it unreachable; HF_HUB_ETAG_TIMEOUT
# (huggingface_hub's wait for a file's metadata) replaces it when set, for a slow link.
REACH_TIMEOUT_S = 1.5
TIMEOUT_ENV = "HF_HUB_ETAG_TIMEOUT"


def reach_timeout() -> float:
    """``HF_HUB_ETAG_TIMEOUT`` when it is set to a positive number of seconds, else ``REACH_TIMEOUT_S``."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        return REACH_TIMEOUT_S
    return value if value > 0 else REACH_TIMEOUT_S


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer: the server is there, and where it points is the download's business."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _no_answer(timeout: float) -> str:
    return f"no answer within {timeout:g} s; on a slow connection set {TIMEOUT_ENV} to more seconds"


def _why(error: BaseException | str, timeout: float) -> str | None:
    """The reason in words, or ``None`` for an error that is no sign of an unreachable server (TLS)."""
    if isinstance(error, ssl.SSLError):
        return None  # the server answered; certificates are huggingface_hub's to check and report
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"host name not resolved: {error.strerror or error}"
    if isinstance(error, TimeoutError):
        return _no_answer(timeout)
    if isinstance(error, http.client.HTTPException | ConnectionError):
        return "the connection was closed without an answer"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def unreachable(url: str, *, timeout: float | None = None) -> str | None:
    """Why the server of ``url`` cannot be reached now, or ``None`` when it answers at all (any status).

    One ``HEAD`` request through the environment's proxies, no retry, no redirect followed. The whole
    attempt, host name lookup included (which socket timeouts do not bound), ends within ``timeout``
    (default ``reach_timeout()``): a server that never answers is reported as such, not waited for.
    """
    timeout = reach_timeout() if timeout is None else timeout
    outcome: list[str | None] = []

    def attempt() -> None:
        opener = urllib.request.build_opener(_NoRedirect)
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": f"mec-hub/{__version__}"})
        try:
            opener.open(request, timeout=timeout).close()
        except urllib.error.HTTPError as exc:  # a status, even an error: the server answered
            exc.close()
        except urllib.error.URLError as exc:
            outcome.append(_why(exc.reason, timeout))
            return
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(_why(exc, timeout))
            return
        outcome.append(None)

    thread = threading.Thread(target=attempt, name="mec-hub-reach", daemon=True)
    thread.start()
    thread.join(timeout + 0.25)
    return outcome[0] if outcome else _no_answer(timeout)
