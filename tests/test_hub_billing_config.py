"""``[billing]`` in hub.toml."""

from __future__ import annotations

from decimal import Decimal

import pytest

from hub.config import parse_config
from protocol.tomlconfig import ConfigError


def test_billing_defaults_and_values() -> None:
    cfg = parse_config("")
    assert (cfg.billing.meter_max_power_kw, cfg.billing.register_modulus_kwh) == (Decimal(1000),
                                                                                 Decimal("42949672.96"))
    cfg = parse_config("[billing]\nmeter_max_power_kw = 55.5\nregister_modulus_kwh = 99999999.99\n")
    assert (cfg.billing.meter_max_power_kw, cfg.billing.register_modulus_kwh) == (Decimal("55.5"),
                                                                                 Decimal("99999999.99"))


def test_bad_billing_values_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[billing]\nmeter_max_power_kw = 0\n", source="hub.toml")
    assert info.value.problems[0].startswith("hub.toml:2: billing.meter_max_power_kw: ")
    with pytest.raises(ConfigError) as info:
        parse_config("[billing]\nmax_power = 5\n", source="hub.toml")
    assert "billing.max_power: Extra inputs are not permitted" in info.value.problems[0]
