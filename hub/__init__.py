"""The central hub: MQTT ingest into a Tortoise ORM database, served by a FastAPI REST API.

The hub never imports ``edge``: both sides share only :mod:`protocol`.
"""

__version__ = "0.1.0"
