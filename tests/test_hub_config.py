"""Hub configuration: the example loads, mistakes are reported with file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.cli import main
from hub.config import HubConfig, apply_env, load_config
from protocol.tomlconfig import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hub.toml"


def test_example_loads_with_documented_values() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.database.url == "sqlite://var/hub.db"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.client_id) == ("127.0.0.1", 1883, "twin-hub")
    assert cfg.mqtt.share_group is None
    assert cfg.mqtt.keepalive == 30
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8000)
    assert (cfg.ingest.batch_max_readings, cfg.ingest.batch_max_delay_ms) == (5000, 50)
    assert (cfg.status.stale_after_s, cfg.status.offline_after_s) == (120, 600)
    assert cfg.log_level == "INFO"


def test_example_sets_every_option() -> None:
    # Each option of the model appears in the example (set or commented out), so the example
    # stays the reference for operators.
    text = EXAMPLE.read_text()
    for section_name, section in HubConfig.model_fields.items():
        if section_name == "log_level":
            assert "log_level =" in text
            continue
        assert f"[{section_name}]" in text
        sub = section.annotation
        assert isinstance(sub, type)
        for key in sub.model_fields:  # type: ignore[attr-defined]
            assert f"{key} =" in text, f"{section_name}.{key} missing from examples/hub.toml"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    p = tmp_path / "hub.toml"
    p.write_text("")
    cfg = load_config(p)
    assert cfg.database.url == "sqlite://var/hub.db"
    assert cfg.http.port == 8000
    assert cfg.mqtt.client_id == "twin-hub"


def _problems(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "hub.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    return [line.replace(str(p), "hub.toml") for line in info.value.problems]


def test_wrong_type_names_line_and_key(tmp_path: Path) -> None:
    problems = _problems(tmp_path, '[mqtt]\nhost = "broker"\n\n[http]\nhost = "0.0.0.0"\nport = "abc"\n')
    assert len(problems) == 1
    assert problems[0].startswith("hub.toml:6: http.port: ")
    assert "integer" in problems[0]


def test_unknown_key_names_line_and_key(tmp_path: Path) -> None:
    problems = _problems(tmp_path, '[ingest]\nbatch_max_readings = 100\nbach_max_delay_ms = 5\n')
    assert problems == ["hub.toml:3: ingest.bach_max_delay_ms: Extra inputs are not permitted"]


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    problems = _problems(tmp_path, 'log_level = "LOUD"\n[mqtt]\nport = 70000\nshare_group = "a/b"\n')
    assert [p.split(": ")[0:2] for p in problems] == [
        ["hub.toml:1", "log_level"], ["hub.toml:3", "mqtt.port"], ["hub.toml:4", "mqtt.share_group"]]


def test_offline_before_stale_is_refused(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "[status]\nstale_after_s = 60\noffline_after_s = 30\n")
    assert len(problems) == 1
    assert problems[0].startswith("hub.toml:1: status: ")
    assert "offline_after_s must be >= stale_after_s" in problems[0]


def test_database_url_scheme_checked(tmp_path: Path) -> None:
    problems = _problems(tmp_path, '[database]\nurl = "mysql://x@y/z"\n')
    assert len(problems) == 1 and problems[0].startswith("hub.toml:1: database: ")


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "[http]\nport = = 3\n")
    assert len(problems) == 1 and "line 2" in problems[0]


def test_env_overrides() -> None:
    cfg = apply_env(load_config(EXAMPLE), {"HUB_PORT": "9001", "MQTT_PORT": "11883",
                                            "HUB_DATABASE_URL": "postgres://u@127.0.0.1:5432/twin"})
    assert cfg.http.port == 9001
    assert cfg.mqtt.port == 11883
    assert cfg.database.url == "postgres://u@127.0.0.1:5432/twin"
    assert cfg.mqtt.client_id == "twin-hub"  # the rest is untouched


def test_env_override_keeps_password() -> None:
    cfg = HubConfig.model_validate({"mqtt": {"username": "hub", "password": "s3cret"}})
    cfg2 = apply_env(cfg, {"HUB_PORT": "1"})
    assert cfg2.mqtt.password is not None and cfg2.mqtt.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg2)


def test_bad_env_override_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        apply_env(load_config(EXAMPLE), {"HUB_PORT": "abc"})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("environment HUB_PORT: ")


def test_cli_bad_config_exits_2_with_problems_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "hub.toml"
    p.write_text('[http]\nport = "abc"\n')
    assert main(["run", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{p}:2: http.port: Input should be a valid integer, unable to parse string as an integer"]


def test_cli_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_check_accepts_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
