//! systemd notification: READY=1, WATCHDOG=1 fed while the process shows
//! progress (`telemetry::liveness`), STOPPING=1. Silent when `NOTIFY_SOCKET` is unset.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::telemetry::liveness::Pulse;

pub fn ready() {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not tell systemd READY=1");
    }
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// `WATCHDOG_USEC`, as libsystemd reads it: `WATCHDOG_PID`, when set, must
/// be this process (sd-notify's own check also demands that it be set).
fn watchdog_usec() -> Option<u64> {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()?
        .parse::<u64>()
        .ok()
        .filter(|u| *u > 0)?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(usec),
    }
}

/// The age of the stalest of these pulses.
pub fn oldest_beat(pulses: &[Arc<Pulse>]) -> Duration {
    pulses.iter().map(|p| p.age()).max().unwrap_or_default()
}

/// Pings the watchdog at half its interval, but only while every lane's
/// heartbeat is fresher than the interval: a stuck lane stops the pings and
/// systemd restarts the service.
pub fn spawn_watchdog(pulses: Vec<Arc<Pulse>>) -> Option<tokio::task::JoinHandle<()>> {
    let usec = watchdog_usec()?;
    let interval = Duration::from_micros(usec);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            let age = oldest_beat(&pulses);
            if age < interval {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            } else {
                tracing::warn!(
                    stale_ms = age.as_millis() as u64,
                    "a cycle lane shows no progress; not feeding the watchdog"
                );
            }
        }
    }))
}
