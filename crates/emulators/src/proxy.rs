//! A loopback TCP proxy for the fault tests: it can be paused, which is a
//! network partition (nothing passes either way and the connections stay
//! open, as when packets are dropped), and it records when its client sent
//! bytes, so a test knows which node sent requests when. The times are the
//! wall clock, which a PostgreSQL on the same machine shares: they compare
//! with the lease's database times.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    passing: watch::Sender<bool>,
    sent: Arc<Mutex<Vec<SystemTime>>>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    /// Forwards 127.0.0.1:(a free port) to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (passing, _) = watch::channel(true);
        let proxy = Proxy {
            addr: listener.local_addr()?,
            passing,
            sent: Default::default(),
            tasks: Default::default(),
        };
        let (open, sent, tasks) = (
            proxy.passing.subscribe(),
            proxy.sent.clone(),
            proxy.tasks.clone(),
        );
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let conn = tokio::spawn(relay(client, target, open.clone(), sent.clone()));
                lock(&tasks).push(conn.abort_handle());
            }
        });
        lock(&proxy.tasks).push(accept.abort_handle());
        Ok(proxy)
    }

    /// Nothing passes from now on, either way, until `resume`.
    pub fn pause(&self) {
        self.passing.send_replace(false);
    }

    pub fn resume(&self) {
        self.passing.send_replace(true);
    }

    /// When the client sent bytes (each read of its side), in order.
    pub fn sent_at(&self) -> Vec<SystemTime> {
        lock(&self.sent).clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        lock(&self.tasks).iter().for_each(AbortHandle::abort);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn relay(
    client: TcpStream,
    target: SocketAddr,
    mut open: watch::Receiver<bool>,
    sent: Arc<Mutex<Vec<SystemTime>>>,
) {
    if open.wait_for(|p| *p).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, open.clone(), Some(sent));
    let down = pump(sr, cw, open, None);
    // One side closing ends the connection, as a closed socket would.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies `from` to `to`, holding what it read while paused.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: watch::Receiver<bool>,
    sent: Option<Arc<Mutex<Vec<SystemTime>>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(n) if n > 0 => n,
            // A close crosses no partition either.
            _ => {
                let _ = open.wait_for(|p| *p).await;
                return;
            }
        };
        if let Some(sent) = &sent {
            lock(sent).push(SystemTime::now());
        }
        if open.wait_for(|p| *p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
