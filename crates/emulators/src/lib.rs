//! Emulators of BILLmanager, ActivePlatform and the VMS, served over real
//! HTTP on 127.0.0.1, for the tests and for `billsync sandbox`. They behave
//! as API-NOTES.md says the real systems do, quirks included, and take
//! injected faults.

// Handlers return a ready `Response` as their error: that is the point.
#![allow(clippy::result_large_err)]

pub mod activeplatform;
pub mod billmanager;
pub mod faults;
pub mod lab;
pub mod postgres;
pub mod proxy;
pub mod vms;

use std::net::SocketAddr;

use tokio::sync::oneshot;

pub use faults::{Fault, Faults};

/// A running emulator; dropping it stops the server.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Serves `router` on an ephemeral loopback port.
    pub async fn start(router: axum::Router) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Deterministic generator for seeded data (no global RNG in emulators).
#[derive(Clone)]
pub struct Seq(u64);

impl Seq {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// splitmix64
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Rendered JSON rows of a large listing, kept between requests so a
/// benchmark measures billsync, not the emulator's JSON encoder. Emptied by
/// every `data()` access, through which tests change the data.
#[derive(Default)]
pub struct RowCache(std::sync::Mutex<Option<std::sync::Arc<Vec<String>>>>);

impl RowCache {
    pub fn invalidate(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn get_or_build(&self, build: impl FnOnce() -> Vec<String>) -> std::sync::Arc<Vec<String>> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(|| std::sync::Arc::new(build()))
            .clone()
    }
}
