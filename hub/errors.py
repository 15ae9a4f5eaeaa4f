"""The one kind of error hub services raise for a request they refuse."""

from __future__ import annotations


class RequestRefused(Exception):
    """A request a hub service refuses; ``status`` is the HTTP status to answer with, the message
    says why (it goes to the client as the response's ``detail``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
