"""The one answer to "is this failure worth another try?", used by every task's retry condition.

Transient, by construction (everything else is not, so bad input and bad configuration fail at
once, with their first error):

- the network: connection refused/reset/aborted, timeouts, DNS failures, a dropped HTTP
  connection (``OSError`` with those errnos, ``urllib``/``http.client``/``requests`` transport
  errors); not the time limit of a task or flow itself (Prefect's ``TaskRunTimeoutError``, a
  ``TimeoutError`` too): that limit is the user's bound on the work, not a network failure,
  and the run reports it (a rerun resumes from the checkpoints);
- HTTP 5xx, 408 and 429 (``urllib.error.HTTPError``, MLflow's REST errors);
- S3: botocore's transport errors and ``ClientError`` with a 5xx status or a throttling code;
- a DVC command that failed on its repository lock (another DVC command holds it) or on its
  remote's network (``DvcError.transient``);
- any exception that says so itself with a true ``transient`` attribute (the library's
  ``SourceUnavailable`` of a failed download, for example).

A cause (``__cause__``/``__context__``) counts: an ``MlflowException`` raised while handling a
refused connection is transient.
"""

from __future__ import annotations

import errno
import http.client
import socket
import urllib.error

NETWORK_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN,
})
# Prefect's errors for a task or flow run past its timeout_seconds (TimeoutError subclasses).
OWN_TIME_LIMITS = frozenset({"TaskRunTimeoutError", "FlowRunTimeoutError"})
# MLflow's error codes for "later" (mlflow.protos.databricks_pb2 names).
MLFLOW_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR"})


def _one(exc: BaseException) -> bool:
    flag = getattr(exc, "transient", None)
    if isinstance(flag, bool):
        return flag
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, BaseException) and _one(exc.reason)  # a text reason: a bad URL
    if type(exc).__name__ in OWN_TIME_LIMITS and type(exc).__module__.startswith("prefect."):
        return False
    if isinstance(exc, (socket.timeout, TimeoutError, ConnectionError, socket.gaierror,
                        http.client.RemoteDisconnected, http.client.IncompleteRead)):
        return True
    if isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS:
        return True
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if name.startswith("botocore."):
        from modelpress.data.fetch import boto_error_is_transient, s3_error_is_transient

        return s3_error_is_transient(exc) if type(exc).__name__ == "ClientError" else boto_error_is_transient(exc)
    if name.startswith(("requests.", "urllib3.")):
        return any(k in type(exc).__name__ for k in ("ConnectionError", "Timeout", "ProtocolError", "MaxRetryError"))
    if name.startswith("mlflow.") and type(exc).__name__ in ("MlflowException", "RestException"):
        status = getattr(exc, "get_http_status_code", lambda: 0)()
        return getattr(exc, "error_code", "") in MLFLOW_TRANSIENT_CODES and status >= 500
    return False


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a transient failure."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _one(exc):
            return True
        if getattr(exc, "transient", None) is False:
            return False  # it knows it is permanent, whatever it was raised from
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classify whatever the task raised
        return is_transient(exc)
    return False
