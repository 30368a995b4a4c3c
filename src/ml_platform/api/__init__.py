"""The REST API (FastAPI) under /api/v1, and the health and metrics endpoints."""

from ml_platform.api.app import create_app

__all__ = ["create_app"]
