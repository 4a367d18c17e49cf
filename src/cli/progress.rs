//! Progress on a terminal (stderr); nothing when stderr is not one.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};

use billsync::engine::Progress;

pub fn terminal() -> Option<(Progress, ProgressBar)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}: {human_pos}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let phase = Arc::new(Mutex::new(String::new()));
    let b = bar.clone();
    let cb: Progress = Arc::new(move |name: &str, done: u64, total: Option<u64>| {
        let label = match total {
            Some(t) => format!("{name} (of {t})"),
            None => name.to_string(),
        };
        let mut p = phase.lock().unwrap_or_else(|e| e.into_inner());
        if *p != label {
            b.set_message(label.clone());
            *p = label;
        }
        b.set_position(done);
    });
    Some((cb, bar))
}
