"""The one place that reads the environment: S3 endpoint, region and credentials for every client."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Settings:
    """Connection settings taken from the standard AWS variables.

    Attributes:
        endpoint_url: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (any S3-compatible server).
        region: ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
        allow_http: ``AWS_ALLOW_HTTP``, or implied by an ``http://`` endpoint.
        timeout: ``LAKEHOUSE_S3_TIMEOUT``, seconds one S3 request may take (default 30); with at
            most 3 attempts per request, a stalled endpoint fails in minutes, not hours.
    """

    endpoint_url: str | None
    region: str | None
    allow_http: bool
    timeout: float = 30.0

    def boto_config(self) -> Any:
        """The botocore client configuration: bounded timeouts and retries."""
        from botocore.config import Config

        return Config(
            connect_timeout=min(10.0, self.timeout),
            read_timeout=self.timeout,
            retries={"mode": "standard", "total_max_attempts": 3},
        )

    def delta_storage_options(self) -> dict[str, str]:
        """Options for delta-rs / Polars object_store clients (credentials come from the environment)."""
        options: dict[str, str] = {}
        if self.endpoint_url:
            options["AWS_ENDPOINT_URL"] = self.endpoint_url
        if self.region:
            options["AWS_REGION"] = self.region
        if self.allow_http:
            options["AWS_ALLOW_HTTP"] = "true"
        options["timeout"] = f"{self.timeout:g}s"
        options["connect_timeout"] = f"{min(10.0, self.timeout):g}s"
        return options


def load_settings() -> Settings:
    """Read the settings from the environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    allow_http = os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes") or bool(
        endpoint and endpoint.startswith("http://")
    )
    raw_timeout = os.environ.get("LAKEHOUSE_S3_TIMEOUT", "30")
    try:
        timeout = float(raw_timeout)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        from pipeline.errors import UsageError

        raise UsageError(f"LAKEHOUSE_S3_TIMEOUT must be a number of seconds above 0, not {raw_timeout!r}")
    return Settings(endpoint_url=endpoint, region=region, allow_http=allow_http, timeout=timeout)
