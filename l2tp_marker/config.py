"""Configuration: a TOML file (sample: ``l2tp_marker/data/l2tp-marker.toml``) overridden by options.

Every key, its meaning and its default are documented in the shipped sample; this module keeps the
defaults in one place (the dataclasses) and validates values with clear messages.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .engine import EngineConfig

DEFAULT_CONFIG_PATH = Path("/etc/l2tp-marker/l2tp-marker.toml")


class ConfigError(Exception):
    """A configuration problem, with the key and what is wrong."""


@dataclass(frozen=True)
class DaemonConfig:
    queue_in: int = 1701
    queue_out: int = 1702
    # How inbound packets must have arrived to be judged: "ipsec" adds
    # `-m policy --dir in --pol ipsec` (only decrypted traffic), "none" judges any marked packet
    # (the lab, which has no IPsec).
    inbound_match: str = "ipsec"
    backend: str = "iptables-legacy"
    chain_prefix: str = "L2TP-MARKER"
    state_file: Path = Path("/var/lib/l2tp-marker/state.json")
    state_interval: float = 2.0
    decision_log: Path | None = None
    control_socket: Path = Path("/run/l2tp-marker/control.sock")
    log_level: str = "info"
    queue_maxlen: int = 4096
    repair_interval: float = 5.0
    metrics_listen: str | None = None
    metrics_textfile: Path | None = None
    metrics_interval: float = 15.0
    # Kernel fast path for data packets of known tunnels: "auto" uses it where the kernel supports
    # it and falls back to the per-packet path (saying so) where not, "on" refuses to start
    # without it, "off" never uses it.
    fastpath: str = "auto"
    fastpath_bit: int = 0x80000000
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        for name in ("queue_in", "queue_out"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= 65535:
                raise ConfigError(f"{name} must be a queue number 0..65535, not {v!r}")
        if self.queue_in == self.queue_out:
            raise ConfigError("queue_in and queue_out must differ")
        if self.inbound_match not in ("ipsec", "none"):
            raise ConfigError(f"inbound_match must be 'ipsec' or 'none', not {self.inbound_match!r}")
        if self.backend not in ("iptables-legacy",):
            raise ConfigError(f"backend {self.backend!r} is not known (iptables-legacy)")
        if not self.chain_prefix or len(self.chain_prefix) > 20 or not self.chain_prefix.replace("-", "").isalnum():
            raise ConfigError("chain_prefix must be 1-20 letters, digits or dashes")
        if self.fastpath not in ("auto", "on", "off"):
            raise ConfigError(f"fastpath must be 'auto', 'on' or 'off', not {self.fastpath!r}")
        b = self.fastpath_bit
        if not isinstance(b, int) or isinstance(b, bool) or not 0 < b <= 0xFFFFFFFF or b & (b - 1):
            raise ConfigError(f"fastpath_bit must be one bit of the 32-bit mark (e.g. 0x80000000), not {b!r}")
        for name in ("state_interval", "repair_interval", "metrics_interval"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if self.metrics_listen is not None:
            from .metrics import parse_listen  # noqa: PLC0415

            try:
                parse_listen(self.metrics_listen)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


_ENGINE_KEYS = {f.name for f in fields(EngineConfig)}
_DAEMON_KEYS = {f.name for f in fields(DaemonConfig)} - {"engine"}


def load_config(path: Path | None) -> DaemonConfig:
    """Read a TOML config file (missing default path = all defaults)."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return DaemonConfig()
        path = DEFAULT_CONFIG_PATH
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config_from_dict(data, str(path))


def config_from_dict(data: dict, where: str = "config") -> DaemonConfig:
    engine_data = data.get("engine", {})
    if not isinstance(engine_data, dict):
        raise ConfigError(f"{where}: [engine] must be a table")
    unknown = (set(data) - _DAEMON_KEYS - {"engine"}) | (set(engine_data) - _ENGINE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
    kw = dict(data)
    kw.pop("engine", None)
    for k in ("metrics_listen",):
        if kw.get(k) == "":
            kw[k] = None
    for k in ("state_file", "decision_log", "control_socket", "metrics_textfile"):
        if kw.get(k) is not None:
            kw[k] = Path(kw[k]) if kw[k] != "" else None
    ekw = dict(engine_data)
    if "secret" in ekw and ekw["secret"] is not None:
        ekw["secret"] = str(ekw["secret"]).encode()
    try:
        return DaemonConfig(engine=EngineConfig(**ekw), **kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def engine_config_from_args(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """Apply the engine options of the command line over ``base``."""
    base = base or EngineConfig()
    kw = {}
    if getattr(args, "mark_mask", None) is not None:
        kw["mark_mask"] = args.mark_mask
    if getattr(args, "secret", None) is not None:
        kw["secret"] = args.secret.encode()
    if getattr(args, "idle_timeout", None) is not None:
        kw["idle_timeout"] = args.idle_timeout
    if getattr(args, "enforce", None) is not None:
        kw["enforce"] = args.enforce
    return replace(base, **kw) if kw else base


def add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--mark-mask", type=lambda s: int(s, 0), default=None,
                   help="bits of the packet mark that carry the SA mark (default 0xffffffff)")
    g.add_argument("--secret", default=None,
                   help="L2TP tunnel secret, to reveal and rewrite hidden Assigned Tunnel ID AVPs")
    g.add_argument("--idle-timeout", type=float, default=None,
                   help="seconds without a packet from the LNS before a tunnel is forgotten (default 600)")
    g.add_argument("--enforce", choices=("off", "log", "drop"), default=None,
                   help="inbound packets of a tunnel bound to another SA: count and log them (log, "
                        "default), ignore them (off) or drop them before the LNS sees them (drop)")
