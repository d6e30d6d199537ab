"""The one place that reads the environment: S3 endpoint, region and credentials for every client."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Connection settings taken from the standard AWS variables.

    Attributes:
        endpoint_url: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (any S3-compatible server).
        region: ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
        allow_http: ``AWS_ALLOW_HTTP``, or implied by an ``http://`` endpoint.
    """

    endpoint_url: str | None
    region: str | None
    allow_http: bool

    def delta_storage_options(self) -> dict[str, str]:
        """Options for delta-rs / Polars object_store clients (credentials come from the environment)."""
        options: dict[str, str] = {}
        if self.endpoint_url:
            options["AWS_ENDPOINT_URL"] = self.endpoint_url
        if self.region:
            options["AWS_REGION"] = self.region
        if self.allow_http:
            options["AWS_ALLOW_HTTP"] = "true"
        return options


def load_settings() -> Settings:
    """Read the settings from the environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    allow_http = os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes") or bool(
        endpoint and endpoint.startswith("http://")
    )
    return Settings(endpoint_url=endpoint, region=region, allow_http=allow_http)
