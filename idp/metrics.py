"""Prometheus metrics (SPEC O3): requests by route (count and latency), logins
by method and outcome, token requests by grant and outcome, new lockouts, and
every audit event by kind. Each process counts its own: scrape them all. The workers of
one ``idp serve --workers N`` count in one directory (prometheus_client's
PROMETHEUS_MULTIPROC_DIR), and any of them answers with the sum."""

from __future__ import annotations

import os
import time

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"})  # the request timer's own labels


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "idp_http_request_seconds", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=self.registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.events = Counter("idp_audit_events", "Audit events by kind", ["event"], registry=self.registry)
        self.logins = Counter("idp_logins", "Login attempts by factor method and outcome (success, failure, "
                              "locked, disabled, paused: a push or mobile-ID request not sent after too many "
                              "unanswered); a portal's login by single sign-on is method sso, success",
                              ["method", "outcome"], registry=self.registry)
        self.token_requests = Counter("idp_token_requests", "Token endpoint requests by grant type and outcome "
                                      "(issued, or the OAuth error)", ["grant_type", "outcome"], registry=self.registry)
        self.lockouts = Counter("idp_lockouts", "Accounts locked after too many wrong answers", registry=self.registry)
        # Logins queue for the hashing threads (IDP_HASH_THREADS) when argon2 is the bottleneck.
        self.hash_wait = Histogram(
            "idp_password_hash_wait_seconds", "Time a password hash or check waited for a hashing thread",
            registry=self.registry, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.hash_time = Histogram(
            "idp_password_hash_seconds", "Time one password hash or check (argon2) took on its thread",
            registry=self.registry, buckets=(0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25),
        )
        self.hash_cpu = Counter(
            "idp_password_hash_cpu_seconds", "CPU time of the password hashes and checks on their threads "
            "(below idp_password_hash_seconds' sum when those threads wait for a core)", registry=self.registry,
        )
        self._children: dict = {}

    def child(self, metric, *labels):
        """``metric.labels(*labels)``, kept: prometheus_client checks and locks on every call,
        a few µs on each request's path for the same few children."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def audited(self, event: str, method: str | None) -> None:
        self.child(self.events, event).inc()
        if outcome := _LOGIN_OUTCOMES.get(event):
            self.login(method or "unknown", outcome)

    def login(self, method: str, outcome: str) -> None:
        """A login attempt: counted with its audit event, or alone where it writes none."""
        self.child(self.logins, method, outcome).inc()

    def password_hash(self, waited: float, took: float, cpu: float) -> None:
        self.hash_wait.observe(waited)
        self.hash_time.observe(took)
        self.hash_cpu.inc(cpu)

    def token_request(self, grant_type: str | None, response) -> None:
        """Count one token response; labels only from fixed sets, whatever a client sent."""
        grant = grant_type if grant_type in _GRANTS else "other"
        outcome = "issued"
        if response.status_code != 200:
            try:
                outcome = orjson.loads(response.body).get("error")
            except (orjson.JSONDecodeError, AttributeError):
                outcome = None
            outcome = outcome if outcome in _TOKEN_ERRORS else "error"
        self.child(self.token_requests, grant, outcome).inc()

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


_LOGIN_OUTCOMES = {"login.success": "success", "login.sso": "success", "login.failure": "failure",
                   "login.locked": "locked", "login.disabled": "disabled", "login.push_refused": "paused"}
_GRANTS = {"authorization_code", "refresh_token", "client_credentials"}
_TOKEN_ERRORS = {"invalid_request", "invalid_client", "invalid_grant", "unauthorized_client",
                 "unsupported_grant_type", "invalid_scope", "invalid_dpop_proof"}


class RequestMetrics:
    """ASGI middleware timing each request under its route template (never the raw
    path, which would carry tokens and explode the label set)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def record_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            # The methods the provider serves; any other a client sends (PROPFIND, made-up
            # ones) is one label, not a new series for each.
            method = scope["method"] if scope["method"] in METHODS else "other"
            labels = (name, method, str(status[0]))
            self.metrics.child(self.metrics.requests, *labels).observe(time.perf_counter() - start)
