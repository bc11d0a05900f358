"""Typed config of the labelling app (``rlhf labeling --config FILE``)."""

from __future__ import annotations

from pydantic import Field

from shared.auth import AuthConfig
from shared.config import StrictModel
from shared.store import StoreConfig


class LabelingConfig(StrictModel):
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8090, ge=0, le=65535, description="HTTP port (0 = a free one)")
    runs_dir: str = Field("runs", description="the run store's directory (its SQLite file holds the labels too)")
    store: StoreConfig = Field(default_factory=StoreConfig, description="the same store as the orchestrator's")
    accounts_file: str = Field(min_length=1, description="YAML list of accounts (services/labeling/accounts.py)")
    session_secret_file: str = Field(
        "",
        description="file holding the key that signs session cookies (at least 32 characters); empty = a random "
        "key per start (loopback only: sessions end with the process)",
    )
    annotators_per_task: int = Field(2, ge=1, description="how many different annotators label each task")
    assignment_timeout_s: float = Field(
        1800.0, gt=0, description="an assignment not labelled within this long goes back to the pool"
    )
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest JSONL upload")
    secure_cookies: bool = Field(
        False,
        description="mark the session cookie Secure: set it behind a proxy that terminates HTTPS (on by itself when "
        "auth.tls serves HTTPS)",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="tls: serve HTTPS (the token settings are unused)")
