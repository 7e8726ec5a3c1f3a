//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` and
//! `/readyz`. hyper's HTTP/1 server, one task per connection, a bounded
//! number of connections and a header timeout; nothing else is served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::{ConfigError, MetricsConfig};
use crate::error::Error;
use crate::metrics::{health, metrics};

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;

/// The running endpoint; dropping it stops serving.
pub struct Endpoint {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `[metrics] listen` and serves until the returned [`Endpoint`] is
/// dropped; `None` when the endpoint is off. A bind failure is a
/// configuration error (the address is taken, or not this host's).
/// `shutdown` turning true makes `/readyz` answer 503 from then on.
pub async fn serve(
    config: &MetricsConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<Endpoint>, Error> {
    let Some(addr) = config.listen_addr()? else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        ConfigError::new(
            "metrics.listen",
            format!(
                "cannot listen on {addr}: {e}; choose a free address with [metrics] listen or OUTBOX_METRICS_LISTEN, or \"off\""
            ),
        )
    })?;
    let addr = listener.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        if shutdown.wait_for(|stop| *stop).await.is_ok() {
            health().set_stopping();
        }
    });
    // Created now, so that /metrics is complete from the first scrape.
    let _ = metrics();
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let task = tokio::spawn(accept(listener));
    Ok(Some(Endpoint { addr, task }))
}

async fn accept(listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, typically: wait a little.
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _permit = permit;
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(respond))
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics endpoint: connection ended with an error");
            }
        });
    }
}

async fn respond(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            // Also refreshes pgoutbox_ready.
            let _ = health().readiness();
            let mut r = text(StatusCode::OK, metrics().encode());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match health().readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/health" => condition_response(crate::metrics::condition::latest()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz, /health\n".into(),
        ),
    })
}

/// `/health`: the outbox's condition at the sampler's last sample — 200
/// `healthy` or `degraded: <why>`, 503 `unhealthy: <why>` (one line, the
/// findings separated by `; `). Before the first sample: 200 `unknown`.
fn condition_response(
    condition: Option<crate::metrics::condition::Condition>,
) -> Response<Full<Bytes>> {
    use crate::metrics::condition::Level;
    match condition {
        None => text(StatusCode::OK, "unknown: not sampled yet\n".into()),
        Some(c) => {
            let status = if c.level == Level::Unhealthy {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            text(status, format!("{c}\n"))
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::condition::{judge, Measures};

    fn body(r: Response<Full<Bytes>>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let status = r.status();
        let collected = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(r.into_body().collect());
        let bytes = match collected {
            Ok(c) => c.to_bytes(),
            Err(never) => match never {},
        };
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[test]
    fn health_answers_200_unless_unhealthy() {
        let t = crate::config::HealthConfig::default();
        let (code, text) = body(condition_response(None));
        assert_eq!(
            (code, text.as_str()),
            (StatusCode::OK, "unknown: not sampled yet\n")
        );
        let degraded = judge(
            &t,
            &Measures {
                oldest_pending_s: Some(400.0),
                ..Measures::default()
            },
        );
        let (code, text) = body(condition_response(Some(degraded)));
        assert_eq!(code, StatusCode::OK);
        assert!(
            text.starts_with("degraded: the oldest pending event is 400 s old"),
            "{text}"
        );
        let unhealthy = judge(
            &t,
            &Measures {
                recent_dead_letters: Some(100),
                ..Measures::default()
            },
        );
        let (code, text) = body(condition_response(Some(unhealthy)));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            text.starts_with("unhealthy: 100 events dead-lettered"),
            "{text}"
        );
    }
}
