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
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    probes::HookAttach,
    web::{WebConfig, WebSettings, auth::basic_credentials},
};

/// A TLS client that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the handlers read.
pub struct AppState {
    pub registry: Registry,
    /// Set once every hook is attached.
    pub ready: AtomicBool,
    pub hooks: std::sync::RwLock<Vec<HookAttach>>,
}

impl AppState {
    pub fn new(registry: Registry) -> Self {
        Self { registry, ready: AtomicBool::new(false), hooks: std::sync::RwLock::new(Vec::new()) }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Routes a request; no socket involved, so it is tested directly.
pub fn respond(state: &AppState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
    }
    match path {
        "/metrics" => {
            let mut body = String::with_capacity(16 * 1024);
            match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                Ok(()) => text(StatusCode::OK, OPENMETRICS, body),
                Err(err) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    format!("encoding failed: {err}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain; charset=utf-8", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "probes not attached yet\n".into(),
                )
            }
        }
        "/" => text(StatusCode::OK, "text/html; charset=utf-8", index_page(state)),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; try /metrics\n".into(),
        ),
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
    let ready = if state.ready.load(Ordering::Acquire) { "ready" } else { "starting" };
    let _ = write!(
        page,
        "</table><p>State: {ready}. Version {}.</p></body></html>",
        env!("CARGO_PKG_VERSION")
    );
    page
}

/// Serves until `shutdown` flips to true, with TLS and basic auth as `web` says.
pub async fn serve(
    listener: TcpListener,
    web: Arc<WebSettings>,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) {
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
        let config = web.current();
        let (web, state) = (web.clone(), state.clone());
        tokio::spawn(async move {
            match config.tls.clone() {
                Some(tls) => {
                    let handshake = TlsAcceptor::from(tls).accept(stream);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => serve_connection(stream, config, web, state).await,
                        Ok(Err(err)) => tracing::debug!("TLS handshake failed: {err}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
                None => serve_connection(stream, config, web, state).await,
            }
        });
    }
}

async fn serve_connection(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    config: Arc<WebConfig>,
    web: Arc<WebSettings>,
    state: Arc<AppState>,
) {
    let service = service_fn(move |request: Request<Incoming>| {
        let (config, web, state) = (config.clone(), web.clone(), state.clone());
        async move {
            let response = if authorized(&config, &web, &request).await {
                respond(&state, request.method(), request.uri().path())
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

/// Every endpoint needs the credentials when users are configured (as in node_exporter).
async fn authorized(
    config: &Arc<WebConfig>,
    web: &Arc<WebSettings>,
    request: &Request<Incoming>,
) -> bool {
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
    let (config, web) = (config.clone(), web.clone());
    tokio::task::spawn_blocking(move || web.auth.verify(&config.users, &user, &password))
        .await
        .unwrap_or(false)
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response =
        text(StatusCode::UNAUTHORIZED, "text/plain; charset=utf-8", "Unauthorized\n".into());
    response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    fn state() -> AppState {
        let mut registry = Registry::with_prefix("connscope");
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
        let response = respond(&state, &Method::GET, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(OPENMETRICS.as_bytes())
        );
        let text = body(response).await;
        assert!(text.contains("connscope_example_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn readiness_follows_attach_state() {
        let state = state();
        assert_eq!(
            respond(&state, &Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(respond(&state, &Method::GET, "/readyz").status(), StatusCode::OK);
        assert_eq!(respond(&state, &Method::GET, "/healthz").status(), StatusCode::OK);
        assert_eq!(respond(&state, &Method::GET, "/nope").status(), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&state, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(body(respond(&state, &Method::GET, "/")).await.contains("/metrics"));
    }
}
