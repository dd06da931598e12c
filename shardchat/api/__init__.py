"""The server API's Python client: ``ApiClient`` (blocking) and ``AsyncApiClient``.

Errors: one :class:`~shardchat.core.errors.ApiError` subclass per code, from
:mod:`shardchat.core.errors` (re-exported here).
"""

from __future__ import annotations

from shardchat.api.client import ApiClient, AsyncApiClient
from shardchat.core.errors import (
    API_ERRORS,
    ApiBadJson,
    ApiBadRequest,
    ApiError,
    ApiMethodNotAllowed,
    ApiNotFound,
    ApiOverloaded,
    ApiRoomFull,
    ApiTooLarge,
    ApiUnauthorized,
    ApiUnavailable,
)

__all__ = [
    "API_ERRORS",
    "ApiBadJson",
    "ApiBadRequest",
    "ApiClient",
    "ApiError",
    "ApiMethodNotAllowed",
    "ApiNotFound",
    "ApiOverloaded",
    "ApiRoomFull",
    "ApiTooLarge",
    "ApiUnauthorized",
    "ApiUnavailable",
    "AsyncApiClient",
]
