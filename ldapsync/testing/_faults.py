"""The fake tenant's perturbations: injected faults, latency, outages, throttling (``FaultsMixin``).

Owns: the fault rules (``inject_fault``: status, count, target, path, after/drop) and the answer a
fault gives, outages ("503", "drop", "refuse"), the latency knob, and Graph's per-app directory
throttling (writes per window, resource units). ``_serving.py`` applies them around each operation;
the state is made in ``FakeTenant.__init__`` (``tenant.py``). Test double only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ._graph_users import DENIED
from ._http import GraphError, OAuthError, Req, Resp
from ._identity import TokenInfo

_WRITE_METHODS = {"POST", "PATCH", "DELETE", "PUT"}


@dataclass
class Fault:
    id: int
    status: int
    count: int | None                  # None: until cleared
    retry_after: float | None
    target: str                        # "graph" | "identity" | "any"
    method: str | None
    path: re.Pattern[str] | None
    after: bool                        # run the operation, then answer with the fault
    drop: bool                         # abort the connection instead of answering
    code: str | None
    message: str | None

    def matches(self, kind: str, req: Req) -> bool:
        return ((self.target in ("any", kind)) and (self.method is None or self.method == req.method)
                and (self.path is None or bool(self.path.search(req.path))))


_FAULT_CODES = {429: ("TooManyRequests", "Too many requests."),
                500: ("generalException", "An internal server error occurred."),
                502: ("BadGateway", "Bad gateway."),
                503: ("ServiceNotAvailable", "The service is temporarily unavailable. Please retry."),
                504: ("GatewayTimeout", "The gateway timed out."),
                401: ("InvalidAuthenticationToken", "Access token has expired or is not yet valid."),
                403: ("Authorization_RequestDenied", DENIED)}


class FaultsMixin:
    """Faults, latency, outages and throttling of ``FakeTenant``."""

    def inject_fault(self, status: int = 429, *, count: int | None = 1, retry_after: float | None = 1,
                     target: str = "graph", method: str | None = None, path: str | None = None,
                     after: bool = False, drop: bool = False, code: str | None = None,
                     message: str | None = None) -> int:
        """The next ``count`` matching operations (None: all until cleared) fail with ``status``.

        ``target``: "graph" (each Graph operation, including each $batch item), "identity" (token and
        discovery endpoints) or "any". ``path`` is a regex searched in the request path (e.g.
        ``/v1.0/users``). ``after=True`` performs the operation first, then fails (lost reply).
        ``drop=True`` aborts the TCP connection instead of answering (outer request only).
        """
        self._fault_ids += 1
        self.faults.append(Fault(self._fault_ids, status, count, retry_after, target,
                                 method.upper() if method else None,
                                 re.compile(path) if path else None, after, drop, code, message))
        return self._fault_ids

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_latency(self, seconds: float) -> None:
        """Delay every answer (not the admin API) by ``seconds``."""
        self.latency = float(seconds)

    def outage(self, seconds: float | None = None, mode: str = "503") -> None:
        """Everything (sign-in and Graph) fails for ``seconds`` (None: until ``end_outage``).

        mode "503": answers 503; "drop": accepts and resets connections; "refuse": stops listening
        (connection refused) and listens again on the same port afterwards.
        """
        if mode not in ("503", "drop", "refuse"):
            raise ValueError(mode)
        self._outage_until = math.inf if seconds is None else self.wall_time() + seconds
        self._outage_mode = mode
        if mode == "refuse" and self._listening is not None:
            self._refused = self._listening.stopListening()
            self._listening = None
            for channel in list(getattr(self._site, "channels", ())):
                channel.transport.abortConnection()
            if seconds is not None:
                self.reactor.callLater(seconds, self.end_outage)

    def end_outage(self) -> None:
        self._outage_until = None
        if self._outage_mode == "refuse" and self._listening is None and self.port is not None:
            self._outage_mode = "503"

            def relisten(_: Any) -> None:
                self._listening = self.reactor.listenSSL(self.port, self._site, self._tls,
                                                         interface=self.host)
            self._refused.addCallback(relisten)

    def _in_outage(self) -> bool:
        if self._outage_until is None:
            return False
        if self.wall_time() >= self._outage_until:
            self._outage_until = None
            return False
        return True

    def configure_throttling(self, *, enabled: bool | None = None, writes: int | None = None,
                             window: float | None = None, resource_units: int | None = None,
                             ru_window: float | None = None) -> dict[str, Any]:
        """Directory throttling per app: ``writes`` per ``window`` s (3000/150 s), and resource units
        per ``ru_window`` s (default by tenant size: 3500 / 5000 / 8000)."""
        for key, value in (("enabled", enabled), ("writes", writes), ("window", window),
                           ("resource_units", resource_units), ("ru_window", ru_window)):
            if value is not None:
                self.throttling[key] = value
        return dict(self.throttling)

    def reset_throttling(self) -> None:
        self._writes.clear()
        self._units.clear()
        self._unit_sums.clear()

    def _throttle(self, token: TokenInfo, req: Req, rel: str) -> dict[str, str]:
        cfg = self.throttling
        cost = (2 - ("$select" in req.query)) if (req.method == "GET" and rel == "/users") else 1
        headers = {"x-ms-resource-unit": str(cost)}
        if not cfg["enabled"]:
            return headers
        now, app = self.wall_time(), token.client_id
        writes, units = self._writes[app], self._units[app]
        while writes and writes[0] <= now - cfg["window"]:
            writes.popleft()
        while units and units[0][0] <= now - cfg["ru_window"]:
            self._unit_sums[app] -= units.popleft()[1]
        n = len(self.users)
        ru_limit = cfg["resource_units"] or (3500 if n < 50 else 5000 if n <= 500 else 8000)
        scope = f"Tenant_Application/ReadWrite/{self.tenant_id}/{app}"
        is_write = req.method in _WRITE_METHODS
        if is_write and len(writes) >= cfg["writes"]:
            wait = max(1, math.ceil(writes[0] + cfg["window"] - now))
            raise GraphError(429, "TooManyRequests", "Too many requests. The write limit for this "
                             "application in this tenant was exceeded.",
                             headers={"Retry-After": str(wait), "x-ms-throttle-scope": scope,
                                      "x-ms-throttle-information": "WriteLimitExceeded"})
        if self._unit_sums[app] + cost > ru_limit:
            wait = max(1, math.ceil(units[0][0] + cfg["ru_window"] - now))
            raise GraphError(429, "TooManyRequests", "Too many requests. The resource unit limit "
                             "for this application in this tenant was exceeded.",
                             headers={"Retry-After": str(wait), "x-ms-throttle-scope": scope,
                                      "x-ms-throttle-information": "ResourceUnitLimitExceeded"})
        units.append((now, cost))
        self._unit_sums[app] += cost
        if is_write:
            writes.append(now)
        used = max(len(writes) / cfg["writes"], self._unit_sums[app] / ru_limit)
        if used > 0.8:
            headers["x-ms-throttle-limit-percentage"] = f"{min(used, 1.8):.1f}"
        return headers

    def _take_fault(self, kind: str, req: Req) -> Fault | None:
        for fault in self.faults:
            if fault.matches(kind, req):
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def _fault_response(self, kind: str, req: Req, status: int, retry_after: float | None,
                        code: str | None, message: str | None) -> Resp:
        headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after is not None else {}
        if kind == "identity":
            error = "temporarily_unavailable" if status in (429, 503) else "server_error"
            return OAuthError(status, code or error, 50196 if status == 429 else 90033,
                              message or "The server is temporarily unable to handle the request.",
                              headers).response(req)
        default_code, default_message = _FAULT_CODES.get(status, ("UnknownError", "Fault injected."))
        return GraphError(status, code or default_code, message or default_message,
                          headers=headers).response(req)
