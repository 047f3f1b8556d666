"""tcp, dns, tls and prometheus probes against real servers the tests start on 127.0.0.1.

Every kind is exercised on the paths an SRE meets at 3 a.m. (refused, silent, wrong answer,
expired) and the assertions read the failure reason, because the reason is the product: it must
say what to fix. The Prometheus kind also runs once against the real Prometheus binary scraping a
real exporter, since its JSON is what the fake imitates.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import requests
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.config import ConfigError, json_schema, load_config
from probes.base import ProbeResult
from probes.dns import DnsProbe
from probes.passive import PASSIVE_KINDS
from probes.prometheus import PrometheusProbe
from probes.runner import RUNNERS, run_probe
from probes.tcp import TcpProbe
from probes.tls import TlsProbe


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on (bound then released; the window for a race is tiny)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def probe(cfg: Any, name: str = "p") -> tuple[ProbeResult, float]:
    """Run through the real entry point (runner dispatch) and time it from outside."""
    t0 = time.perf_counter()
    result = await run_probe(name, cfg)
    return result, time.perf_counter() - t0


# ------------------------------------------------------------------ tcp


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-TestServer\r\n")
    await writer.drain()
    writer.close()


async def _echo_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    writer.write(line)
    await writer.drain()
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # accept, say nothing, wait for the client to give up
    writer.close()


async def tcp_server(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def tcp(port: int, **kw: Any) -> TcpProbe:
    return TcpProbe(kind="tcp", host="127.0.0.1", port=port, **kw)


def test_tcp_banner_and_echo_pass() -> None:
    async def scenario() -> None:
        banner, bport = await tcp_server(_banner)
        echo, eport = await tcp_server(_echo_line)
        async with banner, echo:
            result, _ = await probe(tcp(bport, expect={"contains": "SSH-2.0", "latency_ms": {"lt": 2000}}))
            assert result.ok, result.reason
            assert [c.name for c in result.steps[0].checks] == ["answer", "latency_ms"]
            assert result.details["connect_seconds"] > 0
            result, _ = await probe(tcp(eport, send=r"PING\r\n", expect={"contains": r"PING\r\n"}))
            assert result.ok, result.reason

    run(scenario())


def test_tcp_wrong_answer_names_what_came_back() -> None:
    async def scenario() -> None:
        echo, port = await tcp_server(_echo_line)
        async with echo:
            result, _ = await probe(tcp(port, send="PING\\n", expect={"contains": "+PONG"}))
        assert not result.ok
        assert result.reason == (
            f"request (TCP 127.0.0.1:{port}): expected answer to contain '+PONG', "
            "found 'PING\\n' (then the server closed the connection)"
        )

    run(scenario())


def test_tcp_refused_port() -> None:
    port = free_port()
    result, took = run(probe(tcp(port)))
    assert not result.ok
    assert f"connection refused by 127.0.0.1:{port} (nothing listening on that port?)" in result.reason
    assert took < 1


def test_tcp_server_that_accepts_but_never_answers_times_out() -> None:
    async def scenario() -> None:
        server, port = await tcp_server(_silent)
        async with server:
            connect_only, _ = await probe(tcp(port, timeout="500ms"))
            result, took = await probe(tcp(port, timeout="500ms", expect={"contains": "220 "}))
        assert connect_only.ok, "accepting the connection is all a connect-only probe asks"
        assert not result.ok
        assert "expected answer to contain '220 ' within 0.5s, found nothing" in result.reason
        assert 0.45 < took < 1.5

    run(scenario())


# ------------------------------------------------------------------ dns


class FakeDns(asyncio.DatagramProtocol):
    """A tiny authoritative server built from dnspython's message classes.

    `zone` maps (name, type) to record texts; a name absent from every key is NXDOMAIN, a known
    name with another type is an empty NOERROR answer. `silent` drops every query.
    """

    def __init__(self, zone: dict[tuple[str, str], list[str]], silent: bool = False) -> None:
        self.zone = zone
        self.silent = silent
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.silent or self.transport is None:
            return
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        qname = question.name.to_text()
        values = self.zone.get((qname, dns.rdatatype.to_text(question.rdtype)))
        if values:
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", question.rdtype, values))
        elif not any(name == qname for name, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(response.to_wire(), addr)


ZONE = {
    ("shop.example.", "A"): ["127.0.0.2", "127.0.0.3"],
    ("shop.example.", "MX"): ["10 mail.shop.example."],
    ("shop.example.", "TXT"): ['"v=spf1 -all"'],
}


async def dns_server(silent: bool = False) -> tuple[asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: FakeDns(ZONE, silent), local_addr=("127.0.0.1", 0)
    )
    return transport, transport.get_extra_info("sockname")[1]


def dnsq(port: int, name: str = "shop.example", **kw: Any) -> DnsProbe:
    return DnsProbe(kind="dns", name=name, server=f"127.0.0.1:{port}", **kw)


def test_dns_answers() -> None:
    async def scenario() -> None:
        transport, port = await dns_server()
        try:
            result, _ = await probe(dnsq(port, expect={"contains": "127.0.0.3", "latency_ms": {"lt": 1000}}))
            assert result.ok, result.reason
            assert result.details["rcode"] == "NOERROR"
            assert result.details["answers"] == ["127.0.0.2", "127.0.0.3"]
            assert 0 < result.details["probe_dns_lookup_time_seconds"] < 1
            result, _ = await probe(dnsq(port, record_type="MX", expect={"contains": "mail.shop.example"}))
            assert result.ok, result.reason
            result, _ = await probe(dnsq(port, record_type="TXT", expect={"contains": "v=spf1 -all"}))
            assert result.ok, result.reason
            result, _ = await probe(dnsq(port, name="gone.example", expect={"rcode": "NXDOMAIN"}))
            assert result.ok, result.reason
        finally:
            transport.close()

    run(scenario())


def test_dns_nxdomain_and_wrong_value_fail_with_the_answer() -> None:
    async def scenario() -> None:
        transport, port = await dns_server()
        try:
            nx, _ = await probe(dnsq(port, name="gone.example"))
            wrong, _ = await probe(dnsq(port, expect={"contains": "203.0.113.20"}))
            empty, _ = await probe(dnsq(port, record_type="AAAA"))
        finally:
            transport.close()
        where = f"DNS A gone.example @127.0.0.1:{port}"
        assert nx.reason == f"request ({where}): expected rcode NOERROR, found NXDOMAIN"
        assert wrong.reason.endswith(
            "expected A answers to include '203.0.113.20', found 127.0.0.2, 127.0.0.3"
        )
        assert empty.reason.endswith("expected AAAA answers >= 1, found 0")

    run(scenario())


def test_dns_silent_server_times_out() -> None:
    async def scenario() -> None:
        transport, port = await dns_server(silent=True)
        try:
            result, took = await probe(dnsq(port, timeout="500ms"))
        finally:
            transport.close()
        assert not result.ok
        assert f"timed out after 0.5s: no answer from 127.0.0.1:{port}" in result.reason
        assert took < 1.5

    run(scenario())


# ------------------------------------------------------------------ tls


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class LocalCA:
    """A CA and leaves it signs, written as PEM files; EC keys keep generation fast."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("Continuity test CA"))
            .issuer_name(_name("Continuity test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=60))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = where / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, label: str, names: list[str], not_before: float, not_after: float) -> tuple[Path, Path]:
        """A leaf valid from now+not_before to now+not_after days, for DNS names and IPs."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=not_before))
            .not_valid_after(now + dt.timedelta(days=not_after))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = self.where / f"{label}.pem", self.where / f"{label}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("pki"))


async def tls_server(cert: tuple[Path, Path]) -> tuple[asyncio.Server, int]:
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


def tls(port: int, ca: LocalCA | None, **kw: Any) -> TlsProbe:
    return TlsProbe(kind="tls", host="127.0.0.1", port=port, ca_file=str(ca.ca_file) if ca else None, **kw)


LOCAL = ["localhost", "127.0.0.1"]


def test_tls_valid_certificate_passes(ca: LocalCA) -> None:
    async def scenario() -> None:
        server, port = await tls_server(ca.leaf("valid", LOCAL, -1, 400))
        async with server:
            by_ip, _ = await probe(tls(port, ca))
            by_name, _ = await probe(tls(port, ca, server_name="localhost"))
        assert by_ip.ok, by_ip.reason
        assert by_name.ok, by_name.reason
        assert by_ip.details["degraded"] is False
        assert by_ip.details["days_remaining"] in (399, 400)
        assert by_ip.details["not_after"].endswith("Z")
        assert by_ip.steps[0].checks[0].expected == ">= 14"

    run(scenario())


def test_tls_expiring_soon_is_a_degraded_failure(ca: LocalCA) -> None:
    async def scenario() -> None:
        server, port = await tls_server(ca.leaf("soon", LOCAL, -80, 5.5))
        async with server:
            result, _ = await probe(tls(port, ca, expect={"days_remaining": {"ge": 14}}))
            relaxed, _ = await probe(tls(port, ca, expect={"days_remaining": {"ge": 3}}))
        assert not result.ok
        assert result.details["degraded"] is True
        assert result.details["days_remaining"] == 5
        assert "expected days_remaining >= 14, found 5 (not_after " in result.reason
        assert relaxed.ok and relaxed.details["degraded"] is False

    run(scenario())


def test_tls_expired_certificate_is_a_hard_failure(ca: LocalCA) -> None:
    async def scenario() -> None:
        server, port = await tls_server(ca.leaf("expired", LOCAL, -90, -3.2))
        async with server:
            result, _ = await probe(tls(port, ca))
        assert not result.ok
        assert result.details["degraded"] is False
        assert result.details["days_remaining"] == -4  # floor of -3.2 days
        assert f"request (TLS 127.0.0.1:{port}): certificate expired 3 days ago (not_after " in result.reason

    run(scenario())


def test_tls_hostname_mismatch_and_untrusted_ca(ca: LocalCA) -> None:
    async def scenario() -> None:
        server, port = await tls_server(ca.leaf("other", ["other.example"], -1, 400))
        async with server:
            wrong, _ = await probe(tls(port, ca, server_name="shop.example"))
            untrusted, _ = await probe(tls(port, None, server_name="other.example"))
        assert not wrong.ok and wrong.details["degraded"] is False
        assert wrong.reason.endswith("hostname mismatch: certificate is for other.example, not shop.example")
        assert not untrusted.ok
        assert "certificate not trusted:" in untrusted.reason
        assert "set ca_file" in untrusted.reason

    run(scenario())


def test_tls_handshake_that_never_completes_times_out(ca: LocalCA) -> None:
    async def scenario() -> None:
        server, port = await tcp_server(_silent)
        async with server:
            result, took = await probe(tls(port, ca, timeout="500ms"))
        assert not result.ok
        assert "timed out after 0.5s in the TLS handshake" in result.reason
        assert took < 1.5

    run(scenario())


# ------------------------------------------------------------------ prometheus (fake)


def vector(*series: tuple[dict[str, str], str]) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": m, "value": [1732000000.123, v]} for m, v in series],
        },
    }


ANSWERS: dict[str, tuple[int, Any]] = {
    "error_ratio": (200, vector(({"__name__": "error_ratio", "job": "shop"}, "0.013"))),
    "by_instance": (
        200,
        vector(({"instance": "a", "job": "shop"}, "0.01"), ({"instance": "b", "job": "shop"}, "0.5")),
    ),
    "nothing": (200, vector()),
    "scalar(1)": (200, {"status": "success", "data": {"resultType": "scalar", "result": [1.0, "1"]}}),
    "rate(x[": (
        400,
        {"status": "error", "errorType": "bad_data", "error": "1:8: parse error: unclosed left bracket"},
    ),
}


async def fake_prometheus() -> tuple[web.AppRunner, str]:
    async def query(request: web.Request) -> web.StreamResponse:
        q = request.query.get("query", "")
        if q == "slow":
            await asyncio.sleep(1)  # past the probe's 500ms, short enough not to slow cleanup
        status, body = ANSWERS.get(q, (404, None))
        return web.json_response(body, status=status)

    async def html(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html><body>Grafana</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    app.router.add_get("/grafana/api/v1/query", html)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def prom(url: str, query: str, **kw: Any) -> PrometheusProbe:
    return PrometheusProbe(kind="prometheus", url=url, query=query, **kw)


def test_prometheus_fake_answers() -> None:
    async def scenario() -> dict[str, ProbeResult]:
        runner, url = await fake_prometheus()
        try:
            cases = {
                "pass": prom(url, "error_ratio", expect={"value": {"lt": 0.02}}),
                "over": prom(url, "error_ratio", expect={"value": {"lt": 0.01}}),
                "several": prom(url + "/", "by_instance", expect={"value": {"lt": 0.02}}),
                "several_ok": prom(url, "by_instance", expect={"value": {"lt": 0.9}}),
                "empty_fails": prom(url, "nothing", expect={"value": {"lt": 0.02}}),
                "empty_ok": prom(url, "nothing", expect={"value": {"lt": 0.02}, "empty": "ok"}),
                "scalar": prom(url, "scalar(1)", expect={"value": {"eq": 1}}),
                "bad_query": prom(url, "rate(x[", expect={"value": {"lt": 1}}),
                "not_prometheus": prom(url + "/grafana", "error_ratio"),
                "slow": prom(url, "slow", timeout="500ms"),
            }
            return {k: (await probe(cfg, k))[0] for k, cfg in cases.items()}
        finally:
            await runner.cleanup()

    r = run(scenario())
    assert r["pass"].ok, r["pass"].reason
    assert r["pass"].details["series"] == 1
    assert r["over"].reason.endswith('expected value < 0.01, found 0.013 for error_ratio{job="shop"}')
    assert r["several"].reason.endswith('expected value < 0.02, found 0.5 for {instance="b", job="shop"}')
    assert r["several_ok"].ok and r["several_ok"].steps[0].checks[0].found == "2 series, 0.01 to 0.5"
    assert "expected result at least one series, found an empty result" in r["empty_fails"].reason
    assert r["empty_ok"].ok, r["empty_ok"].reason
    assert r["scalar"].ok, r["scalar"].reason
    assert r["bad_query"].reason.endswith("PromQL error (bad_data): 1:8: parse error: unclosed left bracket")
    assert "expected a Prometheus API answer (JSON)" in r["not_prometheus"].reason
    assert "found HTTP 200 text/html" in r["not_prometheus"].reason
    assert "timed out after 0.5s" in r["slow"].reason


def test_prometheus_unreachable() -> None:
    port = free_port()
    result, took = run(probe(prom(f"http://127.0.0.1:{port}", "up")))
    assert not result.ok
    assert f"cannot reach Prometheus at http://127.0.0.1:{port}" in result.reason
    assert took < 1


# ------------------------------------------------------------------ prometheus (real)


@pytest.fixture
def real_prometheus(tmp_path: Path) -> Iterator[str]:
    """Prometheus 2.x on 127.0.0.1 scraping a test exporter whose test_error_ratio is 0.5."""
    binary = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if binary is None:
        pytest.fail(
            "the prometheus binary is missing: apt-get install prometheus (Debian's package; CI "
            "installs it in .ci/run). This test runs the real server on purpose.",
            pytrace=False,
        )
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    Gauge("test_error_ratio", "Share of failed checkouts (test).", registry=registry).set(0.5)
    exporter, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    exporter_port = exporter.server_port
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: test\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n",
        encoding="utf-8",
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"prometheus exited with {proc.returncode}: {(tmp_path / 'prometheus.log').read_text()}"
                )
            try:
                doc = requests.get(
                    f"{url}/api/v1/query", params={"query": "test_error_ratio"}, timeout=1
                ).json()
                if doc["data"]["result"]:
                    break
            except (requests.RequestException, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("prometheus did not scrape the test exporter within 30s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        exporter.shutdown()
        thread.join(timeout=5)


def test_prometheus_real_server(real_prometheus: str) -> None:
    strict, _ = run(probe(prom(real_prometheus, "test_error_ratio", expect={"value": {"lt": 0.02}})))
    loose, _ = run(probe(prom(real_prometheus, "test_error_ratio", expect={"value": {"lt": 0.9}})))
    bad, _ = run(probe(prom(real_prometheus, "rate(test_error_ratio[")))
    assert not strict.ok
    assert "expected value < 0.02, found 0.5 for test_error_ratio{" in strict.reason
    assert 'job="test"' in strict.reason
    assert loose.ok, loose.reason
    assert "PromQL error (bad_data):" in bad.reason


# ------------------------------------------------------------------ config


def _problems(tmp_path: Path, probes_yaml: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(
        "services:\n  shop: {tier: critical, rto: 5m, probes: [x]}\nprobes:\n" + probes_yaml, encoding="utf-8"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [p.split(": ", 1)[1] for p in info.value.problems]


def test_config_accepts_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        """
services:
  shop: {tier: critical, rto: 5m, probes: [db, dns, cert, errors]}
probes:
  db: {kind: tcp, host: 10.0.0.5, port: 5432, timeout: 2s}
  dns: {kind: dns, name: shop.example, server: "[::1]:5353", record_type: AAAA,
        expect: {contains: "::1", latency_ms: {lt: 200}}}
  cert: {kind: tls, host: shop.example, expect: {days_remaining: {ge: 21}}, impact: degraded}
  errors: {kind: prometheus, url: "http://prometheus:9090", query: "job:errors:ratio5m",
           expect: {value: {lt: 0.02}, empty: ok}}
""",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert [p.kind for p in cfg.probes.values()] == ["tcp", "dns", "tls", "prometheus"]
    assert cfg.probes["cert"].port == 443
    assert set(RUNNERS) == {"http", "transaction", "tcp", "dns", "tls", "prometheus"}
    kinds = {
        v["properties"]["kind"]["const"] for k, v in json_schema()["$defs"].items() if k.endswith("Probe")
    }
    # Every kind is either polled (a runner) or passive (evaluated from pushed signals by the controller).
    assert kinds == set(RUNNERS) | set(PASSIVE_KINDS)
    assert not set(RUNNERS) & set(PASSIVE_KINDS)


def test_config_errors_name_the_field_without_the_kind_tag(tmp_path: Path) -> None:
    assert _problems(tmp_path, "  x: {kind: tcp, host: 127.0.0.1}\n") == [
        "probes.x.port: expected a value (this field is required), found nothing"
    ]
    assert _problems(tmp_path, "  x: {kind: dns, name: shop.example, record_type: PTR}\n") == [
        "probes.x.record_type: expected one of 'A', 'AAAA', 'CNAME', 'MX', 'TXT', 'NS' or 'SRV', found 'PTR'"
    ]
    (bad_server,) = _problems(tmp_path, "  x: {kind: dns, name: shop.example, server: dns.google}\n")
    assert bad_server.startswith("probes.x.server: expected an IP address with an optional :port")
    (unknown,) = _problems(tmp_path, "  x: {kind: icmp, host: 127.0.0.1}\n")
    assert unknown == (
        "probes.x.kind: expected one of 'http', 'transaction', 'tcp', 'dns', 'tls', 'prometheus', "
        "'heartbeat', 'alertmanager', found 'icmp'"
    )
    (extra,) = _problems(tmp_path, "  x: {kind: tls, host: a.example, sni: b.example}\n")
    assert extra.startswith("probes.x.sni: expected a known key")


def test_runner_reports_a_session_error_as_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's promise (never raises) holds for the new kinds too."""

    async def broken(name: str, cfg: Any) -> ProbeResult:
        raise RuntimeError("boom")

    monkeypatch.setitem(RUNNERS, "tcp", broken)
    result = run(run_probe("p", tcp(1)))
    assert not result.ok and result.reason == "probe error: RuntimeError: boom"
