"""The one typed settings object, loaded from a TOML file and validated by pydantic."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.datadict import tag_for_keyword

from db.schema import ResultKind
from node.errors import ConfigError

CONFIG_ENV = "AINODE_CONFIG"
AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]
MatchValue = str | list[str]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """DICOM TLS for the SCP (and the client certificate the sender presents by default)."""

    enabled: bool = False
    cert: Path | None = None
    """PEM certificate (chain) of this node."""
    key: Path | None = None
    """PEM private key of ``cert`` (unencrypted; keep it mode 0600)."""
    ca: Path | None = None
    """PEM bundle of the CAs whose client certificates are accepted."""
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TLSSettings:
        if self.enabled and (self.cert is None or self.key is None):
            raise ValueError("TLS needs cert and key")
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs ca")
        return self


class DestinationTLS(_Section):
    enabled: bool = False
    ca: Path | None = None
    """PEM bundle to verify the destination's certificate; default: the system trust store."""
    cert: Path | None = None
    """Client certificate to present; default: dicom.tls.cert (if any)."""
    key: Path | None = None
    check_hostname: bool = True
    """Check the destination's certificate names ``host`` (DNS name or IP address)."""

    @model_validator(mode="after")
    def _pair(self) -> DestinationTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self


class DicomSettings(_Section):
    ae_title: AETitle = "AINODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_ae_titles: list[AETitle] = []
    allowed_networks: list[IPvAnyNetwork] = []
    """Source networks allowed to connect (e.g. "10.1.0.0/16"); empty accepts any."""
    ae_networks: dict[str, list[IPvAnyNetwork]] = {}
    """Per calling AE title, the networks it may come from (other AE titles: unrestricted)."""
    max_instance_mb: Annotated[float, Field(gt=0)] = 2048.0
    """Larger instances are refused with Out of Resources (0xA700) and not stored."""
    max_pdu: Annotated[int, Field(ge=0)] = 0
    """Maximum PDU size we accept; 0 means unlimited (fastest for large instances)."""
    max_associations: Annotated[int, Field(ge=1)] = 32
    """Per acceptor process."""
    acceptors: Annotated[int, Field(ge=1, le=64)] = 1
    """Processes receiving associations; more than 1 spreads them over cores (one per core)."""
    network_timeout: Annotated[float, Field(gt=0)] = 60.0
    association_request_timeout: Annotated[float, Field(gt=0)] = 10.0
    """Seconds from a connection to its whole association request; then it is closed."""
    max_associations_per_address: Annotated[int, Field(ge=1)] = 16
    """Concurrent connections from one source address (per acceptor process)."""
    fast_path: bool = True
    """pynetdicom's association loops made event-driven (node/receive/reactor.py); false runs
    pynetdicom's stock (polling) loops, in one receiving process (dicom.acceptors is ignored)."""
    tls: TLSSettings = TLSSettings()


class StorageSettings(_Section):
    dir: Path = Path("var")
    min_free_mb: Annotated[int, Field(ge=0)] = 500
    """Below this much free space the SCP answers Out of Resources (0xA700) before writing."""
    retention_days: Annotated[float, Field(ge=0)] = 0
    """Days after completion to delete a finished, delivered study (rows and files); 0: keep."""


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/ainode.db"


class StudySettings(_Section):
    stable_seconds: Annotated[float, Field(ge=0)] = 60.0
    stable_seconds_by_modality: dict[str, Annotated[float, Field(ge=0)]] = {"CR": 5.0, "DX": 5.0}
    """A study whose series all have one of these modalities uses the largest of their values."""
    check_interval_seconds: Annotated[float, Field(gt=0)] = 1.0


class WorkerSettings(_Section):
    count: Annotated[int, Field(ge=0)] = 1
    device: str = "auto"
    lease_seconds: Annotated[float, Field(gt=0)] = 120.0
    heartbeat_seconds: Annotated[float, Field(gt=0)] = 10.0
    poll_seconds: Annotated[float, Field(gt=0)] = 0.5
    max_attempts: Annotated[int, Field(ge=1)] = 3
    job_timeout_seconds: Annotated[float, Field(gt=0)] = 900.0
    """A job running longer (hung inference) is failed or retried and its worker restarted."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _heartbeat_below_lease(self) -> WorkerSettings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds")
        return self


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_DNS_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def host_name(value: str) -> str | None:
    """``value`` as a Host header names it (lower case, IPv6 in brackets); None if invalid."""
    name = value.strip().lower().rstrip(".")
    if ":" not in name and not name.startswith("["):
        return name if _DNS_NAME.fullmatch(name) else None
    try:
        address = ipaddress.IPv6Address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    return f"[{address.compressed}]"


def default_admin_hosts(host: str) -> list[str]:
    """The loopback names, and ``host`` itself unless it is a wildcard address."""
    own = host_name(host)
    extra = [own] if own and own not in ("0.0.0.0", "[::]") and own not in LOOPBACK_HOSTS else []
    return [*LOOPBACK_HOSTS, *extra]


class AdminSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    """Bound elsewhere than loopback, the admin server requires authentication."""
    enabled: bool = True
    username: str | None = None
    password_hash: str | None = None
    """``pbkdf2_sha256$ITERATIONS$SALT$HASH``, made by ``ainode hash-secret``."""
    token_hash: str | None = None
    """Same format; clients send the token itself as ``Authorization: Bearer TOKEN``."""
    credentials_file: Path | None = None
    """TOML with ``username``/``password_hash``/``token_hash`` (mode 0600), read at start."""
    allowed_hosts: Annotated[list[str], Field(min_length=1)] = list(LOOPBACK_HOSTS)
    """Host header names the server answers (any port); others get 400 (DNS rebinding).
    Default: the loopback names, and ``host`` when it names one address (not 0.0.0.0/::)."""
    max_body_kb: Annotated[int, Field(ge=1)] = 1024
    """A larger request body is refused with 413 before authentication or parsing."""
    max_failed_logins: Annotated[int, Field(ge=1)] = 10
    """Failed logins per client address within ``lockout_seconds`` that lock it out."""
    lockout_seconds: Annotated[float, Field(gt=0)] = 60.0
    """How long a locked-out address gets 429 without its credentials being checked."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of the admin server; with ``tls_key`` it serves HTTPS only."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert`` (unencrypted; keep it mode 0600)."""
    max_connections: Annotated[int, Field(ge=1)] = 64
    """Open connections at most: one beyond is closed at once, requests get 503 at the limit."""
    request_timeout: Annotated[float, Field(gt=0)] = 10.0
    """Seconds for a request (TLS handshake, line, headers, body) to arrive whole, counted
    from its connection or the previous response; then the connection is closed."""

    @model_validator(mode="before")
    @classmethod
    def _default_hosts(cls, data: object) -> object:
        if isinstance(data, dict) and "allowed_hosts" not in data:
            host = data.get("host", cls.model_fields["host"].default)
            data = {**data, "allowed_hosts": default_admin_hosts(str(host))}
        return data

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        names = [host_name(v) for v in value]
        bad = [v for v, n in zip(value, names, strict=True) if n is None]
        if bad:
            raise ValueError(f"not a host name or IP address (no scheme or port): {bad}")
        return [n for n in names if n is not None]

    @model_validator(mode="after")
    def _pairs(self) -> AdminSettings:
        if (self.username is None) != (self.password_hash is None):
            raise ValueError("username and password_hash go together")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class SendSettings(_Section):
    max_attempts: Annotated[int, Field(ge=1)] = 10
    backoff_base_seconds: Annotated[float, Field(gt=0)] = 5.0
    backoff_max_seconds: Annotated[float, Field(gt=0)] = 600.0
    interval_seconds: Annotated[float, Field(gt=0)] = 1.0
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    breaker_failures: Annotated[int, Field(ge=1)] = 3
    """Consecutive connection failures that open a destination's circuit."""
    breaker_open_seconds: Annotated[float, Field(gt=0)] = 30.0
    """How long an open circuit makes no attempt (doubles per re-open, up to backoff_max)."""


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Destination(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = None
    """The AE title we call from; defaults to dicom.ae_title."""
    tls: DestinationTLS = DestinationTLS()
    objects: Annotated[list[ResultKind], Field(min_length=1)] = [
        ResultKind.SEG, ResultKind.SR, ResultKind.HEATMAP]
    """Result objects this destination gets (TOML: their names, e.g. ["SEG", "SR"]); SC is a
    burned-in secondary capture series. An SR brings its SEG (see node.results.selection)."""


class Route(_Section):
    name: Annotated[str, Field(min_length=1)]
    match: dict[str, MatchValue] = {}
    models: Annotated[list[str], Field(min_length=1)]
    destinations: list[str] = []

    @field_validator("match")
    @classmethod
    def _keywords(cls, value: dict[str, MatchValue]) -> dict[str, MatchValue]:
        for keyword, expected in value.items():
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword")
            for item in expected if isinstance(expected, list) else [expected]:
                if item.startswith("re:"):
                    try:
                        re.compile(item[3:])
                    except re.error as exc:
                        raise ValueError(f"{keyword}: bad regular expression: {exc}") from exc
        return value


class CodeConfig(_Section):
    value: Annotated[str, Field(min_length=1, max_length=16)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


class ClassConfig(_Section):
    index: Annotated[int, Field(ge=0)]
    code: CodeConfig
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5


class LabelConfig(_Section):
    value: Annotated[int, Field(ge=1)]
    label: Annotated[str, Field(min_length=1, max_length=64)]
    category: CodeConfig
    type: CodeConfig
    type_modifier: CodeConfig | None = None


class ModelConfig(_Section):
    """A site's own model from a TorchScript file or a MONAI bundle folder."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["torchscript", "monai-bundle"] = "torchscript"
    path: Path
    version: str | None = None
    """Required for TorchScript; a MONAI bundle's metadata gives it otherwise."""
    task: Literal["classification", "segmentation"]
    modalities: Annotated[list[str], Field(min_length=1)]
    dims: Literal[2, 3] = 2
    input_size: list[Annotated[int, Field(ge=1)]] | None = None
    window: tuple[float, Annotated[float, Field(gt=0)]] | None = None
    normalize: tuple[float, Annotated[float, Field(gt=0)]] | None = None
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    classes: list[ClassConfig] = []
    labels: list[LabelConfig] = []
    min_slices: Annotated[int, Field(ge=1)] = 1
    batch_size: Annotated[int, Field(ge=1)] = 8
    intended_use: str = "Site-supplied model."

    @model_validator(mode="after")
    def _outputs(self) -> ModelConfig:
        if self.kind == "torchscript" and not self.version:
            raise ValueError("version is required for a TorchScript model")
        if self.task == "classification" and not self.classes:
            raise ValueError("a classification model needs [[models.classes]] with codes")
        if self.task == "segmentation" and not self.labels:
            raise ValueError("a segmentation model needs [[models.labels]] with codes")
        if self.input_size is not None and len(self.input_size) != self.dims:
            raise ValueError(f"input_size needs {self.dims} values for dims = {self.dims}")
        return self


class Settings(_Section):
    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    study: StudySettings = StudySettings()
    workers: WorkerSettings = WorkerSettings()
    admin: AdminSettings = AdminSettings()
    send: SendSettings = SendSettings()
    logging: LoggingSettings = LoggingSettings()
    destinations: list[Destination] = []
    routes: list[Route] = []
    models: list[ModelConfig] = []

    @model_validator(mode="after")
    def _references(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("destinations: names must be unique")
        for i, route in enumerate(self.routes):
            for dest in route.destinations:
                if dest not in names:
                    raise ValueError(f"routes[{i}].destinations: unknown destination {dest!r}")
        return self

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{key}: {err['msg']}")
    return "; ".join(lines)


def parse_settings(text: str, source: str = "<string>") -> Settings:
    """Parse TOML text into :class:`Settings`, raising :class:`ConfigError` naming the bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from exc


def default_config_text() -> str:
    """The embedded default configuration (``node/default_config.toml``)."""
    return resources.files("node").joinpath("default_config.toml").read_text(encoding="utf-8")


def load_settings(path: Path | str | None = None) -> Settings:
    """Load settings from ``path``, else ``$AINODE_CONFIG``, else the embedded default."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        path = Path(env) if env else None
    if path is None:
        return parse_settings(default_config_text(), "embedded default config")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_settings(text, str(path))
