"""The service's one error type: a status, a one-line message and optional headers; the app
turns it (and every other failure) into JSON `{"error": "..."}`."""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
