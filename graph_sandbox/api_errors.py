"""The mail API's error answers: Graph's error envelope with a status, a code and optional headers."""

from __future__ import annotations

from graph_sandbox.mailbox import MailboxError


class ApiError(MailboxError):
    """An error answer in Graph's envelope, optionally with extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, code, message)
        self.headers = headers or {}


def bad_request(message: str, code: str = "BadRequest") -> ApiError:
    """Graph's generic 400."""
    return ApiError(400, code, message)
