//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz` and a small index page.

use std::{
    convert::Infallible,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{
        ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, VARY,
        WWW_AUTHENTICATE,
    },
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    exposition::scrape_cache::{REFRESH_EVERY, ScrapeCache},
    exposition::status::{HookRow, UprobeReport},
    exposition::web::{WebSettings, auth::basic_credentials},
};

/// A TLS client that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the handlers read.
pub struct AppState {
    pub registry: Registry,
    pub scrapes: ScrapeCache,
    /// Set once every hook is attached.
    pub ready: AtomicBool,
    pub hooks: std::sync::RwLock<Vec<HookRow>>,
    /// Where the libssl uprobes are attached (set once at start).
    pub tls: std::sync::OnceLock<Arc<UprobeReport>>,
}

impl AppState {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            scrapes: ScrapeCache::default(),
            ready: AtomicBool::new(false),
            hooks: std::sync::RwLock::new(Vec::new()),
            tls: std::sync::OnceLock::new(),
        }
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Whether an `Accept-Encoding` value allows gzip (and does not refuse it with `q=0`).
fn accepts_gzip(accept_encoding: Option<&HeaderValue>) -> bool {
    let Some(value) = accept_encoding.and_then(|value| value.to_str().ok()) else { return false };
    value.split(',').any(|coding| {
        let mut parts = coding.split(';').map(str::trim);
        let named = parts.next().is_some_and(|name| name.eq_ignore_ascii_case("gzip"));
        let refused = parts
            .any(|param| param.strip_prefix("q=").and_then(|q| q.parse::<f64>().ok()) == Some(0.0));
        named && !refused
    })
}

/// Routes a request; no socket involved, so it is tested directly.
pub fn respond(
    state: &AppState,
    method: &Method,
    path: &str,
    gzip_ok: bool,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "only GET\n");
    }
    match path {
        "/metrics" => match state.scrapes.body(&state.registry, gzip_ok) {
            Ok((body, gzipped)) => {
                let mut response = text(StatusCode::OK, OPENMETRICS, body);
                response.headers_mut().insert(VARY, HeaderValue::from_static("Accept-Encoding"));
                if gzipped {
                    response
                        .headers_mut()
                        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                response
            }
            Err(err) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("encoding failed: {err}\n"),
            ),
        },
        "/healthz" => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain; charset=utf-8", "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "probes not attached yet\n",
                )
            }
        }
        "/" => text(StatusCode::OK, "text/html; charset=utf-8", index_page(state)),
        _ => text(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found; try /metrics\n"),
    }
}

fn index_page(state: &AppState) -> String {
    let mut page = String::from(
        "<!doctype html><html><head><title>connscope</title></head><body><h1>connscope</h1>\
         <p>HTTP connection reuse, idle time, who closes and why, churn.</p><ul>\
         <li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li>\
         <li><a href=\"/readyz\">/readyz</a></li></ul><h2>Hooks</h2><table><tr><th>hook</th><th>attached as</th></tr>",
    );
    if let Ok(hooks) = state.hooks.read() {
        for hook in hooks.iter() {
            let _ = write!(page, "<tr><td>{}</td><td>{}</td></tr>", hook.hook, hook.attach);
        }
    }
    page.push_str("</table>");
    if let Some(tls) = state.tls.get() {
        tls_section(&mut page, tls);
    }
    let ready = if state.ready.load(Ordering::Acquire) { "ready" } else { "starting" };
    let _ =
        write!(page, "<p>State: {ready}. Version {}.</p></body></html>", env!("CARGO_PKG_VERSION"));
    page
}

/// The libssl uprobes' state and files (paths are the agent's own knowledge, not traffic).
fn tls_section(page: &mut String, tls: &UprobeReport) {
    let attach = tls.attach.read().map(|attach| *attach).unwrap_or("unknown");
    let _ = write!(
        page,
        "<h2>TLS plaintext (libssl uprobes)</h2><p>State: {attach}.</p>\
         <table><tr><th>file</th><th>state</th></tr>"
    );
    if let Ok(targets) = tls.targets.read() {
        for (file, outcome) in targets.iter() {
            let _ = write!(page, "<tr><td>{}</td><td>{}</td></tr>", escape(file), escape(outcome));
        }
    }
    page.push_str(
        "</table><h3>Processes (decryption budget)</h3>\
         <table><tr><th>process (pid)</th><th>state</th><th>uprobe hits/s</th></tr>",
    );
    if let Ok(processes) = tls.processes.read() {
        for (process, state, hits) in processes.iter() {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{state}</td><td>{hits:.0}</td></tr>",
                escape(process)
            );
        }
    }
    page.push_str("</table>");
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Serves until `shutdown` flips to true, with TLS and basic auth as `web` says.
pub async fn serve(
    listener: TcpListener,
    web: Arc<WebSettings>,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(refresh_while_scraped(state.clone(), shutdown.clone()));
    tokio::spawn(reload_on_sighup(web.clone()));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // TLS settings are taken per connection (a changed certificate applies to the next one).
        let tls = web.current().tls.clone();
        let (web, state) = (web.clone(), state.clone());
        tokio::spawn(async move {
            match tls {
                Some(tls) => {
                    let handshake = TlsAcceptor::from(tls).accept(stream);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => serve_connection(stream, web, state).await,
                        Ok(Err(err)) => tracing::debug!("TLS handshake failed: {err}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
                None => serve_connection(stream, web, state).await,
            }
        });
    }
}

/// SIGHUP reads the web configuration again (and no longer ends the agent, its default).
async fn reload_on_sighup(web: Arc<WebSettings>) {
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::debug!("cannot listen for SIGHUP; the web configuration still reloads on change");
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reading the web configuration again");
        web.reload_on_next_use();
        drop(web.current());
    }
}

/// Re-encodes `/metrics` in the background while scrapes come and encoding is slow (see
/// [`ScrapeCache`]); the encode runs on a blocking thread so the async threads keep serving.
async fn refresh_while_scraped(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !state.scrapes.wants_refresh(std::time::Instant::now()) {
            continue;
        }
        let state = state.clone();
        let encoded = tokio::task::spawn_blocking(move || state.scrapes.encode(&state.registry));
        if let Ok(Err(err)) = encoded.await {
            tracing::warn!("encoding /metrics in the background failed: {err}");
        }
    }
}

async fn serve_connection(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    web: Arc<WebSettings>,
    state: Arc<AppState>,
) {
    let service = service_fn(move |request: Request<Incoming>| {
        let (web, state) = (web.clone(), state.clone());
        async move {
            let response = if authorized(&web, &request).await {
                respond(
                    &state,
                    request.method(),
                    request.uri().path(),
                    accepts_gzip(request.headers().get(ACCEPT_ENCODING)),
                )
            } else {
                unauthorized()
            };
            Ok::<_, Infallible>(response)
        }
    });
    if let Err(err) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!("metrics connection: {err}");
    }
}

/// Every endpoint needs the credentials when users are configured (as in node_exporter);
/// the users are those of the file as it is now, also on a kept-alive connection.
async fn authorized(web: &Arc<WebSettings>, request: &Request<Incoming>) -> bool {
    let config = web.current();
    if config.users.is_empty() {
        return true;
    }
    let Some((user, password)) =
        request.headers().get(AUTHORIZATION).and_then(|value| basic_credentials(value.as_bytes()))
    else {
        return false;
    };
    if let Some(verdict) = web.auth.cached(&config.users, &user, &password) {
        return verdict;
    }
    let web = web.clone();
    tokio::task::spawn_blocking(move || web.auth.verify(&config.users, &user, &password))
        .await
        .unwrap_or(false)
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response =
        text(StatusCode::UNAUTHORIZED, "text/plain; charset=utf-8", "Unauthorized\n");
    response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
    response
}

/// A scraper that polls the stopping agent (it scraped in this long before the signal, or
/// after it: a bench, a test) is waited for, this long at most, so that its last answer
/// holds the counts the handover says were exported: what was counted after that answer
/// would otherwise be counted by no agent. Before the signal too: with the uprobes pinned a
/// stop can be over in milliseconds, before the poller's next scrape arrives.
const FINAL_SCRAPE_WAIT: std::time::Duration = std::time::Duration::from_millis(300);
/// Time for the answer's bytes to leave the process after it was encoded.
const ANSWER_FLUSH: std::time::Duration = std::time::Duration::from_millis(20);

pub async fn serve_final_counts(state: &AppState, signalled: std::time::Instant) {
    let polled_since = signalled.checked_sub(FINAL_SCRAPE_WAIT).unwrap_or(signalled);
    if !state.scrapes.scraped_since(polled_since) {
        return;
    }
    let deadline = std::time::Instant::now() + FINAL_SCRAPE_WAIT;
    while state.scrapes.final_answers() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    if state.scrapes.final_answers() > 0 {
        tokio::time::sleep(ANSWER_FLUSH).await;
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;
    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::model::metric_table::PREFIX;

    fn state() -> AppState {
        let mut registry = Registry::with_prefix(PREFIX);
        let counter: Counter = Counter::default();
        counter.inc();
        registry.register("example", "An example", counter);
        AppState::new(registry)
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_openmetrics() {
        let state = state();
        let response = respond(&state, &Method::GET, "/metrics", false);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(OPENMETRICS.as_bytes())
        );
        let text = body(response).await;
        assert!(text.contains("connscope_example_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn gzip_negotiation() {
        let accepts = |value: &'static str| accepts_gzip(Some(&HeaderValue::from_static(value)));
        assert!(accepts("gzip"));
        assert!(accepts("deflate, GZIP;q=0.5"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("identity"));
        assert!(!accepts_gzip(None));
    }

    #[tokio::test]
    async fn readiness_follows_attach_state() {
        let state = state();
        assert_eq!(
            respond(&state, &Method::GET, "/readyz", false).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(respond(&state, &Method::GET, "/readyz", false).status(), StatusCode::OK);
        assert_eq!(respond(&state, &Method::GET, "/healthz", false).status(), StatusCode::OK);
        assert_eq!(respond(&state, &Method::GET, "/nope", false).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&state, &Method::POST, "/metrics", false).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(body(respond(&state, &Method::GET, "/", false)).await.contains("/metrics"));
    }
}
