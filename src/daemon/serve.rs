//! The admin server's connections: hyper with a deadline for request
//! headers, a cap on open connections and a lifetime per connection, so a
//! slow or flooding client cannot hold the admin port (SPEC §11).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long a client may take, and how many may be connected at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From the connection (or the previous answer) to the end of the
    /// request's headers.
    pub header_timeout: Duration,
    /// A connection is closed after this, kept alive or not.
    pub connection_lifetime: Duration,
    /// Further clients wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(300),
            max_connections: 32,
        }
    }
}

/// Serves `router` on `listener` until `stop` completes; over TLS when
/// there is an acceptor (its handshake within the header deadline).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            _ = &mut stop => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    tracing::warn!(error = %e, "admin server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let served = async {
                match tls {
                    None => connection(stream, service, limits).await,
                    Some(tls) => {
                        let handshake =
                            tokio::time::timeout(limits.header_timeout, tls.accept(stream));
                        if let Ok(Ok(stream)) = handshake.await {
                            connection(stream, service, limits).await;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(limits.connection_lifetime, served).await;
            drop(permit);
        });
    }
}

async fn connection<S>(stream: S, service: TowerToHyperService<Router>, limits: Limits)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let _ = conn.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server(limits: Limits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", get(|| async { "hello" }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, limits, None, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// Reads until the peer closes; fails the test after `limit`.
    async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
        let mut buf = Vec::new();
        tokio::time::timeout(limit, stream.read_to_end(&mut buf))
            .await
            .expect("the server kept the connection open")
            .unwrap_or_default();
        buf
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _stop) = server(limits).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut slow, Duration::from_secs(10)).await;
        assert!(!answer.windows(5).any(|w| w == b"hello"));
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_for_a_free_slot() {
        let limits = Limits {
            header_timeout: Duration::from_secs(60),
            connection_lifetime: Duration::from_secs(60),
            max_connections: 1,
        };
        let (addr, _stop) = server(limits).await;
        let idle = TcpStream::connect(addr).await.unwrap();
        // Accepted only once the idle one is gone.
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(GET).await.unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), next.read(&mut byte)).await;
        assert!(early.is_err(), "answered past the connection cap");
        drop(idle);
        let answer = read_to_close(&mut next, Duration::from_secs(10)).await;
        assert!(answer.windows(5).any(|w| w == b"hello"), "{answer:?}");
    }
}
