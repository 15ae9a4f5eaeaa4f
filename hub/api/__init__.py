"""REST API of the hub (FastAPI; OpenAPI document at ``/docs``)."""

from hub.api.app import ApiContext, create_app

__all__ = ["ApiContext", "create_app"]
