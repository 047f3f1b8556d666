"""DNS probes: does this name resolve, at this server, to what we expect?

Failover moves traffic by changing DNS records, so DNS must be checked at the server that
answers shoppers, not through the prober's cache: each run sends one query (dnspython's asyncio
`udp_with_fallback`, TCP if the answer is truncated) straight to `server` and reports the rcode,
the answers and the lookup time (`probe_dns_lookup_time_seconds` in `details`, as blackbox_exporter
names it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from typing import TYPE_CHECKING, Any

from probes.base import Check, ProbeResult, latency_check, prober_error_of, single_step
from probes.models import DnsExpect as DnsExpect  # re-exported: the config models live in probes/models.py
from probes.models import DnsProbe, parse_server
from probes.models import Rcode as Rcode
from probes.models import RecordType as RecordType
from probes.tcp import describe_os_error

if TYPE_CHECKING:
    import dns.rdata

# dnspython is imported where a query runs, not here: a process with no DNS probe never loads it.
# The config model is in probes/models.py, which `continuity validate` loads alone (issue 13).


def _norm_name(text: str) -> str:
    return text.strip().lower().rstrip(".")


def _forms(rdata: dns.rdata.Rdata) -> set[str]:
    import dns.rdatatype
    import dns.rdtypes.IN.SRV
    import dns.rdtypes.mxbase
    import dns.rdtypes.txtbase

    """Every spelling of one answer an SRE might write in `contains`, normalised."""
    forms = {rdata.to_text().lower()}
    rtype = rdata.rdtype
    if rtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        forms.add(str(ipaddress.ip_address(rdata.to_text())))
    elif rtype in (dns.rdatatype.CNAME, dns.rdatatype.NS):
        forms.add(_norm_name(rdata.to_text()))
    elif rtype == dns.rdatatype.MX and isinstance(rdata, dns.rdtypes.mxbase.MXBase):
        exchange = _norm_name(rdata.exchange.to_text())
        forms |= {exchange, f"{rdata.preference} {exchange}"}
    elif rtype == dns.rdatatype.SRV and isinstance(rdata, dns.rdtypes.IN.SRV.SRV):
        target = _norm_name(rdata.target.to_text())
        forms |= {target, f"{rdata.priority} {rdata.weight} {rdata.port} {target}"}
    elif rtype == dns.rdatatype.TXT and isinstance(rdata, dns.rdtypes.txtbase.TXTBase):
        forms.add(b"".join(rdata.strings).decode("utf-8", errors="replace").lower())
    return forms


def _wanted(text: str) -> set[str]:
    """The spellings of `contains` to look for among `_forms` of the answers."""
    text = text.strip().lower()
    forms = {text, text.rstrip(".")}
    with contextlib.suppress(ValueError):
        forms.add(str(ipaddress.ip_address(text)))
    if len(text) >= 2 and text[0] == text[-1] == '"':
        forms.add(text[1:-1])
    return forms


def _system_server() -> tuple[str, int]:
    """The resolver the machine uses (resolv.conf), for probes that name no server."""
    import dns.exception
    import dns.nameserver
    import dns.resolver

    try:
        servers = dns.resolver.Resolver().nameservers
    except dns.exception.DNSException as exc:
        raise LookupError(f"no system resolver to ask ({exc}); set `server`") from None
    if not servers:
        raise LookupError("no nameserver in /etc/resolv.conf; set `server`")
    first = servers[0]
    if isinstance(first, str):
        return first, 53
    if isinstance(first, dns.nameserver.AddressAndPortNameserver):
        return first.address, first.port
    raise LookupError(f"the system resolver's first nameserver is {first} (not plain DNS); set `server`")


async def run(name: str, cfg: DnsProbe) -> ProbeResult:
    """One DNS query, bounded by cfg.timeout; never raises."""
    import dns.asyncquery
    import dns.exception
    import dns.flags
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdatatype

    started_at = time.time()
    t0 = time.perf_counter()
    try:
        host, port = parse_server(cfg.server) if cfg.server else _system_server()
    except (LookupError, ValueError) as exc:
        return single_step(name, started_at, t0, f"DNS {cfg.record_type} {cfg.name}", error=str(exc))
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"DNS {cfg.record_type} {cfg.name} @{where}"
    try:
        query = dns.message.make_query(cfg.name, cfg.record_type)
    except dns.exception.DNSException as exc:
        return single_step(name, started_at, t0, request, error=f"cannot ask for {cfg.name!r}: {exc}")
    try:
        async with asyncio.timeout(cfg.timeout):
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, host, timeout=cfg.timeout, port=port, ignore_unexpected=True
            )
    except (TimeoutError, dns.exception.Timeout):
        took = time.perf_counter() - t0
        return single_step(
            name, started_at, t0, request, error=f"timed out after {took:.1f}s: no answer from {where}"
        )
    except OSError as exc:
        msg = describe_os_error(exc, host, port)
        if isinstance(exc, ConnectionRefusedError):
            msg = f"connection refused by {where} (no DNS server on that port?)"
        return single_step(name, started_at, t0, request, error=msg, prober_error=prober_error_of(exc))
    except dns.exception.DNSException as exc:
        return single_step(name, started_at, t0, request, error=f"bad answer from {where}: {exc}")
    took = time.perf_counter() - t0
    rdtype = dns.rdatatype.from_text(cfg.record_type)
    answers = [rd for rrset in response.answer if rrset.rdtype == rdtype for rd in rrset]
    shown = sorted(rd.to_text() for rd in answers)  # rrsets are unordered; sorted reads stably
    rcode = dns.rcode.to_text(response.rcode())
    details: dict[str, Any] = {
        "probe_dns_lookup_time_seconds": round(took, 6),
        "rcode": rcode,
        "answers": shown,
    }
    checks = [Check("rcode", rcode == cfg.expect.rcode, cfg.expect.rcode, rcode)]
    if rcode == cfg.expect.rcode:  # a wrong rcode says it all; counting answers would only add noise
        need = cfg.expect.minimum()
        checks.append(
            Check(f"{cfg.record_type} answers", len(answers) >= need, f">= {need}", str(len(answers)))
        )
        if cfg.expect.contains is not None:
            wanted = _wanted(cfg.expect.contains)
            ok = any(wanted & _forms(rd) for rd in answers)
            checks.append(
                Check(
                    f"{cfg.record_type} answers",
                    ok,
                    f"to include {cfg.expect.contains!r}",
                    ", ".join(shown) or "none",
                )
            )
    if cfg.expect.latency_ms is not None:
        checks.append(latency_check(cfg.expect.latency_ms, took))
    return single_step(name, started_at, t0, request, tuple(checks), details=details)
