//! `check-config [--connect]`: the effective config, secrets masked; with
//! `--connect`, the raw statuses each source shows and the VMS's answer.

use std::collections::BTreeSet;
use std::time::Duration;

use billsync::config::Settings;
use billsync::core::entitlements::service_state;
use billsync::core::model::SourceKind;
use billsync::core::normalize::Normalizer;
use billsync::http;
use billsync::sources;

pub async fn run(settings: Settings, connect: bool) -> u8 {
    outln!("{}", settings.to_masked_toml());
    for kind in SourceKind::ALL {
        if settings.configured(kind).is_some() && settings.source(kind).is_none() {
            outln!(
                "# sources.{kind} is disabled: the VMS users it owns are frozen (never \
                 deprovisioned); `billsync sync --retire-source {kind}` retires them"
            );
        }
    }
    if !connect {
        outln!("# config OK");
        return super::EXIT_OK;
    }
    let mut ok = true;
    let sources = match sources::from_settings(&settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("billsync: {e}");
            return super::EXIT_CONFIG;
        }
    };
    for source in &sources {
        let kind = source.kind();
        let normalizer = match settings.normalizer(kind) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("billsync: {e}");
                return super::EXIT_CONFIG;
            }
        };
        match source.first_page().await {
            Ok(listing) => {
                let seen: BTreeSet<String> = listing
                    .accounts
                    .iter()
                    .filter_map(|a| a.raw.status.clone())
                    .collect();
                let missing: Vec<&String> = seen
                    .iter()
                    .filter(|s| normalizer.status(s).is_none())
                    .collect();
                outln!(
                    "{kind}: OK, first page has {} accounts; raw statuses seen: {:?}",
                    listing.accounts.len(),
                    seen
                );
                if missing.is_empty() {
                    outln!("{kind}: status_map covers every status seen");
                } else {
                    ok = false;
                    outln!("{kind}: status_map LACKS {missing:?}: such accounts would be skipped");
                }
            }
            Err(e) => {
                ok = false;
                outln!("{kind}: FAILED: {e}");
            }
        }
        ok &= check_services(source, &normalizer).await;
    }
    match probe_vms(&settings).await {
        Ok(status) => outln!("vms: answers (GET /api/v1/billing/tree: HTTP {status})"),
        Err(e) => {
            ok = false;
            outln!("vms: FAILED: {e}");
        }
    }
    if ok {
        super::EXIT_OK
    } else {
        super::EXIT_UNFINISHED
    }
}

/// The raw service statuses a source's service listing shows, and those
/// its service `status_map` lacks (SPEC §12.1). True when all is well or
/// the source reads no services.
async fn check_services(source: &sources::Source, normalizer: &Normalizer) -> bool {
    let kind = source.kind();
    let listing = match source.list_services(&|_| {}).await {
        None => return true,
        Some(Ok(listing)) => listing,
        Some(Err(e)) => {
            outln!("{kind}: service listing FAILED: {e}");
            return false;
        }
    };
    let seen: BTreeSet<String> = (listing.services.iter())
        .filter_map(|s| s.status.clone())
        .collect();
    let missing: Vec<&String> = (seen.iter())
        .filter(|s| service_state(s, &normalizer.service_states).is_none())
        .collect();
    outln!(
        "{kind}: {} services; raw service statuses seen: {seen:?}",
        listing.services.len()
    );
    match missing.is_empty() {
        true => outln!("{kind}: services.status_map covers every status seen"),
        false => {
            outln!("{kind}: services.status_map LACKS {missing:?}: such services would be skipped")
        }
    }
    missing.is_empty()
}

/// The VMS has no read endpoint for users; the tree listing is read-only
/// and shows that the address, TLS and allow-list work.
async fn probe_vms(settings: &Settings) -> Result<u16, String> {
    let v = &settings.vms;
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, val) in &v.headers {
        if let (Ok(name), Some(Ok(value))) = (
            reqwest::header::HeaderName::from_bytes(k.as_bytes()),
            val.expose().map(reqwest::header::HeaderValue::from_str),
        ) {
            headers.insert(name, value);
        }
    }
    let client = http::build_client(http::ClientOptions {
        timeout: Duration::from_secs(v.timeout_secs),
        ca_file: &v.ca_file,
        insecure: v.insecure_skip_tls_verify,
        headers,
        pool_size: 1,
    })
    .map_err(|e| e.to_string())?;
    let url = format!("{}/api/v1/billing/tree", v.url.trim_end_matches('/'));
    let (status, _, _) = http::send(client.get(url).header("accept", "application/json"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}
