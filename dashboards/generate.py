#!/usr/bin/env python3
"""Generates the connscope Grafana dashboards (classic JSON, schemaVersion 41).

The JSON files beside this script are its output and are what users import; edit this
script, then run `python3 dashboards/generate.py` to rewrite them (tests/tests/assets_dashboards.rs
fails when the committed JSON and the script disagree). Standard library only.

Conventions every panel follows (checked by tests/tests/assets_dashboards.rs):
- datasource is the `${datasource}` variable, never a uid;
- every rate()/increase() uses `$__rate_interval`;
- every panel has a unit and a description;
- `namespace=~"$namespace"` only on the metrics that carry Kubernetes labels
  (connections_opened_total, connections_closed_total, connect_duration_seconds,
  connect_failures_total, connections_time_wait, client_ports_in_use); its All value is
  `.*`, which also
  matches series without the label (plain hosts).

Every dashboard must also type-check against Grafana's own types (@grafana/schema, with the
panel plugins' option types): tests/tests/assets_grafana_schema.rs, types in
tests/node/grafana-dashboard.ts. That is why stat panels set showPercentChange, tables
frameIndex, heatmaps showValue, and query variables have no `definition` field.
"""

import json
import os
import sys

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Label matchers of the selected agents, for every connscope series; the second one also
# filters by namespace, for the series that carry Kubernetes labels.
AGENTS = 'job=~"$job", instance=~"$instance"'
AGENTS_IN_NAMESPACE = AGENTS + ', namespace=~"$namespace"'
RATE_RANGE = "[$__rate_interval]"
FLOW = "role, process, server"
# prometheus-client writes bucket bounds as floats (le="1.0"), Prometheus 3 normalises
# them to that form too, older servers keep what was scraped: match both spellings.
AT_MOST_ONE_REQUEST = 'le=~"1|1.0"'
CLIENT = 'role="client"'
LOCAL_FIN = 'closed_by="local", close_kind="fin"'  # the active closer holds TIME_WAIT
RESET = 'close_kind="reset"'
HTTP10 = 'http_version="1.0"'
HTTP2 = 'http_version="2"'
PROTOCOL_HTTP2 = 'protocol="http2"'
HEADER_CLOSE = 'reason=~"connection_close|http10"'


def rate(metric, sel=AGENTS, extra=""):
    inner = sel + (", " + extra if extra else "")
    return f"rate({metric}{{{inner}}}{RATE_RANGE})"


def target(expr, legend="", ref="A", instant=False, fmt=None):
    t = {"datasource": DATASOURCE, "expr": expr, "refId": ref, "legendFormat": legend or "__auto"}
    if instant:
        t.update({"instant": True, "range": False, "format": fmt or "table"})
    else:
        t.update({"instant": False, "range": True, "format": fmt or "time_series"})
    return t


class Layout:
    """Places panels left to right, wrapping at 24 columns."""

    def __init__(self):
        self.x, self.y, self.row_h, self.next_id = 0, 0, 0, 1

    def place(self, panel, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["id"] = self.next_id
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        return panel

    def row(self, title):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        p = {"type": "row", "title": title, "collapsed": False, "panels": []}
        self.place(p, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0
        return p


def base_panel(kind, title, desc, unit, targets):
    return {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
    }


def timeseries(title, desc, unit, targets, stack=False, decimals=None, min0=True):
    p = base_panel("timeseries", title, desc, unit, targets)
    d = p["fieldConfig"]["defaults"]
    d["custom"] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 25 if stack else 5,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    if min0:
        d["min"] = 0
    if decimals is not None:
        d["decimals"] = decimals
    p["options"] = {
        "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                   "calcs": ["mean", "max", "lastNotNull"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return p


def stat(title, desc, unit, expr, decimals=None, thresholds=None):
    p = base_panel("stat", title, desc, unit, [target(expr, legend=title)])
    d = p["fieldConfig"]["defaults"]
    d["color"] = {"mode": "thresholds"}
    d["thresholds"] = {"mode": "absolute", "steps": thresholds or [{"color": "green", "value": None}]}
    if decimals is not None:
        d["decimals"] = decimals
    p["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
        "orientation": "auto", "textMode": "auto", "wideLayout": True,
        "showPercentChange": False, "percentChangeColorMode": "standard",
    }
    return p


def table(title, desc, unit, targets, rename, sort_by, overrides=None):
    p = base_panel("table", title, desc, unit, targets)
    p["fieldConfig"]["overrides"] = overrides or []
    p["options"] = {"showHeader": True, "cellHeight": "sm", "frameIndex": 0,
                    "sortBy": [{"displayName": sort_by, "desc": True}]}
    transforms = []
    if len(targets) > 1:
        transforms.append({"id": "merge", "options": {}})
    transforms.append({"id": "organize", "options": {
        "excludeByName": {"Time": True}, "indexByName": {}, "renameByName": rename}})
    p["transformations"] = transforms
    return p


def heatmap(title, desc, yunit, expr):
    # Cells are counts of observations per bucket per interval; the y axis is the bucket.
    p = base_panel("heatmap", title, desc, "short", [target(expr, legend="{{le}}", fmt="heatmap")])
    p["options"] = {
        "calculate": False,
        "showValue": "auto",
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "fill": "dark-orange",
                  "reverse": False, "scale": "exponential", "steps": 64},
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
        "filterValues": {"le": 1e-9},
        "legend": {"show": True},
        "rowsFrame": {"layout": "auto"},
        "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
        "yAxis": {"axisPlacement": "left", "reverse": False, "unit": yunit},
    }
    return p


def quantiles(metric, by, sel=AGENTS, extra=""):
    """p50/p90/p99 targets of a histogram, grouped by `by`."""
    out = []
    for ref, q in (("A", "0.5"), ("B", "0.9"), ("C", "0.99")):
        expr = f"histogram_quantile({q}, sum by (le, {by}) ({rate(metric + '_bucket', sel, extra)}))"
        legend = " ".join("{{%s}}" % b.strip() for b in by.split(",")) + f" p{q[2:].ljust(2, '0')}"
        out.append(target(expr, legend=legend, ref=ref))
    return out


def variables():
    def query_var(name, label, query, desc, all_value):
        return {
            "type": "query", "name": name, "label": label, "description": desc,
            "datasource": DATASOURCE,
            "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "regex": "", "sort": 1,
            "includeAll": True, "allValue": all_value, "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [], "hide": 0, "skipUrlSync": False,
        }

    return {"list": [
        {"type": "datasource", "name": "datasource", "label": "Data source",
         "description": "Prometheus server that scrapes the connscope agents.",
         "query": "prometheus", "regex": "", "refresh": 1, "hide": 0, "includeAll": False,
         "multi": False, "options": [], "skipUrlSync": False},
        query_var("job", "Job", "label_values(connscope_build_info, job)",
                  "Prometheus job(s) that scrape connscope.", ".+"),
        query_var("instance", "Instance", 'label_values(connscope_build_info{job=~"$job"}, instance)',
                  "Agent instance(s): one per node or host.", ".+"),
        query_var("namespace", "Namespace",
                  'label_values(connscope_connections_opened_total{job=~"$job", instance=~"$instance"}, namespace)',
                  "Kubernetes namespace of the local pod. Filters the panels built on "
                  "connections opened/closed (the metrics that carry Kubernetes labels); "
                  "All also matches plain hosts, where the label is absent.", ".*"),
    ]}


def dashboard(uid, title, desc, panels, tags):
    links = [{"title": "connscope", "type": "dashboards", "tags": ["connscope"], "asDropdown": True,
              "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False,
              "tooltip": "", "url": ""}]
    return {
        "uid": uid, "title": title, "description": desc,
        "tags": ["connscope"] + tags,
        "editable": True, "graphTooltip": 1, "fiscalYearStartMonth": 0, "liveNow": False,
        "schemaVersion": 41, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "timezone": "browser",
        "weekStart": "",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": links,
        "templating": variables(),
        "panels": panels,
    }


# ---------------------------------------------------------------------------------------
def overview():
    layout = Layout()
    panels = []
    opened = f"sum({rate('connscope_connections_opened_total', AGENTS_IN_NAMESPACE)})"
    panels.append(layout.row("Connections and reuse"))
    panels.append(layout.place(stat("Connections opened /s",
        "New TCP connections per second seen by the selected agents (client and server roles). "
        "A high number with few requests per connection means churn.",
        "cps", opened, decimals=1), 5, 4))
    panels.append(layout.place(stat("Connections closed /s",
        "TCP connections closed per second (FIN or reset), both roles.",
        "cps", f"sum({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE)})", decimals=1), 5, 4))
    panels.append(layout.place(stat("Requests per connection",
        "Mean exchanges (HTTP requests, or request/response turns for other protocols) carried "
        "by a connection, over connections closed in the interval. 1 means no reuse at all.",
        "none",
        f"sum({rate('connscope_connection_requests_sum')}) / sum({rate('connscope_connection_requests_count')})",
        decimals=1,
        thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 1.5},
                    {"color": "green", "value": 3}]), 5, 4))
    panels.append(layout.place(stat("One-request connections",
        "Share of closed connections that carried at most one request: each cost a handshake "
        "and, on the side that closed first, a TIME_WAIT entry.",
        "percentunit",
        f"sum({rate('connscope_connection_requests_bucket', AGENTS, AT_MOST_ONE_REQUEST)}) / sum({rate('connscope_connection_requests_count')})",
        decimals=1,
        thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.3},
                    {"color": "red", "value": 0.7}]), 5, 4))
    panels.append(layout.place(stat("Open connections",
        "Connections currently open and tracked by the agents (active plus idle).",
        "short", "sum(connscope_connections_open{%s})" % AGENTS), 4, 4))

    panels.append(layout.place(timeseries("Connections opened and closed /s by role",
        "Connections opened and closed per second, split by role: client = the local process "
        "called connect(), server = the local process accepted. Opened above closed for long "
        "means connections pile up.",
        "cps", [
            target(f"sum by (role) ({rate('connscope_connections_opened_total', AGENTS_IN_NAMESPACE)})", "opened {{role}}", "A"),
            target(f"sum by (role) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE)})", "closed {{role}}", "B"),
        ]), 12, 8))
    panels.append(layout.place(timeseries("Open connections: active vs idle",
        "Open connections by state: active = an exchange is in progress, idle = kept alive "
        "and waiting for the next request. Many idle connections is what keep-alive pools look "
        "like; many active ones with churn means reuse is failing.",
        "short", [
            target("sum by (state) (connscope_connections_open{%s})" % AGENTS, "{{state}}", "A"),
        ], stack=True), 12, 8))

    panels.append(layout.place(timeseries("Requests per connection by role",
        "Mean requests per connection by role (exchanges over connections closed in the "
        "interval) and the median from the histogram. Question 1: do flows reuse connections.",
        "none", [
            target(f"sum by (role) ({rate('connscope_connection_requests_sum')}) / "
                   f"sum by (role) ({rate('connscope_connection_requests_count')})", "mean {{role}}", "A"),
            target(f"histogram_quantile(0.5, sum by (le, role) ({rate('connscope_connection_requests_bucket')}))",
                   "p50 {{role}}", "B"),
        ], decimals=1), 12, 8))
    panels.append(layout.place(timeseries("Share of one-request connections by role",
        "Fraction of closed connections that carried at most one request, by role. Near 100% "
        "means the flow opens a connection per request (no keep-alive).",
        "percentunit", [
            target(f"sum by (role) ({rate('connscope_connection_requests_bucket', AGENTS, AT_MOST_ONE_REQUEST)}) / "
                   f"sum by (role) ({rate('connscope_connection_requests_count')})", "{{role}}", "A"),
        ], decimals=1), 12, 8))

    panels.append(layout.row("Traffic"))
    panels.append(layout.place(timeseries("HTTP requests /s by version",
        "HTTP/1.x requests per second parsed from the connections, by protocol version. "
        "HTTP/1.0 closes after each response unless both sides ask for keep-alive.",
        "reqps", [
            target(f"sum by (http_version) ({rate('connscope_http_requests_total')})", "HTTP/{{http_version}}", "A"),
        ], stack=True), 12, 8))
    panels.append(layout.place(timeseries("Bytes /s by role",
        "Payload bytes sent and received per second on tracked connections, by role.",
        "Bps", [
            target(f"sum by (role) ({rate('connscope_bytes_sent_total')})", "sent {{role}}", "A"),
            target(f"sum by (role) ({rate('connscope_bytes_received_total')})", "received {{role}}", "B"),
        ]), 12, 8))

    panels.append(layout.row("Flows"))
    panels.append(layout.place(table("Flows: reuse at a glance",
        "Per flow (role, local process, server ip:port): new connections per second, requests "
        "per second and mean requests per connection. Sort by a column to find the flows that "
        "churn; the Churn dashboard goes deeper.",
        "none", [
            target(f"sum by ({FLOW}) ({rate('connscope_connections_opened_total', AGENTS_IN_NAMESPACE)})", ref="A", instant=True),
            target(f"sum by ({FLOW}) ({rate('connscope_http_requests_total')})", ref="B", instant=True),
            target(f"sum by ({FLOW}) ({rate('connscope_connection_requests_sum')}) / "
                   f"sum by ({FLOW}) ({rate('connscope_connection_requests_count')})", ref="C", instant=True),
        ], {"Value #A": "connections opened /s", "Value #B": "HTTP requests /s",
            "Value #C": "requests per connection"}, "connections opened /s",
        overrides=[
            {"matcher": {"id": "byName", "options": "connections opened /s"},
             "properties": [{"id": "unit", "value": "cps"}, {"id": "decimals", "value": 2}]},
            {"matcher": {"id": "byName", "options": "HTTP requests /s"},
             "properties": [{"id": "unit", "value": "reqps"}, {"id": "decimals", "value": 2}]},
            {"matcher": {"id": "byName", "options": "requests per connection"},
             "properties": [{"id": "decimals", "value": 1}]},
        ]), 24, 10))
    return dashboard("connscope-overview", "connscope / Overview",
                     "Connections opened and closed, requests per connection, one-request connections, "
                     "open connections active vs idle.", panels, ["overview"])


def keepalive():
    layout = Layout()
    panels = []
    panels.append(layout.row("Reuse: requests per connection"))
    panels.append(layout.place(heatmap("Requests per connection (distribution)",
        "How many requests connections carried, observed when they closed: each column is an "
        "interval, each cell the number of connections closed with that many requests. A band at "
        "1 is churn; a band at the server's max requests means the server caps reuse.",
        "none",
        f"sum by (le) (increase(connscope_connection_requests_bucket{{{AGENTS}}}{RATE_RANGE}))"), 12, 9))
    panels.append(layout.place(timeseries("Requests per connection percentiles by role",
        "p50, p90 and p99 of requests per connection by role (at close). Question 1: how many "
        "requests does a connection carry.",
        "none", quantiles("connscope_connection_requests", "role"), decimals=1), 12, 9))
    panels.append(layout.row("Idle time"))
    panels.append(layout.place(heatmap("Idle gap between requests (distribution)",
        "Time a connection sat idle between the end of one exchange and the next request. "
        "Gaps close to a timeout (5, 15, 60, 75 s) are the connections at risk of a keep-alive race.",
        "s",
        f"sum by (le) (increase(connscope_connection_idle_seconds_bucket{{{AGENTS}}}{RATE_RANGE}))"), 12, 9))
    panels.append(layout.place(timeseries("Idle gap between requests percentiles by role",
        "p50, p90 and p99 of the idle gap between exchanges on reused connections, by role. "
        "Question 2: how long are connections idle between requests.",
        "s", quantiles("connscope_connection_idle_seconds", "role")), 12, 9))
    panels.append(layout.place(timeseries("Idle time before close by who closed",
        "p50, p90 and p99 of the idle time from the last exchange to the close, by who closed "
        "(local or peer). A sharp p50 at N seconds is an idle timeout of N seconds on that side. "
        "Question 2: how long before idle connections are closed.",
        "s", quantiles("connscope_connection_close_idle_seconds", "closed_by")), 12, 9))
    panels.append(layout.place(timeseries("Client idle gap p99 vs server advertised timeout",
        "For client connections: p99 of the idle gap before reusing a connection, per server, "
        "next to the keep-alive timeout that server advertises. A client idle gap at or above "
        "the server timeout means the client pool keeps connections longer than the server does: "
        "the cause of keep-alive races.",
        "s", [
            target(f"histogram_quantile(0.99, sum by (le, server) ({rate('connscope_connection_idle_seconds_bucket', AGENTS, CLIENT)}))",
                   "client idle p99 → {{server}}", "A"),
            target('max by (server) (connscope_http_keepalive_advertised_timeout_seconds{%s})' % AGENTS,
                   "advertised timeout {{server}}", "B"),
        ]), 12, 9))
    panels.append(layout.row("Who closes, and why"))
    panels.append(layout.place(timeseries("Close reasons /s",
        "Connections closed per second by reason: connection_close (a Connection: close header), "
        "http10 (HTTP/1.0 without keep-alive), max_requests (the Keep-Alive max was reached), "
        "idle (closed while idle: an idle timeout), reset, error, unknown. Question 3: why.",
        "cps", [
            target(f"sum by (reason) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE)})", "{{reason}}", "A"),
        ], stack=True), 12, 9))
    panels.append(layout.place(timeseries("Who closes first, by role",
        "Closes per second by role, who closed first (local = this host sent the first FIN or "
        "RST, peer = the other end did) and how (fin or reset). For a client, local/fin means the "
        "client's idle timer fired first; peer/fin means the server closed first. Question 3.",
        "cps", [
            target(f"sum by (role, closed_by, close_kind) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE)})",
                   "{{role}}: {{closed_by}} {{close_kind}}", "A"),
        ]), 12, 9))
    panels.append(layout.place(table("Who closes first: share by role",
        "For each role, the share of connections closed first by each side and how. Sums to 100% "
        "per role.",
        "percentunit", [
            target(f"sum by (role, closed_by, close_kind) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE)}) "
                   f"/ on (role) group_left () sum by (role) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE)})",
                   ref="A", instant=True),
        ], {"Value": "share", "role": "role", "closed_by": "closed by", "close_kind": "kind"}, "share"),
        12, 9))
    panels.append(layout.place(table("Advertised keep-alive per server",
        "Last Keep-Alive header values seen per server: timeout (seconds a connection may idle) "
        "and max (requests the server will still serve on the connection). Question 5: which "
        "timeouts does each side advertise.",
        "s", [
            target('max by (server) (connscope_http_keepalive_advertised_timeout_seconds{%s})' % AGENTS, ref="A", instant=True),
            target('max by (server) (connscope_http_keepalive_advertised_max_requests{%s})' % AGENTS, ref="B", instant=True),
        ], {"Value #A": "timeout", "Value #B": "max requests"}, "timeout",
        overrides=[{"matcher": {"id": "byName", "options": "max requests"},
                    "properties": [{"id": "unit", "value": "none"}]}]), 12, 9))
    panels.append(layout.row("Keep-alive races"))
    panels.append(layout.place(timeseries("Keep-alive races /s by flow",
        "Requests sent on a connection the peer was already closing, or reset right after a "
        "request on a reused connection. Each one surfaces as ECONNRESET in a client or a 502 at "
        "a proxy. Fix: make the client's pool idle timeout shorter than the server's keep-alive "
        "timeout. Question 5.",
        "cps", [
            target(f"sum by ({FLOW}) ({rate('connscope_keepalive_races_total')})",
                   "{{role}} {{process}} → {{server}}", "A"),
        ]), 12, 9))
    panels.append(layout.place(timeseries("Keep-alive races per 1000 requests by flow",
        "Races relative to traffic: races per 1000 HTTP requests on the flow.",
        "none", [
            target(f"1000 * sum by ({FLOW}) ({rate('connscope_keepalive_races_total')}) / "
                   f"sum by ({FLOW}) ({rate('connscope_http_requests_total')})",
                   "{{role}} {{process}} → {{server}}", "A"),
        ], decimals=2), 12, 9))
    panels.append(layout.row("HTTP/2 and gRPC: streams per connection, concurrency, GOAWAY"))
    panels.append(layout.place(timeseries("HTTP/2 streams per connection by flow",
        "Streams the client opened per HTTP/2 connection. Live: streams per second over the "
        "flow's open connections (a gRPC channel holding one connection with 100 streams shows "
        "as one connection carrying them all, pinning its load to one backend). At close: the "
        "mean streams per closed connection.",
        "none", [
            target(f"sum by ({FLOW}) ({rate('connscope_http_requests_total', AGENTS, HTTP2)}) / "
                   f"sum by ({FLOW}) (connscope_connections_open{{{AGENTS}}})",
                   "streams/s per open connection {{role}} {{process}} → {{server}}", "A"),
            target(f"sum by ({FLOW}) ({rate('connscope_connection_requests_sum', AGENTS, PROTOCOL_HTTP2)}) / "
                   f"sum by ({FLOW}) ({rate('connscope_connection_requests_count', AGENTS, PROTOCOL_HTTP2)})",
                   "streams per closed connection {{role}} {{process}} → {{server}}", "B"),
        ], decimals=1), 12, 9))
    panels.append(layout.place(timeseries("HTTP/2 streams in flight at each opening",
        "p50 and p99 of the streams in flight when a stream opened (itself included), by flow, "
        "from connections that closed: 1 throughout is a connection used like HTTP/1.1, more is "
        "multiplexing.",
        "none", quantiles("connscope_http2_concurrent_streams", FLOW), decimals=1), 12, 9))
    panels.append(layout.place(timeseries("HTTP/2 closes by GOAWAY",
        "HTTP/2 connections closed per second by their first GOAWAY: server_goaway (graceful: a "
        "max connection age, an idle timeout, a shutdown; a steady rate at one per connection "
        "age is a server churning its pool), client_goaway, and the _error/_other codes.",
        "cps", [
            target(f"sum by (role, reason) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE, PROTOCOL_HTTP2)})",
                   "{{role}}: {{reason}}", "A"),
        ], stack=True), 12, 9))
    return dashboard("connscope-keepalive", "connscope / Keep-alive",
                     "Requests per connection, idle gaps, who closes first and why, advertised "
                     "keep-alive timeouts and keep-alive races.", panels, ["keepalive"])


def churn():
    layout = Layout()
    panels = []
    panels.append(layout.row("Where new connections come from"))
    panels.append(layout.place(table("Top flows by new connections per request",
        "Flows that open the most connections per HTTP request (1 = a connection per request, "
        "no reuse; near 0 = good reuse), with their connection rate. Typical causes: a proxy "
        "without upstream keep-alive, a client created per request, HTTP/1.0, Connection: close. "
        "Question 4.",
        "none", [
            target(f"topk(20, sum by ({FLOW}) ({rate('connscope_connections_opened_total', AGENTS_IN_NAMESPACE)}) / "
                   f"(sum by ({FLOW}) ({rate('connscope_http_requests_total')}) > 0))", ref="A", instant=True),
            target(f"sum by ({FLOW}) ({rate('connscope_connections_opened_total', AGENTS_IN_NAMESPACE)})", ref="B", instant=True),
        ], {"Value #A": "new connections per request", "Value #B": "connections opened /s"},
        "new connections per request",
        overrides=[
            {"matcher": {"id": "byName", "options": "new connections per request"},
             "properties": [{"id": "decimals", "value": 2}]},
            {"matcher": {"id": "byName", "options": "connections opened /s"},
             "properties": [{"id": "unit", "value": "cps"}, {"id": "decimals", "value": 2}]},
        ]), 24, 10))
    panels.append(layout.place(timeseries("Top 10 flows by connections opened /s",
        "New connections per second for the ten busiest flows (role, process, server).",
        "cps", [
            target(f"topk(10, sum by ({FLOW}) ({rate('connscope_connections_opened_total', AGENTS_IN_NAMESPACE)}))",
                   "{{role}} {{process}} → {{server}}", "A"),
        ]), 12, 9))
    panels.append(layout.place(timeseries("Top 10 flows by one-request connections /s",
        "Connections per second that closed after at most one request, for the ten worst flows.",
        "cps", [
            target(f"topk(10, sum by ({FLOW}) ({rate('connscope_connection_requests_bucket', AGENTS, AT_MOST_ONE_REQUEST)}))",
                   "{{role}} {{process}} → {{server}}", "A"),
        ]), 12, 9))
    panels.append(layout.row("Cost of churn"))
    connect_time = rate("connscope_connect_duration_seconds_bucket", AGENTS_IN_NAMESPACE)
    panels.append(layout.place(timeseries("Connect time p50 / p99 by client flow",
        "Handshake time of new client connections, from the SYN to ESTABLISHED, per process "
        "and server: every new connection pays it on the request's path. Past 1 s a SYN was "
        "retransmitted (a full listen queue, loss). Question 4.",
        "s", [
            target(f"histogram_quantile(0.5, sum by (le, process, server) ({connect_time}))",
                   "{{process}} → {{server}} p50", "A"),
            target(f"histogram_quantile(0.99, sum by (le, process, server) ({connect_time}))",
                   "{{process}} → {{server}} p99", "B"),
        ]), 12, 9))
    panels.append(layout.place(timeseries("Failed connects /s by reason",
        "Client connects that never reached ESTABLISHED, per process, server and reason: "
        "refused (reset), timeout (SYN retries exhausted), unreachable (ICMP), no_local_port "
        "(ephemeral ports exhausted for the destination), abandoned (the application gave up), "
        "other.",
        "cps", [
            target(f"sum by (process, server, reason) ({rate('connscope_connect_failures_total', AGENTS_IN_NAMESPACE)}) > 0",
                   "{{process}} → {{server}} {{reason}}", "A"),
        ], stack=True), 12, 9))
    panels.append(layout.place(timeseries("SYNs dropped at full accept queues /s by network namespace",
        "Connection attempts a server's full accept queue dropped (TcpExt ListenOverflows), per "
        "host and network namespace (netns: its inode number): each dropped SYN costs its client "
        "a retransmit, 1 s or more. Per namespace: the kernel does not count them per port.",
        "cps", [
            target(f"sum by (instance, netns) ({rate('connscope_listen_overflows_total')})",
                   "{{instance}} netns {{netns}}", "A"),
        ]), 24, 8))
    panels.append(layout.place(timeseries("Sockets in TIME_WAIT by flow (top 10)",
        "Sockets each flow holds in TIME_WAIT now: its connections this host closed first, "
        "which Linux keeps 60 s (counted every 5 s from the sockets of each network namespace). "
        "Unattributed: TIME_WAIT sockets of a host's namespaces no flow accounts for (closed "
        "before the agent started, or unseen). Question 4.",
        "short", [
            target(f"topk(10, sum by ({FLOW}) (connscope_connections_time_wait{{{AGENTS_IN_NAMESPACE}}}) > 0)",
                   "{{role}} {{process}} → {{server}}", "A"),
            target(f"sum by (instance) (connscope_connections_time_wait_unattributed{{{AGENTS}}}) > 0",
                   "{{instance}} unattributed", "B"),
        ]), 12, 9))
    panels.append(layout.place(timeseries("Ephemeral ports held against the range, by destination",
        "Share of the local port range that client sockets (open or in TIME_WAIT) hold toward "
        "each server, per host and network namespace: every process of a namespace picks its "
        "ports from the same range (ip_local_port_range less ip_local_reserved_ports). At 100% "
        "the next connect to that server fails with no_local_port. Question 4.",
        "percentunit", [
            target(f"sum by (instance, netns, server) (connscope_client_ports_in_use{{{AGENTS_IN_NAMESPACE}}}) "
                   f"/ on (instance, netns) group_left () "
                   f"max by (instance, netns) (connscope_client_port_range_size{{{AGENTS}}})",
                   "{{instance}} netns {{netns}} → {{server}}", "A"),
        ]), 12, 9))
    panels.append(layout.row("TIME_WAIT"))
    tw = f"sum({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE, LOCAL_FIN)})"
    panels.append(layout.place(stat("TIME_WAIT created /s (local side)",
        "Sockets entering TIME_WAIT per second on the selected hosts: connections this host "
        "closed first with a FIN (the active closer holds TIME_WAIT).",
        "cps", tw, decimals=1), 6, 5))
    panels.append(layout.place(stat("TIME_WAIT held now",
        "Sockets of the selected flows in TIME_WAIT now (connections_time_wait, counted every "
        "5 s), about the creation rate times the 60 s Linux keeps them. The ports they hold "
        "against the range are in the Cost of churn row.",
        "short", f"sum(connscope_connections_time_wait{{{AGENTS_IN_NAMESPACE}}})", decimals=0,
        thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 10000},
                    {"color": "red", "value": 25000}]), 6, 5))
    panels.append(layout.place(timeseries("TIME_WAIT created /s by flow (top 10)",
        "Connections closed first by the local side with a FIN, per flow: each leaves a "
        "TIME_WAIT socket on this host for 60 s. Client flows here burn ephemeral ports.",
        "cps", [
            target(f"topk(10, sum by ({FLOW}) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE, LOCAL_FIN)}))",
                   "{{role}} {{process}} → {{server}}", "A"),
        ]), 12, 10))
    panels.append(layout.row("Resets"))
    panels.append(layout.place(timeseries("Resets /s by role and side",
        "Connections ended by a reset (RST) per second, by role, by who sent it (local or peer) "
        "and by reason.",
        "cps", [
            target(f"sum by (role, closed_by, reason) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE, RESET)})",
                   "{{role}} {{closed_by}} {{reason}}", "A"),
        ]), 12, 9))
    panels.append(layout.place(table("Top flows by resets",
        "Flows with the most connections ended by a reset, and the share of the flow's closes "
        "that were resets.",
        "cps", [
            target(f"topk(20, sum by ({FLOW}) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE, RESET)}) > 0)",
                   ref="A", instant=True),
            target(f"sum by ({FLOW}) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE, RESET)}) / "
                   f"sum by ({FLOW}) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE)})", ref="B", instant=True),
        ], {"Value #A": "resets /s", "Value #B": "share of closes"}, "resets /s",
        overrides=[{"matcher": {"id": "byName", "options": "share of closes"},
                    "properties": [{"id": "unit", "value": "percentunit"}]}]), 12, 9))
    panels.append(layout.row("Causes"))
    panels.append(layout.place(timeseries("Share of HTTP/1.0 requests",
        "Fraction of HTTP requests that are HTTP/1.0, by role. HTTP/1.0 closes after each "
        "response unless both sides send Connection: keep-alive (nginx's proxy default before "
        "proxy_http_version 1.1).",
        "percentunit", [
            target(f"sum by (role) ({rate('connscope_http_requests_total', AGENTS, HTTP10)}) / "
                   f"sum by (role) ({rate('connscope_http_requests_total')})", "{{role}}", "A"),
        ]), 12, 8))
    panels.append(layout.place(timeseries("Closes by Connection: close or HTTP/1.0 /s",
        "Connections closed because of a Connection: close header or HTTP/1.0 semantics, by role "
        "and who closed.",
        "cps", [
            target(f"sum by (role, reason, closed_by) ({rate('connscope_connections_closed_total', AGENTS_IN_NAMESPACE, HEADER_CLOSE)})",
                   "{{role}} {{reason}} ({{closed_by}})", "A"),
        ], stack=True), 12, 8))
    return dashboard("connscope-churn", "connscope / Churn",
                     "Where new connections come from: new connections per request by flow, "
                     "one-request connections; what they cost: connect time, failed connects, "
                     "TIME_WAIT sockets and ephemeral ports held per flow, resets.",
                     panels, ["churn"])


def agent():
    layout = Layout()
    panels = []
    panels.append(layout.place(stat("Agents up",
        "Number of connscope scrape targets (selected job and instances) that answered their last scrape. Compare with the number of nodes.",
        "short", 'sum(up{%s})' % AGENTS,
        thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]), 6, 4))
    panels.append(layout.place(stat("Events lost /s",
        "Events the agent could not account for, per second, all reasons. Anything above zero "
        "means some figures undercount.",
        "cps", f"sum({rate('connscope_events_lost_total')}) or vector(0)", decimals=2,
        thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 0.001}]), 6, 4))
    panels.append(layout.place(stat("Tracked connections use (max)",
        "Highest ratio of tracked connections to the per-socket map capacity among the agents. "
        "At 100% new connections are not tracked (events_lost reason map_full).",
        "percentunit",
        "max(connscope_tracked_connections{%s} / connscope_tracked_connections_capacity{%s})" % (AGENTS, AGENTS),
        decimals=1,
        thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.75},
                    {"color": "red", "value": 0.9}]), 6, 4))
    panels.append(layout.place(stat("Agent versions",
        "Number of distinct connscope versions running among the selected agents (more than 1 "
        "during a rollout).",
        "short", "count(count by (version) (connscope_build_info{%s}))" % AGENTS), 6, 4))
    panels.append(layout.place(timeseries("Events lost /s by reason",
        "Lost events per second by agent and reason: ringbuf_full (userspace did not keep up), "
        "map_full (too many tracked connections), untracked_socket (socket opened before the "
        "agent), payload_unreadable (HTTP head could not be read), decode_error.",
        "cps", [
            target(f"sum by (instance, reason) ({rate('connscope_events_lost_total')})", "{{instance}} {{reason}}", "A"),
        ]), 12, 8))
    panels.append(layout.place(timeseries("Tracked connections vs capacity",
        "Connections tracked in the kernel map per agent, and the map's capacity.",
        "short", [
            target("connscope_tracked_connections{%s}" % AGENTS, "{{instance}} tracked", "A"),
            target("connscope_tracked_connections_capacity{%s}" % AGENTS, "{{instance}} capacity", "B"),
        ]), 12, 8))
    panels.append(layout.place(timeseries("Crash checkpoint",
        "Whether a crash of each agent now would lose nothing (1: its checkpoint covers every "
        "record it consumed; 0: the journal filled before --checkpoint.budget allowed a base), "
        "and the share of a CPU writing the checkpoint takes (journal and bases).",
        "short", [
            target("connscope_checkpoint_covered{%s}" % AGENTS, "{{instance}} covered", "A"),
            target(f"sum by (instance) ({rate('connscope_checkpoint_write_seconds_total')})",
                   "{{instance}} CPU share", "B"),
        ]), 12, 8))
    panels.append(layout.place(table("Probe attach modes",
        "How each kernel hook is attached (fentry, kprobe, tp_btf, tracepoint, sock_ops) and on "
        "how many agents. Mixed modes across nodes point to different kernels.",
        "none", [
            target("count by (hook, attach) (connscope_probe_info{%s} == 1)" % AGENTS, ref="A", instant=True),
        ], {"Value": "agents"}, "agents"), 12, 8))
    panels.append(layout.place(table("Build info",
        "connscope version per agent instance.",
        "none", [
            target("max by (instance, version) (connscope_build_info{%s})" % AGENTS, ref="A", instant=True),
        ], {"Value": "running"}, "instance"), 12, 8))
    panels.append(layout.place(timeseries("TLS decryption cost by process",
        "Share of one CPU each process's libssl uprobes cost (uprobe hits per second times the "
        "cost of one hit the agent measured at start), and the decryption budget: a process "
        "above it is counted from its ciphertext until its estimated cost stays under half "
        "the budget for 10 s.",
        "percentunit", [
            target("sum by (instance, process) (%s) * on (instance) group_left "
                   "max by (instance) (connscope_tls_uprobe_hit_seconds{%s})"
                   % (rate('connscope_tls_uprobe_hits_total'), AGENTS),
                   "{{instance}} {{process}}", "A"),
            target("max by (instance) (connscope_tls_decryption_budget{%s})" % AGENTS,
                   "{{instance}} budget", "B"),
        ]), 12, 8))
    panels.append(layout.place(table("TLS decryption by process",
        "Processes calling TLS by decryption state: decrypted (HTTP figures from the "
        "plaintext), ciphertext_budget (over the budget), ciphertext_unsupported (no OpenSSL "
        "to attach to), ciphertext_opt_out (--tls.never-decrypt).",
        "none", [
            target("sum by (process, state) (connscope_tls_decryption_processes{%s})" % AGENTS,
                   ref="A", instant=True),
        ], {"Value": "processes"}, "processes"), 12, 8))
    panels.append(layout.place(timeseries("Samples per scrape",
        "Series each agent exposes per scrape. Growth tracks label cardinality (flows are capped "
        "to the busiest servers by the agent; the rest is labelled other).",
        "short", [
            target('scrape_samples_scraped{%s}' % AGENTS, "{{instance}}", "A"),
        ]), 24, 7))
    return dashboard("connscope-agent", "connscope / Agent health",
                     "Events lost, tracked connections vs capacity, probe attach modes, versions.",
                     panels, ["agent"])


def main():
    # Optional argument: the directory to write to (the test writes to a temporary one).
    here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    for name, build in (("overview", overview), ("keepalive", keepalive), ("churn", churn),
                        ("agent-health", agent)):
        with open(os.path.join(here, f"connscope-{name}.json"), "w", encoding="utf-8") as f:
            json.dump(build(), f, indent=2, ensure_ascii=False)
            f.write("\n")


if __name__ == "__main__":
    main()
