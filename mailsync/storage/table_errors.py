"""Azure Tables failures → project errors, for the table adapters in this package.

Callers catch the few answers that carry meaning for them (exists, not
found, ETag mismatch) themselves; everything that means "Tables is not
answering properly" becomes ``DependencyUnavailable`` (503 + Retry-After at
the HTTP door, a delayed retry in a worker), so no adapter above this line
ever sees an azure exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)

from mailsync.errors import ConfigurationError, DependencyUnavailable
from mailsync.storage.rest.table import RestTable

RETRY_AFTER_S = 5.0


@contextlib.contextmanager
def table_errors(doing: str) -> Iterator[None]:
    """Map azure failures inside the block; ``doing`` says what for ("reading the account")."""
    try:
        yield
    except (ResourceExistsError, ResourceNotFoundError, ResourceModifiedError):
        raise  # meaningful answers: the caller decides
    except ClientAuthenticationError as exc:
        raise ConfigurationError(f"Azure Tables refused our credentials while {doing}") from exc
    except HttpResponseError as exc:
        status = exc.status_code or 0
        if status in (404, 409, 412):
            raise  # not found / exists / ETag mismatch inside a transaction: the caller decides
        raise DependencyUnavailable(f"Azure Tables answered {status or 'an error'} while {doing}",
                                    retry_after_s=RETRY_AFTER_S) from exc
    except AzureError as exc:  # connection refused, timeouts, cut responses
        raise DependencyUnavailable(f"Azure Tables is unreachable while {doing}",
                                    retry_after_s=RETRY_AFTER_S) from exc


def ensure_table(table: RestTable) -> None:
    """Create the table if it does not exist yet (idempotent, safe to race)."""
    with table_errors(f"creating table {table.table_name}"), contextlib.suppress(ResourceExistsError):
        table.create_table()
