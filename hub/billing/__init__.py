"""Energy billing: tariffs as data, consumption from cumulative meter registers, cost with exact
decimal money arithmetic (see ``docs/billing.md``).

``money``, ``tariffs``, ``consumption`` and ``cost`` are pure (no database, no clock); ``models``
holds the Tortoise tables and ``service`` the glue between them and the API.
"""
