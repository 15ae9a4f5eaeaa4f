"""Alerts at the hub: rules (:mod:`hub.alerts.rules`), their evaluation on ingest and on a timer
(:mod:`hub.alerts.engine`), stored alerts with history (:mod:`hub.alerts.models`) and notifications
to the people of a site (:mod:`hub.alerts.notify`). See ``docs/alerts.md``.

This package module imports nothing, so :mod:`hub.config` can import the rule types without
pulling in the ORM or the engine.
"""
