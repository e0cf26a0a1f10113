"""Configuration of the approval flow (``[approvals]`` in the broker's TOML configuration)."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = ["ApprovalSettings"]

_PLACEHOLDERS = frozenset(
    hashlib.sha256(w.encode()).hexdigest() for w in ("changeme", "change-me", "secret", "password", "example")
)


class ApprovalSettings(BaseModel):
    """Polling interval, webhook and console session settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    poll_interval: int = Field(5, ge=1, le=60, description="CIBA `interval`: seconds between polls.")
    webhook_url: str | None = Field(
        None, pattern=r"^https?://[^\s]+$", description="Where new pending requests are POSTed (signed)."
    )
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key of the webhook; 32+ characters.")
    sweep_interval: int = Field(15, ge=1, le=3600, description="Seconds between sweeps expiring overdue requests.")
    console_session_minutes: int = Field(30, ge=1, le=720, description="Console sessions end this long after login.")

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        raw = value.get_secret_value()
        if len(raw) < 32:
            raise ValueError("webhook_secret must be at least 32 characters (generate a random one)")
        if hashlib.sha256(raw.encode()).hexdigest() in _PLACEHOLDERS or len(set(raw)) < 8:
            raise ValueError("webhook_secret looks like a placeholder; generate a random one")
        return value

    @model_validator(mode="after")
    def _pair(self) -> ApprovalSettings:
        if (self.webhook_url is None) != (self.webhook_secret is None):
            raise ValueError("webhook_url and webhook_secret go together")
        return self
