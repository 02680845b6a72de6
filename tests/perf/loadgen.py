"""A tiny raw-socket LDAP load generator.

The client must not be the bottleneck, so it does not use ldap3 or
python-ldap per operation.  Requests are BER-encoded from pre-built byte
templates (only the messageID and the user number change), responses are
framed and checked with a few byte comparisons, and each client process
drives its share of the connections from one epoll loop.

Rules of the load:

* one outstanding operation per connection (no pipelining); the latency of
  an operation is the time from ``send`` to its final response;
* every response's resultCode is checked, a search must return exactly one
  entry; anything else counts as an error;
* a warm-up phase runs first, then a measured phase; only operations sent
  and completed inside the measured phase are counted;
* every loop is bounded in count and time.

Scenarios:

``search``  bind as admin once per connection, then search
            ``(uid=userNNNNNN)`` scope sub from the suffix, attributes cn mail.
``bind``    simple bind as a random user with the known password, repeated
            on the same connection (rebind).
``modify``  bind as admin once per connection, then replace ``description``
            of a random user.
``mix``     bind as admin once per connection, then 90% search, 10% modify.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import resource
import select
import socket
import time
from array import array
from dataclasses import dataclass, field

# --------------------------------------------------------------------------
# BER encoding (just what the requests need)
# --------------------------------------------------------------------------


def ber_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(b),)) + b


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + ber_len(len(content)) + content


def ber_int(v: int, tag: int = 0x02) -> bytes:
    return tlv(tag, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True))


def octets(s: str | bytes, tag: int = 0x04) -> bytes:
    if isinstance(s, str):
        s = s.encode()
    return tlv(tag, s)


def uid_of(i: int) -> str:
    return "user%06d" % i


def user_dn(i: int, suffix: str) -> str:
    return "uid=%s,ou=people,%s" % (uid_of(i), suffix)


def bind_op(dn: str, password: str) -> bytes:
    # BindRequest ::= [APPLICATION 0] SEQUENCE { version, name, simple [0] }
    return tlv(0x60, ber_int(3) + octets(dn) + octets(password, 0x80))


def search_op(suffix: str, uid: str) -> bytes:
    # SearchRequest ::= [APPLICATION 3] SEQUENCE { base, scope=sub(2),
    #   deref=never(0), sizeLimit 0, timeLimit 0, typesOnly FALSE,
    #   filter equalityMatch [3] {uid, value}, attributes {cn, mail} }
    return tlv(
        0x63,
        octets(suffix)
        + ber_int(2, 0x0A)
        + ber_int(0, 0x0A)
        + ber_int(0)
        + ber_int(0)
        + b"\x01\x01\x00"
        + tlv(0xA3, octets("uid") + octets(uid))
        + tlv(0x30, octets("cn") + octets("mail")),
    )


def modify_op(dn: str, attr: str, value: str) -> bytes:
    # ModifyRequest ::= [APPLICATION 6] SEQUENCE { object, changes SEQUENCE OF
    #   SEQUENCE { operation replace(2), PartialAttribute { type, SET OF vals } } }
    change = tlv(0x30, ber_int(2, 0x0A) + tlv(0x30, octets(attr) + tlv(0x31, octets(value))))
    return tlv(0x66, octets(dn) + tlv(0x30, change))


UNBIND = b"\x42\x00"

# Response protocolOp tags
T_BIND_RESP = 0x61
T_ENTRY = 0x64
T_DONE = 0x65
T_MOD_RESP = 0x67
T_REF = 0x73
T_EXT_RESP = 0x78


class Templates:
    """Pre-encoded request bodies: prefix + user number digits + suffix.

    A user number is spliced in as six ASCII digits, so the encoded length
    never changes and the templates are built once.
    """

    def __init__(self, suffix: str, password: str):
        marker = "@@@@@@"

        def split(op: bytes) -> tuple[bytes, bytes]:
            a, b = op.split(marker.encode())
            return a, b

        self.search = split(search_op(suffix, "user" + marker))
        self.bind = split(bind_op("uid=user%s,ou=people,%s" % (marker, suffix), password))
        # the modify value has a fixed width counter too
        mod = modify_op("uid=user%s,ou=people,%s" % (marker, suffix), "description", "bench %s" % ("#" * 10))
        a, b = split(mod)
        b1, b2 = b.split(b"#" * 10)
        self.modify = (a, b1, b2)

    def search_req(self, i: int) -> bytes:
        a, b = self.search
        return a + b"%06d" % i + b

    def bind_req(self, i: int) -> bytes:
        a, b = self.bind
        return a + b"%06d" % i + b

    def modify_req(self, i: int, counter: int) -> bytes:
        a, b1, b2 = self.modify
        return a + b"%06d" % i + b1 + b"%010d" % (counter % 10**10) + b2


def frame(msgid: int, op: bytes) -> bytes:
    body = ber_int(msgid) + op
    return b"\x30" + ber_len(len(body)) + body


# --------------------------------------------------------------------------
# Response framing
# --------------------------------------------------------------------------


def _hdr(buf, pos: int):
    """Return (content_start, content_len) of the TLV at pos, or None."""
    n = len(buf)
    if pos + 2 > n:
        return None
    ln = buf[pos + 1]
    if ln < 0x80:
        return pos + 2, ln
    k = ln & 0x7F
    if pos + 2 + k > n:
        return None
    return pos + 2 + k, int.from_bytes(buf[pos + 2 : pos + 2 + k], "big")


def parse_messages(buf: bytearray):
    """Yield (op_tag, result_code_or_None) for each complete message and
    remove them from buf."""
    out = []
    pos = 0
    n = len(buf)
    while True:
        h = _hdr(buf, pos)
        if h is None:
            break
        start, ln = h
        end = start + ln
        if end > n:
            break
        # messageID INTEGER
        mid = _hdr(buf, start)
        op_pos = mid[0] + mid[1]
        tag = buf[op_pos]
        rc = None
        if tag in (T_BIND_RESP, T_DONE, T_MOD_RESP, T_EXT_RESP):
            oh = _hdr(buf, op_pos)
            # resultCode ENUMERATED: 0a 01 XX
            if oh and buf[oh[0]] == 0x0A:
                rc = buf[oh[0] + 2]
        out.append((tag, rc))
        pos = end
    if pos:
        del buf[:pos]
    return out


# --------------------------------------------------------------------------
# Worker process
# --------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    host: str
    port: int
    suffix: str
    scenario: str
    users: int
    nconns: int
    admin_dn: str
    admin_password: str
    user_password: str
    warmup: float
    duration: float
    seed: int
    connect_timeout: float = 30.0


@dataclass
class WorkerResult:
    ops: int = 0
    errors: int = 0
    error_kinds: dict = field(default_factory=dict)
    latencies_ms: bytes = b""
    cpu_s: float = 0.0
    wall_s: float = 0.0
    warmup_ops: int = 0
    fatal: str = ""


class _Conn:
    __slots__ = ("sock", "buf", "msgid", "t_sent", "kind", "entries", "alive")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.msgid = 0
        self.t_sent = 0.0
        self.kind = ""
        self.entries = 0
        self.alive = True


def _blocking_roundtrip(sock: socket.socket, msg: bytes, timeout: float) -> list:
    """Send one message and read until a final response; used for setup."""
    sock.settimeout(timeout)
    sock.sendall(msg)
    buf = bytearray()
    deadline = time.monotonic() + timeout
    got = []
    for _ in range(10000):
        if time.monotonic() > deadline:
            raise TimeoutError("no response during setup")
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection during setup")
        buf += data
        got += parse_messages(buf)
        if any(t != T_ENTRY and t != T_REF for t, _ in got):
            return got
    raise TimeoutError("no final response during setup")


def admin_bind(sock: socket.socket, spec: WorkerSpec, msgid: int = 1) -> int:
    got = _blocking_roundtrip(sock, frame(msgid, bind_op(spec.admin_dn, spec.admin_password)), spec.connect_timeout)
    tag, rc = got[-1]
    if tag != T_BIND_RESP or rc != 0:
        raise RuntimeError("admin bind failed: tag=0x%02x resultCode=%s" % (tag, rc))
    return rc


def probe(host: str, port: int, suffix: str, uid: str, admin_dn: str, admin_password: str, timeout: float = 5.0) -> str:
    """One admin bind + one search for uid; "" when both succeed with 1 entry,
    else what went wrong."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        got = _blocking_roundtrip(s, frame(1, bind_op(admin_dn, admin_password)), timeout)
        if got[-1] != (T_BIND_RESP, 0):
            return "admin bind: tag 0x%02x resultCode %s" % got[-1]
        got = _blocking_roundtrip(s, frame(2, search_op(suffix, uid)), timeout)
        entries = sum(1 for t, _ in got if t == T_ENTRY)
        s.sendall(frame(3, UNBIND))
        if got[-1] != (T_DONE, 0) or entries != 1:
            return "search (uid=%s): tag 0x%02x resultCode %s, %d entries" % (uid, got[-1][0], got[-1][1], entries)
        return ""


def _worker(spec: WorkerSpec, ready_q, go_event, start_val, result_q):
    res = WorkerResult()
    try:
        _worker_inner(spec, ready_q, go_event, start_val, res)
    except Exception as e:  # report instead of dying silently
        res.fatal = "%s: %s" % (type(e).__name__, e)
        try:
            ready_q.put(("fatal", os.getpid(), res.fatal))
        except Exception:
            pass
    result_q.put(res)


def _worker_inner(spec: WorkerSpec, ready_q, go_event, start_val, res: WorkerResult):
    rnd = random.Random(spec.seed)
    tpl = Templates(spec.suffix, spec.user_password)
    scen = spec.scenario
    need_admin = scen in ("search", "modify", "mix")

    conns: list[_Conn] = []
    for _ in range(spec.nconns):
        s = socket.create_connection((spec.host, spec.port), timeout=spec.connect_timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(s)
        if need_admin:
            admin_bind(s, spec, 1)
            c.msgid = 1
        s.setblocking(False)
        conns.append(c)

    ready_q.put(("ready", os.getpid(), ""))
    if not go_event.wait(120):
        raise TimeoutError("never got the go signal")
    t0 = start_val.value
    t_measure = t0 + spec.warmup
    t_end = t_measure + spec.duration

    # raw epoll: cheaper per event than the selectors wrapper
    ep = select.epoll()
    by_fd: dict[int, _Conn] = {}
    for c in conns:
        fd = c.sock.fileno()
        by_fd[fd] = c
        ep.register(fd, select.EPOLLIN)

    lat = array("d")
    counter = [rnd.randrange(10**9)]
    users = spec.users
    randrange = rnd.randrange
    random_ = rnd.random
    now = time.monotonic

    def send_next(c: _Conn, t: float) -> None:
        i = randrange(users) + 1
        c.msgid = c.msgid + 1 if c.msgid < 0x7FFFFFFF else 1
        if scen == "search" or (scen == "mix" and random_() < 0.9):
            op = tpl.search_req(i)
            c.kind = "search"
            c.entries = 0
        elif scen == "bind":
            op = tpl.bind_req(i)
            c.kind = "bind"
        else:
            counter[0] += 1
            op = tpl.modify_req(i, counter[0])
            c.kind = "modify"
        c.t_sent = t
        c.sock.send(frame(c.msgid, op))

    def error(kind: str, count: bool) -> None:
        if count:
            res.errors += 1
            res.error_kinds[kind] = res.error_kinds.get(kind, 0) + 1

    def kill(c: _Conn, kind: str, count: bool) -> None:
        error(kind, count)
        c.alive = False
        try:
            ep.unregister(c.sock.fileno())
        except (OSError, ValueError):
            pass
        c.sock.close()

    # wait for the common start time (bounded)
    delay = t0 - now()
    if delay > 0:
        time.sleep(min(delay, 10))

    ru0 = None
    t = now()
    for c in conns:
        try:
            send_next(c, t)
        except OSError:
            kill(c, "send_failed", False)

    alive = sum(1 for c in conns if c.alive)
    # Upper bound on loop iterations: generous (one op per iteration at 1M ops/s)
    max_iter = int((spec.warmup + spec.duration + 5) * 1_000_000)
    for _ in range(max_iter):
        t = now()
        if ru0 is None and t >= t_measure:
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            rt0 = t
        if t >= t_end or alive == 0:
            break
        events = ep.poll(min(0.05, t_end - t))
        for fd, _ in events:
            c = by_fd[fd]
            if not c.alive:
                continue
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                kill(c, "connection_closed", True)
                alive -= 1
                continue
            c.buf += data
            for tag, rc in parse_messages(c.buf):
                if tag == T_ENTRY:
                    c.entries += 1
                    continue
                if tag == T_REF:
                    continue
                t_done = now()
                measured = c.t_sent >= t_measure and t_done <= t_end
                ok = True
                if tag == T_EXT_RESP:
                    # unsolicited notification (e.g. notice of disconnection)
                    ok = False
                    error("unsolicited_%s" % rc, True)
                elif rc != 0:
                    ok = False
                    error("%s_rc_%s" % (c.kind, rc), measured)
                elif c.kind == "search" and c.entries != 1:
                    ok = False
                    error("search_entries_%d" % c.entries, measured)
                if measured:
                    res.ops += 1
                    lat.append((t_done - c.t_sent) * 1000.0)
                elif c.t_sent < t_measure:
                    res.warmup_ops += 1
                if not ok and tag == T_EXT_RESP:
                    kill(c, "closed_by_notice", False)
                    alive -= 1
                    break
                if t_done < t_end:
                    try:
                        send_next(c, t_done)
                    except OSError:
                        kill(c, "send_failed", True)
                        alive -= 1
                        break
    t_stop = now()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if ru0 is None:
        ru0, rt0 = ru1, t_stop
    res.cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res.wall_s = t_stop - rt0
    res.latencies_ms = lat.tobytes()

    # close politely, do not wait for outstanding responses
    for c in conns:
        if c.alive:
            try:
                c.sock.setblocking(True)
                c.sock.settimeout(1)
                c.sock.send(frame((c.msgid % 0x7FFFFFFF) + 1, UNBIND))
            except OSError:
                pass
            c.sock.close()
    ep.close()


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def percentile(sorted_vals, p: float) -> float:
    if not sorted_vals:
        return float("nan")
    # nearest-rank percentile
    k = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def _proc_cpu_s(pid: int | None, *, children: bool = True) -> float | None:
    """CPU seconds of ``pid``, with (``children``) those of its child processes, live or ended:
    ldapsync's Microsoft 365 worker and its other LDAP processes (``[ldap] processes``) are
    children of the server process."""
    if not pid:
        return None
    ticks = _ticks(pid, children)
    return None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")


def _ticks(pid: int, children: bool) -> int | None:
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime, stime, cutime, cstime are fields 14-17 (1-based); after ')' index 11..14
        ticks = sum(int(x) for x in fields[11:15 if children else 13])
    except (OSError, ValueError, IndexError):
        return None
    if children:
        ticks += sum(_ticks(child, True) or 0 for child in child_pids(pid))
    return ticks


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    out: list[int] = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def _machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is inside user)
    parts += [0] * (8 - len(parts))
    busy = parts[0] + parts[1] + parts[2] + parts[5] + parts[6]
    return busy, busy + parts[3] + parts[4] + parts[7]


def run_load(
    *,
    host: str,
    port: int,
    suffix: str,
    scenario: str,
    users: int,
    conns: int,
    duration: float,
    warmup: float,
    admin_dn: str,
    admin_password: str,
    user_password: str,
    procs: int,
    server_pid: int | None = None,
    seed: int = 1,
) -> dict:
    """Run one scenario and return the aggregated figures."""
    procs = max(1, min(procs, conns))
    ctx = mp.get_context("fork")
    ready_q = ctx.Queue()
    result_q = ctx.Queue()
    go = ctx.Event()
    start_val = ctx.Value("d", 0.0)
    workers = []
    per = [conns // procs + (1 if k < conns % procs else 0) for k in range(procs)]
    for k in range(procs):
        spec = WorkerSpec(
            host=host,
            port=port,
            suffix=suffix,
            scenario=scenario,
            users=users,
            nconns=per[k],
            admin_dn=admin_dn,
            admin_password=admin_password,
            user_password=user_password,
            warmup=warmup,
            duration=duration,
            seed=seed * 1000 + k,
        )
        p = ctx.Process(target=_worker, args=(spec, ready_q, go, start_val, result_q), daemon=True)
        p.start()
        workers.append(p)

    fatal = []
    deadline = time.monotonic() + 120
    nready = 0
    while nready + len(fatal) < procs and time.monotonic() < deadline:
        try:
            kind, pid, msg = ready_q.get(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            break
        if kind == "ready":
            nready += 1
        elif msg not in fatal:
            fatal.append(msg)
    start_val.value = time.monotonic() + 0.2
    go.set()

    # sample server and machine CPU over the measured window
    s_cpu0 = s_cpu1 = l_cpu0 = l_cpu1 = None
    m0 = m1 = (0, 0)
    if nready:
        t_measure = start_val.value + warmup
        time.sleep(max(0.0, t_measure - time.monotonic()))
        s_cpu0, l_cpu0 = _proc_cpu_s(server_pid), _proc_cpu_s(server_pid, children=False)
        m0 = _machine_busy()
        time.sleep(max(0.0, t_measure + duration - time.monotonic()))
        s_cpu1, l_cpu1 = _proc_cpu_s(server_pid), _proc_cpu_s(server_pid, children=False)
        m1 = _machine_busy()

    results: list[WorkerResult] = []
    deadline = time.monotonic() + 60
    while len(results) < procs and time.monotonic() < deadline:
        try:
            results.append(result_q.get(timeout=max(0.1, deadline - time.monotonic())))
        except Exception:
            break
    for p in workers:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)

    lat = array("d")
    ops = errors = warm = 0
    cpu = 0.0
    kinds: dict = {}
    for r in results:
        if r.fatal and r.fatal not in fatal:
            fatal.append(r.fatal)
        ops += r.ops
        errors += r.errors
        warm += r.warmup_ops
        cpu += r.cpu_s
        for k, v in r.error_kinds.items():
            kinds[k] = kinds.get(k, 0) + v
        a = array("d")
        a.frombytes(r.latencies_ms)
        lat.extend(a)
    vals = sorted(lat)
    out = {
        "ops": ops,
        "ops_per_s": round(ops / duration, 1) if duration else 0.0,
        "p50_ms": round(percentile(vals, 50), 3) if vals else None,
        "p99_ms": round(percentile(vals, 99), 3) if vals else None,
        "p999_ms": round(percentile(vals, 99.9), 3) if vals else None,   # what a pause of the server (GC) shows in
        "max_ms": round(vals[-1], 3) if vals else None,
        "errors": errors,
        "client_procs": procs,
        "client_cpu_pct": round(100.0 * cpu / duration, 1) if duration else None,
        "warmup_ops": warm,
    }
    if s_cpu0 is not None and s_cpu1 is not None:
        out["server_cpu_pct"] = round(100.0 * (s_cpu1 - s_cpu0) / duration, 1)
        if ops:
            out["server_cpu_us_per_op"] = round(1e6 * (s_cpu1 - s_cpu0) / ops, 1)
    if l_cpu0 is not None and l_cpu1 is not None and s_cpu1 is not None and s_cpu0 is not None:
        # the server process alone vs its children (ldapsync's Microsoft 365 worker process, its other LDAP processes)
        out["server_ldap_process_cpu_pct"] = round(100.0 * (l_cpu1 - l_cpu0) / duration, 1)
        out["server_children_cpu_pct"] = round(100.0 * ((s_cpu1 - s_cpu0) - (l_cpu1 - l_cpu0)) / duration, 1)
    busy = m1[0] - m0[0]
    total = m1[1] - m0[1]
    if total > 0:
        out["machine_cpu_pct"] = round(100.0 * os.cpu_count() * busy / total, 1)
    if kinds:
        out["error_kinds"] = kinds
    if fatal or len(results) < procs:
        out["client_failures"] = fatal or ["%d of %d client processes reported nothing" % (procs - len(results), procs)]
    return out


def machine_info(**extra: object) -> dict:
    """The ``machine`` JSON line every benchmark prints first (plus ``extra`` fields)."""
    import os
    import platform
    from pathlib import Path

    model, mem = "?", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"machine": {"nproc": os.cpu_count(), "cpu": model, "mem_gib": mem, "kernel": platform.release(),
                        "python": platform.python_version(), **extra}}
