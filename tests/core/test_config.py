"""Config loading: precedence file < env < flag, validation messages that name the source, typos."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path

import pytest

from kvd.config import (
    FIELDS,
    Config,
    ConfigError,
    add_config_flags,
    load_config,
    overrides_from_args,
    parse_host_port,
    parse_size,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kvd.toml"
    path.write_text(text)
    return str(path)


def flags(*argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return overrides_from_args(parser.parse_args(list(argv)))


# --- defaults and the field table ---


def test_defaults() -> None:
    c = load_config(None, env={})
    assert c == Config()
    assert c.hostname == "127.0.0.1"
    assert c.socket_path == "/run/kvd/kvd.sock"
    assert c.socket_mode == 0o660
    assert c.peer_port == 17500
    assert c.protocol == "tcp"
    assert (c.workers, c.queues, c.max_batch_ops) == (4, 4, 1024)
    assert (c.bootstrap_timeout_s, c.waiting_timeout_s, c.transfer_timeout_s) == (30.0, 300.0, 120.0)
    assert (c.heartbeat_interval_s, c.heartbeat_misses, c.abort_fence_s) == (2.0, 3, 10.0)
    assert c.staging_enabled is False
    assert c.staging_pool_bytes == 4 << 30
    assert c.staging_chunk_tokens == 8192
    assert (c.metrics_address, c.log_format, c.log_level) == ("", "auto", "info")


def test_field_table_matches_dataclass() -> None:
    assert [f.attr for f in FIELDS] == [f.name for f in dataclasses.fields(Config)]
    assert len({f.env for f in FIELDS}) == len(FIELDS)
    assert len({f.flag for f in FIELDS}) == len(FIELDS)


def test_names_in_each_source() -> None:
    by_attr = {f.attr: f for f in FIELDS}
    f = by_attr["waiting_timeout_s"]
    assert (f.dotted, f.env, f.flag) == (
        "timeouts.waiting_s",
        "KVD_TIMEOUTS_WAITING_S",
        "--timeouts-waiting-s",
    )
    assert by_attr["auth_token"].env == "KVD_PEER_AUTH_TOKEN"
    assert by_attr["max_batch_ops"].flag == "--transfer-max-batch-ops"


def test_shipped_conf_lists_every_key_with_its_default() -> None:
    path = REPO / "conf" / "kvd.toml"
    doc = tomllib.loads(path.read_text())
    listed = {f"{section}.{key}" for section, table in doc.items() for key in table}
    assert listed == {f.dotted for f in FIELDS}
    assert load_config(str(path), env={}) == Config()


# --- precedence ---


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [timeouts]
        waiting_s = 10
        transfer_s = 20
        bootstrap_s = 5
        """,
    )
    env = {"KVD_TIMEOUTS_TRANSFER_S": "21", "KVD_TIMEOUTS_BOOTSTRAP_S": "6"}
    c = load_config(path, env=env, overrides=flags("--timeouts-bootstrap-s", "7"))
    assert c.waiting_timeout_s == 10.0  # file only
    assert c.transfer_timeout_s == 21.0  # env beats file
    assert c.bootstrap_timeout_s == 7.0  # flag beats env and file
    assert c.abort_fence_s == 10.0  # default


def test_kvd_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nhostname = "10.0.0.5"\n')
    assert load_config(None, env={"KVD_CONFIG": path}).hostname == "10.0.0.5"


def test_overrides_by_attr_or_dotted_name() -> None:
    c = load_config(None, env={}, overrides={"workers": 8, "transfer.queues": "2"})
    assert (c.workers, c.queues) == (8, 2)
    with pytest.raises(ConfigError, match="unknown config override 'worker'"):
        load_config(None, env={}, overrides={"worker": 8})


def test_flags_only_override_what_was_given() -> None:
    assert flags() == {}
    got = flags("--peer-port", "0", "--staging-enabled", "--log-level", "debug")
    assert got == {"peer_port": "0", "staging_enabled": True, "log_level": "debug"}
    assert flags("--no-staging-enabled") == {"staging_enabled": False}
    c = load_config(None, env={"KVD_STAGING_ENABLED": "1"}, overrides=flags("--no-staging-enabled"))
    assert c.staging_enabled is False


def test_config_flag_is_optional() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert parser.parse_args(["--config", "/x.toml"]).config == "/x.toml"
    bare = argparse.ArgumentParser()
    bare.add_argument("--config")  # a CLI with its own --config
    add_config_flags(bare, config_flag=False)
    assert bare.parse_args([]).config is None


# --- validation messages name the key and its source ---


def test_env_message_names_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"KVD_TIMEOUTS_WAITING_S": "abc"})
    assert str(err.value) == "KVD_TIMEOUTS_WAITING_S: expected a positive number, got 'abc'"


def test_file_message_names_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[transfer]\nworkers = 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value) == f"{path}: transfer.workers: expected a positive integer, got 0"


def test_flag_message_names_the_flag() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides=flags("--transport-protocol", "infiniband"))
    assert str(err.value) == "--transport-protocol: expected one of 'tcp', 'rdma', got 'infiniband'"


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, '[peer]\nport = 70000\n[log]\nformat = "xml"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"KVD_TRANSFER_QUEUES": "-1"})
    assert len(err.value.errors) == 3
    text = str(err.value)
    assert f"{path}: peer.port: expected a port number 0-65535" in text
    assert f"{path}: log.format: expected one of 'auto', 'console', 'json', got 'xml'" in text
    assert "KVD_TRANSFER_QUEUES: expected a positive integer, got '-1'" in text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVD_TIMEOUTS_WAITING_S": "0"}, "expected a positive number"),
        ({"KVD_TIMEOUTS_WAITING_S": "nan"}, "expected a positive number"),
        ({"KVD_TIMEOUTS_HEARTBEAT_INTERVAL_S": "-2"}, "expected a positive number"),
        ({"KVD_TIMEOUTS_HEARTBEAT_MISSES": "2.5"}, "expected a positive integer"),
        ({"KVD_PEER_PORT": "http"}, "expected a port number"),
        ({"KVD_STAGING_ENABLED": "maybe"}, "expected true or false"),
        ({"KVD_STAGING_POOL_BYTES": "4 gigs"}, "expected a positive byte size"),
        ({"KVD_STAGING_POOL_BYTES": "0"}, "expected a positive byte size"),
        ({"KVD_METRICS_ADDRESS": "9400"}, "expected 'host:port'"),
        ({"KVD_METRICS_ADDRESS": "localhost:99999"}, "expected 'host:port'"),
        ({"KVD_NODE_HOSTNAME": ""}, "must not be empty"),
        ({"KVD_LOG_LEVEL": "verbose"}, "expected one of 'debug'"),
        ({"KVD_TRANSPORT_DEVICES": "mlx5_0;mlx5_1"}, "expected a comma-separated RDMA device list"),
        ({"KVD_SOCKET_PATH": "/run/" + "x" * 120}, "a Unix socket path may be at most 107 bytes"),
    ],
)
def test_bad_env_values(env: dict[str, str], message: str) -> None:
    name = next(iter(env))
    with pytest.raises(ConfigError, match=f"^{name}: {message}"):
        load_config(None, env=env)


def test_toml_types_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, '[transfer]\nworkers = true\n[node]\nhostname = 5\n[staging]\nenabled = "on"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = str(err.value)
    assert "transfer.workers: expected a positive integer, got True" in text
    assert "node.hostname: expected a string, got 5" in text
    assert len(err.value.errors) == 2  # "on" is a fine boolean


def test_values_are_normalised() -> None:
    env = {
        "KVD_TRANSPORT_PROTOCOL": "RDMA",
        "KVD_TRANSPORT_DEVICES": " mlx5_0 , mlx5_1 ",
        "KVD_LOG_LEVEL": "WARN",
        "KVD_STAGING_ENABLED": "yes",
        "KVD_PEER_PORT": "0",
    }
    c = load_config(None, env=env)
    assert (c.protocol, c.devices, c.log_level) == ("rdma", "mlx5_0,mlx5_1", "warning")
    assert c.device_list == ["mlx5_0", "mlx5_1"]
    assert c.staging_enabled is True
    assert c.peer_port == 0


def test_config_constructor_validates() -> None:
    with pytest.raises(ConfigError, match=r"^Config.workers: expected a positive integer, got 0"):
        Config(workers=0)
    assert Config(staging_pool_bytes="64MiB").staging_pool_bytes == 64 << 20  # type: ignore[arg-type]


def test_heartbeat_timeout() -> None:
    assert Config(heartbeat_interval_s=2.0, heartbeat_misses=3).heartbeat_timeout_s == 6.0


# --- typo protection ---


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[timeouts]\nwaiting = 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value) == f"{path}: unknown key timeouts.waiting (did you mean 'waiting_s'?)"


def test_unknown_section_in_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[timeout]\nwaiting_s = 5\n")
    with pytest.raises(ConfigError, match=r"unknown section \[timeout\] \(did you mean 'timeouts'\?\)"):
        load_config(path, env={})


def test_top_level_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'hostname = "x"\n')
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(path, env={})


def test_unknown_env_var_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"KVD_TIMEOUTS_WAITING": "5"})
    assert str(err.value).startswith("KVD_TIMEOUTS_WAITING: unknown kvd environment variable")
    assert "KVD_TIMEOUTS_WAITING_S" in str(err.value)


def test_other_env_vars_are_ignored(tmp_path: Path) -> None:
    env = {"KVD_CONFIG": "", "PATH": "/bin", "KVDX": "1", "NOT_KVD_PEER_PORT": "x"}
    assert load_config(None, env=env) == Config()


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "absent.toml"), env={})
    path = write(tmp_path, "[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={})


# --- sizes and socket modes ---


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 << 20),
        ("4GiB", 4 << 30),
        ("4 GiB", 4 << 30),
        ("4g", 4 << 30),
        ("1.5GiB", 3 << 29),
        ("512KiB", 512 << 10),
        ("500MB", 500_000_000),
        ("1TiB", 1 << 40),
        ("4096", 4096),
        ("4096B", 4096),
        (1 << 20, 1 << 20),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_sizes_from_each_source(tmp_path: Path) -> None:
    path = write(tmp_path, '[staging]\npool_bytes = "64MiB"\n')
    assert load_config(path, env={}).staging_pool_bytes == 64 << 20
    path = write(tmp_path, "[staging]\npool_bytes = 1_048_576\n")
    assert load_config(path, env={}).staging_pool_bytes == 1 << 20
    assert load_config(None, env={"KVD_STAGING_POOL_BYTES": "2GiB"}).staging_pool_bytes == 2 << 30
    c = load_config(None, env={}, overrides=flags("--staging-pool-bytes", "128MiB"))
    assert c.staging_pool_bytes == 128 << 20


@pytest.mark.parametrize("bad", ["", "GiB", "4 XB", "-1GiB", "1e9", True, 0, 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a positive byte size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("toml_value", "mode"),
    [
        ('"0660"', 0o660),
        ('"660"', 0o660),
        ('"0o640"', 0o640),
        ('"0600"', 0o600),
        ("0o660", 0o660),
        ("416", 0o640),
    ],
)
def test_socket_modes(tmp_path: Path, toml_value: str, mode: int) -> None:
    path = write(tmp_path, f"[socket]\nmode = {toml_value}\n")
    assert load_config(path, env={}).socket_mode == mode


def test_socket_mode_from_env_is_octal() -> None:
    assert load_config(None, env={"KVD_SOCKET_MODE": "0640"}).socket_mode == 0o640


@pytest.mark.parametrize(
    ("toml_value", "message"),
    [
        ("660", "an integer is read as decimal"),  # decimal 660 is not 0o660
        ('"0666"', "must not be world-writable"),
        ('"0777"', "must not be world-writable"),
        ('"0060"', "the owner (kvd) needs read and write"),
        ('"rw-rw----"', "expected a file mode"),
        ('"0890"', "expected a file mode"),
    ],
)
def test_bad_socket_modes(tmp_path: Path, toml_value: str, message: str) -> None:
    path = write(tmp_path, f"[socket]\nmode = {toml_value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value).startswith(f"{path}: socket.mode: ")
    assert message in str(err.value)


def test_host_port() -> None:
    assert parse_host_port("0.0.0.0:9400") == ("0.0.0.0", 9400)
    assert parse_host_port(":9400") == ("", 9400)
    assert parse_host_port("[::1]:9400") == ("::1", 9400)
    with pytest.raises(ValueError):
        parse_host_port("9400")


# --- output ---


def test_to_dict_redacts_the_token() -> None:
    c = Config(auth_token="s3cret")
    d = c.to_dict()
    assert d["auth_token"] == "<redacted>"
    assert d["socket_mode"] == "0660"
    assert "s3cret" not in repr(c)
    assert Config().to_dict()["auth_token"] == ""
    assert set(d) == {f.attr for f in FIELDS}
    # What to_dict prints can be read back.
    again = load_config(None, env={}, overrides={k: v for k, v in Config().to_dict().items()})
    assert again == Config()
