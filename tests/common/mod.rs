//! What the integration tests and benches share: a lab's config, loaded.

use billsync::config::{self, ConfigError, Settings};
use billsync_emulators::lab::Lab;

pub trait LabSettings {
    /// Writes the lab's config with `extra` appended and loads it with `env`
    /// overrides, as `billsync` would.
    fn settings(&self, extra: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError>;
}

impl LabSettings for Lab {
    fn settings(&self, extra: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let path = self.write_config(extra);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        config::load(&path, &env).map(|(s, _)| s)
    }
}
