"""The web dashboard, served by the hub itself: pages, templates and static files (``docs/dashboard.md``)."""
