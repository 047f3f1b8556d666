"""The config models of every probe kind, apart from the code that runs them.

`continuity validate` and a config reload need these models and nothing else: the engines beside
them (probes/http.py, dns.py, tcp.py, tls.py, prometheus.py, passive.py) import asyncio, ssl, sockets
and, where a probe runs, aiohttp, jinja2 and dnspython, which cost more start-up than validating any
file (issue 13: `validate` answers a hostile file in under a second). So this module imports only
pydantic and the shared expectations in probes/base.py; tests/test_cli_imports.py pins that. Each
engine module re-exports its models, so `from probes.http import HttpProbe` keeps working.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from controller.durations import Duration
from probes.base import Comparison, Expect, Extract, Strict


def parse_server(text: str) -> tuple[str, int]:
    """`10.0.0.2`, `10.0.0.2:5353`, `::1`, `[::1]:5353` -> (ip, port). Raise ValueError if not."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"an IP address with an optional :port, found {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, raw = text.partition(":")
        if not raw.isdigit():
            raise ValueError(f"an IP address with an optional :port, found {text!r}")
        port = int(raw)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"an IP address with an optional :port (e.g. 10.0.0.2:53 or [::1]:53), found {text!r}"
        ) from None
    if not 1 <= port <= 65535:
        raise ValueError(f"a port between 1 and 65535, found {port}")
    return host, port


# ---------------------------------------------------------------- http and transaction


class Window(Strict):
    """`failures: 3, of: 5`: three failures among the last five results, consecutive or not."""

    failures: int = Field(ge=1)
    of: int = Field(ge=1, le=1000)

    @model_validator(mode="after")
    def _fits(self) -> Window:
        if self.failures > self.of:
            raise ValueError(f"failures <= of, found {self.failures} of {self.of}")
        return self


class ProbeCommon(Strict):
    """Fields every probe kind has."""

    description: str = ""
    interval: Duration = Field(default=10.0, gt=0, description="How often the probe runs, e.g. 10s.")
    timeout: Duration = Field(default=3.0, gt=0, description="Whole-run deadline; a hang is a failure.")
    failure_threshold: int | None = Field(
        default=None, ge=1, description="Consecutive failures before DOWN (default: detection section)."
    )
    success_threshold: int | None = Field(
        default=None, ge=1, description="Consecutive successes before UP again (default: detection section)."
    )
    impact: Literal["down", "degraded"] = Field(
        default="down", description="What this probe failing means for its services."
    )
    window: Window | None = Field(default=None, description="Per-probe `failures: F, of: N` window.")
    quorum: int | None = Field(default=None, ge=1, description="Vantage points that must agree (per probe).")
    latency_slo: Duration | None = Field(
        default=None, gt=0, description="A passing run slower than this counts as degraded, not down."
    )


class RequestSpec(Strict):
    """One HTTP request. Strings may use {{ var }} from `vars` and earlier extractions."""

    method: str = "GET"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    json_body: Any = Field(default=None, alias="json")
    expect: Expect = Field(default_factory=Expect)


class Step(RequestSpec):
    name: str
    extract: dict[str, Extract] = Field(default_factory=dict, description="Values for later steps.")
    allow_failure: bool = Field(
        default=False, description="Its failure means degraded (the journey goes on), not down."
    )
    always_run: bool = Field(
        default=False, description="Cleanup (empty the test cart): runs even after an earlier step failed."
    )
    timeout: Duration | None = Field(default=None, gt=0, description="Per-step deadline.")


class HttpProbe(ProbeCommon, RequestSpec):
    """A single request with expectations on status, latency, body and JSON fields."""

    kind: Literal["http"]
    vars: dict[str, Any] = Field(default_factory=dict)

    def journey(self, name: str) -> list[Step]:
        fields = RequestSpec.model_fields.keys()
        return [Step(name=name, **{k: getattr(self, k) for k in fields})]


class TransactionProbe(ProbeCommon):
    """A scripted user journey: ordered steps sharing one session (cookies) and extracted values."""

    kind: Literal["transaction"]
    vars: dict[str, Any] = Field(default_factory=dict, description="Values for {{ }} templates.")
    steps: list[Step] = Field(min_length=1)
    timeout: Duration = Field(default=10.0, gt=0)

    def journey(self, name: str) -> list[Step]:
        return self.steps


# ---------------------------------------------------------------- dns

RecordType = Literal["A", "AAAA", "CNAME", "MX", "TXT", "NS", "SRV"]
Rcode = Literal["NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP"]


class DnsExpect(Strict):
    """What the answer must look like; every field optional."""

    rcode: Rcode = Field(default="NOERROR", description="Expected response code.")
    answers_min: int | None = Field(
        default=None,
        ge=0,
        description="Fewest records of `record_type` in the answer (default 1 when rcode is NOERROR, "
        "else 0).",
    )
    contains: str | None = Field(
        default=None,
        description="A value that must be among the answers: an address for A/AAAA, a name for "
        "CNAME/NS (trailing dot optional), the exchange or '10 mx.example' for MX, the text for TXT, "
        "the target or '0 5 443 host' for SRV.",
    )
    latency_ms: Comparison | None = Field(default=None, description="Bound on the lookup time.")

    def minimum(self) -> int:
        if self.answers_min is not None:
            return self.answers_min
        return 1 if self.rcode == "NOERROR" else 0


class DnsProbe(ProbeCommon):
    """One query for `name`/`record_type` sent to `server`."""

    kind: Literal["dns"]
    name: str = Field(min_length=1, description="The name to look up, e.g. shop.example.")
    server: str | None = Field(
        default=None,
        description="IP address of the DNS server, with an optional :port ([v6]:port for IPv6); "
        "default: the first nameserver in /etc/resolv.conf.",
    )
    record_type: RecordType = Field(default="A", description="Record type to ask for.")
    expect: DnsExpect = Field(default_factory=DnsExpect, description="Expectations on the answer.")

    @field_validator("server")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        if value is not None:
            parse_server(value)
        return value


# ---------------------------------------------------------------- tcp


class TcpExpect(Strict):
    """What the first bytes and the timing must look like; every field optional."""

    contains: str | None = Field(
        default=None,
        description="Text expected in the first bytes the server sends (after `send`, if set), "
        "e.g. 'SSH-2.0' or '+PONG'. Backslash escapes (\\r, \\n) are understood.",
    )
    latency_ms: Comparison | None = Field(
        default=None,
        description="Bound on the whole exchange (connect, send, read until `contains`), e.g. {lt: 200}.",
    )


class TcpProbe(ProbeCommon):
    """Connect to host:port; optionally send a line and expect text back."""

    kind: Literal["tcp"]
    host: str = Field(min_length=1, description="Host name or IP address to connect to.")
    port: int = Field(ge=1, le=65535, description="TCP port.")
    send: str | None = Field(
        default=None,
        description="Text sent once connected, e.g. 'PING\\r\\n'. Backslash escapes are understood.",
    )
    expect: TcpExpect = Field(default_factory=TcpExpect, description="Expectations on the answer.")


# ---------------------------------------------------------------- tls


def _fourteen_days() -> Comparison:
    return Comparison(ge=14)


class TlsExpect(Strict):
    """Expectations on the certificate."""

    days_remaining: Comparison = Field(
        default_factory=_fourteen_days,
        description="Bound on whole days until the certificate expires; failing it marks the result "
        "degraded, not down. Default {ge: 14}.",
    )


class TlsProbe(ProbeCommon):
    """A verified TLS handshake with host:port and a check of the certificate's expiry."""

    kind: Literal["tls"]
    host: str = Field(min_length=1, description="Host name or IP address to connect to.")
    port: int = Field(default=443, ge=1, le=65535, description="TCP port.")
    server_name: str | None = Field(
        default=None, description="Name sent as SNI and checked against the certificate; default: host."
    )
    ca_file: str | None = Field(
        default=None,
        description="PEM file of CA certificates to trust instead of the system's (private or test CA).",
    )
    expect: TlsExpect = Field(default_factory=TlsExpect, description="Expectations on the certificate.")


# ---------------------------------------------------------------- prometheus


class PrometheusExpect(Strict):
    """What the query's result must look like."""

    value: Comparison | None = Field(
        default=None, description="Bound every returned series (or the scalar) must satisfy, e.g. {lt: 0.02}."
    )
    empty: Literal["ok", "fail"] = Field(
        default="fail",
        description="What a result with no series means: 'fail' (default; a typo in a metric name "
        "must not pass silently) or 'ok' (e.g. an alert-style query that returns only bad series).",
    )


class PrometheusProbe(ProbeCommon):
    """One PromQL instant query against a Prometheus server."""

    kind: Literal["prometheus"]
    url: str = Field(
        min_length=1, description="Prometheus base URL, e.g. http://prometheus:9090 (the API path is added)."
    )
    query: str = Field(min_length=1, description="PromQL instant query, e.g. job:errors:ratio5m.")
    expect: PrometheusExpect = Field(default_factory=PrometheusExpect, description="Expectations.")


# ---------------------------------------------------------------- passive (pushed)


class HeartbeatProbe(ProbeCommon):
    """A job that must check in at least every `period` (plus `grace`)."""

    kind: Literal["heartbeat"]
    period: Duration = Field(gt=0, description="How often the job is expected to POST /heartbeat/NAME.")
    grace: Duration = Field(default=0.0, ge=0, description="Extra slack before silence counts as a failure.")
    token_env: str | None = Field(
        default=None, description="If set, pushes need `Authorization: Bearer` with it."
    )
    interval: Duration = Field(default=10.0, gt=0, description="How often the silence is checked.")
    public: bool = Field(
        default=False,
        description="Accept heartbeats without a credential (a job that cannot hold a secret). "
        "Otherwise pushes need `token_env`'s token, or the API token.",
    )


class AlertmanagerProbe(ProbeCommon):
    """Fails while an Alertmanager alert whose labels match is firing."""

    kind: Literal["alertmanager"]
    matchers: dict[str, str] = Field(
        min_length=1, description="Label name -> value; `=~regex` for a regular expression match."
    )
    interval: Duration = Field(default=5.0, gt=0, description="How often firing alerts are re-evaluated.")


PASSIVE_KINDS = ("heartbeat", "alertmanager")
