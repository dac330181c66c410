//! API keys. With `--api-keys-file`, every call to the public API (gRPC and HTTP; health is
//! open) carries `authorization: Bearer KEY`, and the key says whose call it is: a platform can
//! then let its tenants call the orchestrator, each held to its own limits, quota and usage
//! metrics, without a gateway that could be bypassed. A call without a key, or with one the
//! file does not list, is UNAUTHENTICATED (HTTP 401); a tenant's key naming another tenant in
//! `x-sdmesh-tenant` is PERMISSION_DENIED (403).
//!
//! The file (TOML) holds SHA-256 digests of the keys, never the keys:
//!
//! ```toml
//! [[keys]]
//! tenant = "acme"      # its calls are acme's (x-sdmesh-tenant may be left out)
//! sha256 = "…"         # printf %s "$KEY" | sha256sum
//! max_jobs = 4         # optional: acme's jobs of a model running at once, per orchestrator,
//!                      # instead of --max-jobs-per-tenant
//! fleet_max_jobs = 12  # optional: acme's jobs running or waiting across the orchestrators
//!                      # that share Redis, instead of --fleet-max-jobs-per-tenant (which
//!                      # turns the fleet-wide quota on)
//!
//! [[keys]]
//! any_tenant = true    # a trusted gateway's key: its calls name their tenant in x-sdmesh-tenant
//! sha256 = "…"
//! ```
//!
//! The file is read again when it changes (looked at once a second at most), so keys are added
//! and revoked without a restart; a change that does not parse keeps the keys before it, and
//! says why in the log.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The orchestrator's flag for API keys.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApiKeysArgs {
    /// A TOML file of [[keys]] (sha256 of the key, and the tenant it is for or any_tenant =
    /// true): every call then needs `authorization: Bearer KEY`. Re-read when it changes.
    #[arg(long, env = "SDMESH_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    sha256: String,
    tenant: Option<String>,
    #[serde(default)]
    any_tenant: bool,
    max_jobs: Option<usize>,
    fleet_max_jobs: Option<usize>,
}

/// What a key lets its caller do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Grant {
    /// Call as this tenant only, with its own bounds where set.
    Tenant { tenant: String, max_jobs: Option<usize>, fleet_max_jobs: Option<usize> },
    /// Call as the tenant the call names (a gateway).
    AnyTenant,
}

/// Whose call it is, as its key says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub tenant: Option<String>,
    /// The tenant's own bound on jobs of a model running at once (None: the orchestrator's).
    pub max_jobs: Option<usize>,
    /// The tenant's own bound on jobs across the fleet (None: `--fleet-max-jobs-per-tenant`).
    pub fleet_max_jobs: Option<usize>,
}

type Keys = HashMap<[u8; 32], Grant>;

pub struct ApiKeys {
    path: PathBuf,
    /// How long the file's text is trusted before it is read again.
    reread_after: Duration,
    state: Mutex<State>,
}

struct State {
    text: String,
    keys: Keys,
    read_at: Instant,
}

/// How long the keys file is trusted before it is read again.
const REREAD_AFTER: Duration = Duration::from_secs(1);

impl ApiKeys {
    /// Reads the keys file at `path`: an error says what is wrong in it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Self::load_rereading_after(path, REREAD_AFTER)
    }

    fn load_rereading_after(path: &Path, reread_after: Duration) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--api-keys-file {}: {e}", path.display()))?;
        let keys = parse(&text).map_err(|e| anyhow::anyhow!("--api-keys-file {}: {e}", path.display()))?;
        tracing::info!(path = %path.display(), keys = keys.len(), "calls need an API key");
        let state = Mutex::new(State { text, keys, read_at: Instant::now() });
        Ok(Self { path: path.to_path_buf(), reread_after, state })
    }

    /// Whether a key carries `fleet_max_jobs` (which holds only where the fleet quota runs).
    pub fn any_fleet_bound(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.keys.values().any(|grant| matches!(grant, Grant::Tenant { fleet_max_jobs: Some(_), .. }))
    }

    /// Whose a call is, given its metadata (`claimed`: its `x-sdmesh-tenant`).
    pub fn caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        claimed: Option<String>,
    ) -> Result<Caller, tonic::Status> {
        let key = bearer(metadata)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let grant = self.keys_now(|keys| keys.get(&digest).cloned());
        match (grant, claimed) {
            (None, _) => Err(tonic::Status::unauthenticated("unknown API key")),
            (Some(Grant::AnyTenant), claimed) => Ok(Caller { tenant: claimed, ..Caller::default() }),
            (Some(Grant::Tenant { tenant, .. }), Some(claimed)) if claimed != tenant => {
                Err(tonic::Status::permission_denied(format!(
                    "this API key is tenant {tenant:?}'s; x-sdmesh-tenant names {claimed:?}"
                )))
            }
            (Some(Grant::Tenant { tenant, max_jobs, fleet_max_jobs }), _) => {
                Ok(Caller { tenant: Some(tenant), max_jobs, fleet_max_jobs })
            }
        }
    }

    /// Runs `f` on the keys, read again first if the file may have changed.
    fn keys_now<T>(&self, f: impl FnOnce(&Keys) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.read_at.elapsed() >= self.reread_after {
            state.read_at = Instant::now();
            match std::fs::read_to_string(&self.path) {
                Ok(text) if text == state.text => {}
                Ok(text) => match parse(&text) {
                    Ok(keys) => {
                        tracing::info!(path = %self.path.display(), keys = keys.len(), "API keys read again");
                        state.keys = keys;
                        state.text = text;
                    }
                    Err(e) => {
                        tracing::error!(path = %self.path.display(), "API keys file not taken, the keys before stay: {e}");
                        // Said once per change.
                        state.text = text;
                    }
                },
                Err(e) => {
                    tracing::error!(path = %self.path.display(), "API keys file unreadable, the keys before stay: {e}")
                }
            }
        }
        f(&state.keys)
    }
}

/// A new random key (256 bits from the OS-seeded CSPRNG, as `sdm_` and 64 hex digits) and its
/// `[[keys]]` entry for the file: for `tenant`, or for any tenant (a gateway) when None.
pub fn new_key(tenant: Option<&str>) -> Result<(String, String), String> {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("sdm_{}", hex(&bytes));
    let digest = hex(&Sha256::digest(key.as_bytes()));
    let grant = match tenant {
        // Printable ASCII (checked) is escaped alike by Rust and TOML.
        Some(tenant) => format!("tenant = {:?}", check_tenant(tenant)?),
        None => "any_tenant = true".into(),
    };
    Ok((key, format!("[[keys]]\n{grant}\nsha256 = \"{digest}\"\n")))
}

/// `tenant`, if it can travel as metadata (printable ASCII).
fn check_tenant(tenant: &str) -> Result<&str, String> {
    if tenant.is_empty() || !tenant.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err(format!("tenant {tenant:?} must be printable ASCII (it travels as metadata)"));
    }
    Ok(tenant)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of `authorization: Bearer KEY`.
fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, tonic::Status> {
    let missing = || tonic::Status::unauthenticated("this API needs a key: send `authorization: Bearer KEY`");
    let value = metadata.get("authorization").ok_or_else(missing)?.to_str().map_err(|_| missing())?;
    let (scheme, key) = value.trim().split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
        return Err(missing());
    }
    Ok(key.trim())
}

fn parse(text: &str) -> Result<Keys, String> {
    let file: KeysFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut keys = Keys::new();
    for (i, entry) in file.keys.iter().enumerate() {
        let at = |why: String| format!("keys[{i}]: {why}");
        let digest = hex_digest(&entry.sha256).ok_or_else(|| at("sha256 must be 64 hex digits".into()))?;
        for (name, bound) in [("max_jobs", entry.max_jobs), ("fleet_max_jobs", entry.fleet_max_jobs)] {
            match bound {
                Some(0) => return Err(at(format!("{name} must be at least 1"))),
                Some(_) if entry.any_tenant => return Err(at(format!("{name} is for a tenant's key, not any_tenant"))),
                _ => {}
            }
        }
        let grant = match (&entry.tenant, entry.any_tenant) {
            (Some(tenant), false) => Grant::Tenant {
                tenant: check_tenant(tenant).map_err(at)?.to_string(),
                max_jobs: entry.max_jobs,
                fleet_max_jobs: entry.fleet_max_jobs,
            },
            (None, true) => Grant::AnyTenant,
            _ => return Err(at("give either tenant or any_tenant = true".into())),
        };
        if keys.insert(digest, grant).is_some() {
            return Err(at("the same key is listed twice".into()));
        }
    }
    Ok(keys)
}

fn hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(key: &str) -> String {
        hex(&Sha256::digest(key.as_bytes()))
    }

    fn metadata(key: Option<&str>) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        if let Some(key) = key {
            m.insert("authorization", key.parse().unwrap());
        }
        m
    }

    fn file(text: &str) -> PathBuf {
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sdmesh-keys-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn keys_file(entries: &[(&str, Option<&str>)]) -> String {
        entries
            .iter()
            .map(|(key, tenant)| match tenant {
                Some(t) => format!("[[keys]]\ntenant = {t:?}\nsha256 = {:?}\n", sha256(key)),
                None => format!("[[keys]]\nany_tenant = true\nsha256 = {:?}\n", sha256(key)),
            })
            .collect()
    }

    #[test]
    fn a_key_says_whose_call_it_is() {
        let path = file(&keys_file(&[("acme-secret", Some("acme")), ("gateway-secret", None)]));
        let keys = ApiKeys::load(&path).unwrap();
        let tenant = |key: Option<&str>, claimed: Option<&str>| {
            keys.caller(&metadata(key), claimed.map(String::from)).map(|c| c.tenant)
        };
        assert_eq!(tenant(Some("Bearer acme-secret"), None).unwrap().as_deref(), Some("acme"));
        assert_eq!(tenant(Some("bearer  acme-secret "), Some("acme")).unwrap().as_deref(), Some("acme"));
        assert_eq!(tenant(Some("Bearer gateway-secret"), Some("zeta")).unwrap().as_deref(), Some("zeta"));
        assert_eq!(tenant(Some("Bearer gateway-secret"), None).unwrap(), None);
        let code = |key: Option<&str>, claimed: Option<&str>| tenant(key, claimed).unwrap_err().code();
        assert_eq!(code(Some("Bearer acme-secret"), Some("zeta")), tonic::Code::PermissionDenied);
        for refused in [None, Some("Bearer wrong"), Some("acme-secret"), Some("Basic acme-secret"), Some("Bearer ")] {
            assert_eq!(code(refused, None), tonic::Code::Unauthenticated, "{refused:?}");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn new_keys_are_random_and_their_entries_grant_them() {
        let (acme_key, acme) = new_key(Some("acme \"west\"")).unwrap();
        let (gateway_key, gateway) = new_key(None).unwrap();
        assert!(new_key(Some("é")).unwrap_err().contains("printable ASCII"));
        assert!(acme_key.starts_with("sdm_") && acme_key.len() == 68 && acme_key != gateway_key);
        let path = file(&format!("{acme}\n{gateway}"));
        let keys = ApiKeys::load(&path).unwrap();
        let bearer = |key: &str| metadata(Some(&format!("Bearer {key}")));
        assert_eq!(keys.caller(&bearer(&acme_key), None).unwrap().tenant.as_deref(), Some("acme \"west\""));
        assert_eq!(keys.caller(&bearer(&gateway_key), Some("z".into())).unwrap().tenant.as_deref(), Some("z"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_tenants_key_may_carry_its_own_bounds() {
        let text = format!("[[keys]]\ntenant = \"acme\"\nmax_jobs = 3\nsha256 = {:?}\n", sha256("k"));
        let path = file(&text);
        let keys = ApiKeys::load(&path).unwrap();
        let caller = keys.caller(&metadata(Some("Bearer k")), None).unwrap();
        assert_eq!(caller, Caller { tenant: Some("acme".into()), max_jobs: Some(3), fleet_max_jobs: None });
        assert!(!keys.any_fleet_bound());
        let text = format!("[[keys]]\ntenant = \"b\"\nfleet_max_jobs = 5\nsha256 = {:?}\n", sha256("k"));
        let path = file(&text);
        let keys = ApiKeys::load(&path).unwrap();
        let caller = keys.caller(&metadata(Some("Bearer k")), None).unwrap();
        assert_eq!(caller, Caller { tenant: Some("b".into()), max_jobs: None, fleet_max_jobs: Some(5) });
        assert!(keys.any_fleet_bound());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_malformed_file_says_what_is_wrong() {
        let digest = sha256("k");
        for (text, needle) in [
            ("[[keys]]\ntenant = \"a\"\nsha256 = \"abc\"\n".to_string(), "64 hex digits"),
            (format!("[[keys]]\nsha256 = {digest:?}\n"), "either tenant or any_tenant"),
            (format!("[[keys]]\ntenant = \"a\"\nany_tenant = true\nsha256 = {digest:?}\n"), "either tenant"),
            (format!("[[keys]]\ntenant = \"a\\n\"\nsha256 = {digest:?}\n"), "printable ASCII"),
            (
                format!(
                    "[[keys]]\ntenant = \"a\"\nsha256 = {digest:?}\n[[keys]]\nany_tenant = true\nsha256 = {digest:?}\n"
                ),
                "twice",
            ),
            (format!("[[keys]]\ntenant = \"a\"\nkey = \"plain\"\nsha256 = {digest:?}\n"), "unknown field"),
            (format!("[[keys]]\ntenant = \"a\"\nmax_jobs = 0\nsha256 = {digest:?}\n"), "at least 1"),
            (format!("[[keys]]\nany_tenant = true\nmax_jobs = 2\nsha256 = {digest:?}\n"), "not any_tenant"),
            (
                format!("[[keys]]\ntenant = \"a\"\nfleet_max_jobs = 0\nsha256 = {digest:?}\n"),
                "fleet_max_jobs must be at least 1",
            ),
            (
                format!("[[keys]]\nany_tenant = true\nfleet_max_jobs = 2\nsha256 = {digest:?}\n"),
                "fleet_max_jobs is for a tenant's",
            ),
        ] {
            let path = file(&text);
            let e = ApiKeys::load(&path).err().expect("refused").to_string();
            assert!(e.contains(needle), "{e}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn keys_are_added_and_revoked_by_changing_the_file() {
        let path = file(&keys_file(&[("old", Some("acme"))]));
        let keys = ApiKeys::load_rereading_after(&path, Duration::ZERO).unwrap();
        let code = |key: &str| keys.caller(&metadata(Some(&format!("Bearer {key}"))), None).map_err(|e| e.code());
        assert!(code("old").is_ok());
        std::fs::write(&path, keys_file(&[("new", Some("acme"))])).unwrap();
        assert_eq!(code("old"), Err(tonic::Code::Unauthenticated), "revoked");
        assert!(code("new").is_ok(), "added");
        // A change that does not parse keeps the keys before it.
        std::fs::write(&path, "[[keys]]\nsha256 = 1\n").unwrap();
        assert!(code("new").is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(code("new").is_ok(), "a file gone keeps the keys before");
    }
}
