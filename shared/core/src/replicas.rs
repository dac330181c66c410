//! A client's calls spread over a service's replicas, with a failed replica left alone for a
//! while.
//!
//! A target is one address or several, comma-separated:
//! - `http://host:port` (or `host:port`): one replica; the name is resolved when connecting.
//! - `dns:///host:port`: every address the name resolves to is a replica, and the name is
//!   resolved again every [`DNS_REFRESH`] (a Kubernetes headless Service lists one address per
//!   ready pod).
//!
//! Each call goes to the replica with the fewest calls in flight (ties in turn), skipping
//! replicas that failed lately. A replica fails when its connection does (refused, reset,
//! timed out) or when it answers UNAVAILABLE (loading, draining); it then rests for a time that
//! doubles with each failure in a row ([`FIRST_REST`] to [`LONGEST_REST`]). When every replica
//! rests, a call goes to the one that failed longest ago, so that the retries of a call whose
//! replica just died go to the others, however long they rest (one may be up by now: the last
//! replica of a rollout's old side dies under a job while the new side is still resting from
//! failures before it came up). The failed call fails with UNAVAILABLE, and
//! [`call_with_retries`](crate::client::call_with_retries) sends it again, to another replica:
//! every call is idempotent, so a replica that dies costs a retry, not a job.
//!
//! Why not tonic's `Channel::balance_list`: its power-of-two-choices balancer ranks replicas by
//! calls in flight only, and a dead replica fails its calls at once, so it always looks the
//! least loaded and draws the traffic it cannot serve.
//!
//! A job stays on one model per service: within [`one_job`], a service's first answer names
//! the model that served it (its `sdmesh-model` fingerprint), and every later call of the job to
//! that service asks for that model, so a replica serving another one (in the middle of a
//! rollout) refuses instead of mixing models within the job. The set remembers which model each
//! replica answered with and sends a job's calls to replicas of its model; a refusal for another
//! model does not rest a replica, which serves the jobs of its own model. The next job takes
//! whichever model answers it first, so a pool that has moved on serves new jobs at once.

use crate::{Error, Result};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// How often a `dns:` target's name is resolved again.
pub const DNS_REFRESH: Duration = Duration::from_secs(5);
/// How long a replica rests after its first failure in a row.
pub const FIRST_REST: Duration = Duration::from_millis(250);
/// The longest rest, however many failures in a row.
pub const LONGEST_REST: Duration = Duration::from_secs(10);
/// Metadata naming a replica: on a response (and so on an error status), the replica that
/// answered; on a request, the replica it must go to if that one is up (a unet service that
/// asked for a job's conditioning gets it, rather than another replica).
pub const REPLICA_HEADER: &str = "sdmesh-replica";
/// How long a call waits for a `dns:` target's first resolution.
const FIRST_RESOLUTION_WAIT: Duration = Duration::from_secs(5);

/// What the replica sets know of the running job.
#[derive(Default)]
struct JobModels {
    /// The model each target answered the job with, by target.
    models: HashMap<String, http::HeaderValue>,
    /// A replica refused a call of the job because it serves another model.
    refused_for_model: bool,
}

tokio::task_local! {
    /// Read and written only by the job's own task (from `ReplicaSet::call` and its future).
    static JOB_MODELS: RefCell<JobModels>;
}

/// How a job went with the pools' models.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobOnModels {
    /// Some replica refused a call of the job because it serves another model than the one the
    /// job began on: a pool in the middle of a rollout, or past it (the job's model gone).
    pub refused_for_model: bool,
}

/// Runs `job` as one job: the calls it makes to each service stay on the model that answered
/// its first call there (see the module's documentation). Calls outside a job are not pinned.
pub async fn one_job<F: std::future::Future>(job: F) -> (F::Output, JobOnModels) {
    JOB_MODELS
        .scope(RefCell::default(), async {
            let out = job.await;
            let refused_for_model = JOB_MODELS.with(|j| j.borrow().refused_for_model);
            (out, JobOnModels { refused_for_model })
        })
        .await
}

/// The model the running job was answered with by `target`, if any.
fn job_model(target: &str) -> Option<http::HeaderValue> {
    JOB_MODELS.try_with(|j| j.borrow().models.get(target).cloned()).ok().flatten()
}

/// Records `model` as the running job's for `target`, unless it has one.
fn answered_by_model(target: &str, model: &http::HeaderValue) {
    let _ = JOB_MODELS.try_with(|j| {
        j.borrow_mut().models.entry(target.to_string()).or_insert_with(|| model.clone());
    });
}

/// Notes that a replica refused the running job for serving another model.
fn refused_for_model() {
    let _ = JOB_MODELS.try_with(|j| j.borrow_mut().refused_for_model = true);
}

/// One entry of a target.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// One replica at this URI.
    Fixed(String),
    /// Every address `host` resolves to, at `port`.
    Dns { host: String, port: u16 },
}

/// Parses a comma-separated target (see the module's documentation).
fn parse(target: &str) -> Result<Vec<Entry>> {
    let bad = |why: &str| Error::invalid(format!("invalid service address {target:?}: {why}"));
    let mut entries = Vec::new();
    for entry in target.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(bad("an empty entry (addresses are comma-separated: http://a:50051,http://b:50051)"));
        }
        if let Some(rest) = entry.strip_prefix("dns:") {
            // gRPC's name syntax: dns:[//authority/]host:port; a DNS server of our own choosing
            // (the authority) is not supported.
            let name = match rest.strip_prefix("//") {
                Some(with_authority) => match with_authority.split_once('/') {
                    Some(("", name)) => name,
                    _ => return Err(bad("dns: names take no DNS server: write dns:///host:port")),
                },
                None => rest,
            };
            let (host, port) = name
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?)))
                .filter(|(h, _)| !h.is_empty())
                .ok_or_else(|| bad("a dns: entry needs a host and a port (dns:///unet:50051)"))?;
            entries.push(Entry::Dns { host: host.to_string(), port });
        } else {
            let uri = if entry.contains("://") { entry.to_string() } else { format!("http://{entry}") };
            endpoint(&uri)?;
            entries.push(Entry::Fixed(uri));
        }
    }
    Ok(entries)
}

/// How every connection to a replica is made.
fn endpoint(uri: &str) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(uri.to_string())
        .map_err(|e| Error::invalid(format!("invalid endpoint {uri:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // A replica whose machine vanished without closing the connection (a node lost) would
        // otherwise hold its calls until TCP gives up; pings find it within a minute.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

/// One replica: a lazily connecting channel and what this client has seen of it.
struct Replica {
    uri: String,
    channel: Channel,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
    /// The model it last answered with (None: not seen yet).
    model: Mutex<Option<http::HeaderValue>>,
}

#[derive(Default)]
struct Health {
    failures_in_a_row: u32,
    resting_until: Option<Instant>,
    /// When it last failed, even while resting.
    last_failure: Option<Instant>,
}

impl Replica {
    fn new(uri: String) -> Result<Arc<Self>> {
        let channel = endpoint(&uri)?.connect_lazy();
        let (in_flight, health, model) = Default::default();
        Ok(Arc::new(Self { uri, channel, in_flight, health, model }))
    }

    /// Whether it may serve `model`: it does, or it has not said what it serves.
    fn may_serve(&self, model: Option<&http::HeaderValue>) -> bool {
        match (model, self.model.lock().ok().as_deref()) {
            (Some(wanted), Some(Some(served))) => wanted == served,
            _ => true,
        }
    }

    /// Until when it rests (None: it does not).
    fn resting_until(&self, now: Instant) -> Option<Instant> {
        self.health.lock().ok()?.resting_until.filter(|&t| t > now)
    }

    /// When it last failed (None: never, or it answered since).
    fn last_failure(&self) -> Option<Instant> {
        self.health.lock().ok()?.last_failure
    }

    /// Its call failed: it rests, twice as long as last time if it failed again after its
    /// rest. Other calls that fail while it rests (those in flight when it died) do not
    /// lengthen the rest.
    fn failed(&self, why: &str) {
        metrics::counter!("sdmesh_replica_failures_total", "replica" => self.uri.clone()).increment(1);
        let Ok(mut h) = self.health.lock() else { return };
        let now = Instant::now();
        h.last_failure = Some(now);
        if h.resting_until.is_some_and(|t| t > now) {
            tracing::debug!(replica = %self.uri, "replica failed again while resting: {why}");
            return;
        }
        h.failures_in_a_row = h.failures_in_a_row.saturating_add(1);
        let rest = FIRST_REST.saturating_mul(1 << (h.failures_in_a_row - 1).min(16)).min(LONGEST_REST);
        h.resting_until = Some(now + rest);
        tracing::warn!(replica = %self.uri, failures_in_a_row = h.failures_in_a_row, ?rest, "replica failed: {why}");
    }

    fn answered(&self) {
        if let Ok(mut h) = self.health.lock() {
            if h.failures_in_a_row > 0 {
                tracing::info!(replica = %self.uri, "replica answers again");
            }
            *h = Health::default();
        }
    }
}

/// Counts a call in flight on a replica while it lives.
struct InFlight(Arc<Replica>);

impl InFlight {
    fn new(replica: Arc<Replica>) -> Self {
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(replica)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Inner {
    target: String,
    /// The replicas named outright, then those resolved (sorted by URI).
    replicas: RwLock<Vec<Arc<Replica>>>,
    fixed: Vec<String>,
    /// Where ties start: turns round the replicas.
    turn: AtomicUsize,
    /// True once every `dns:` entry has been looked up (None: there are none).
    first_resolution: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Inner {
    /// The replica `pinned` names if it is listed and not resting; else the one with the fewest
    /// calls in flight among those not resting that may serve `model` (all those not resting if
    /// none may: one refuses, and says what it serves); if all rest, the one that failed
    /// longest ago.
    fn pick(&self, pinned: Option<&str>, model: Option<&http::HeaderValue>) -> Option<Arc<Replica>> {
        let replicas = self.replicas.read().ok()?;
        let now = Instant::now();
        let mut awake: Vec<&Arc<Replica>> = replicas.iter().filter(|r| r.resting_until(now).is_none()).collect();
        if let Some(r) = pinned.and_then(|uri| awake.iter().find(|r| r.uri == uri)) {
            return Some((*r).clone());
        }
        if awake.is_empty() {
            return replicas.iter().min_by_key(|r| r.last_failure()).cloned();
        }
        if awake.iter().any(|r| r.may_serve(model)) {
            awake.retain(|r| r.may_serve(model));
        }
        // Turn round the awake ones, so that one resting does not send its turns to its
        // neighbour.
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let n = awake.len();
        (0..n).map(|i| awake[(start + i) % n]).min_by_key(|r| r.in_flight.load(Ordering::Relaxed)).cloned()
    }

    /// Replaces the resolved replicas with `addrs`, keeping those still listed (and what
    /// this client knows of them).
    fn resolved(&self, addrs: &BTreeSet<SocketAddr>) {
        let Ok(mut replicas) = self.replicas.write() else { return };
        let uris: Vec<String> = self.fixed.iter().cloned().chain(addrs.iter().map(|a| format!("http://{a}"))).collect();
        if replicas.iter().map(|r| &r.uri).eq(uris.iter()) {
            return;
        }
        let mut next = Vec::with_capacity(uris.len());
        for uri in uris {
            match replicas.iter().find(|r| r.uri == uri) {
                Some(r) => next.push(r.clone()),
                None => match Replica::new(uri) {
                    Ok(r) => next.push(r),
                    Err(e) => tracing::warn!(target = %self.target, "skipping a resolved address: {e}"),
                },
            }
        }
        tracing::info!(target = %self.target, replicas = ?next.iter().map(|r| &r.uri).collect::<Vec<_>>(), "replicas changed");
        *replicas = next;
    }
}

/// Looks up `names` now and every [`DNS_REFRESH`] until the replica set is dropped. A lookup
/// that fails keeps the replicas it found before.
async fn resolve_forever(inner: Weak<Inner>, names: Vec<(String, u16)>, done: tokio::sync::watch::Sender<bool>) {
    loop {
        let mut addrs = BTreeSet::new();
        let mut all_found = true;
        for (host, port) in &names {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(found) => addrs.extend(found),
                Err(e) => {
                    all_found = false;
                    tracing::warn!(%host, "DNS lookup failed, keeping the replicas found before: {e}");
                }
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        if all_found {
            inner.resolved(&addrs);
        }
        done.send_replace(true);
        drop(inner);
        tokio::time::sleep(DNS_REFRESH).await;
    }
}

/// A channel over one or more replicas of a service (see the module's documentation). Cheap
/// to clone; clones share the replicas and what is known of them. Making one with a `dns:`
/// entry spawns its resolver on the current tokio runtime.
#[derive(Clone)]
pub struct ReplicaSet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSet").field("target", &self.inner.target).finish()
    }
}

impl ReplicaSet {
    pub fn new(target: &str) -> Result<Self> {
        let entries = parse(target)?;
        let mut fixed = Vec::new();
        let mut names = Vec::new();
        for e in entries {
            match e {
                Entry::Fixed(uri) => fixed.push(uri),
                Entry::Dns { host, port } => names.push((host, port)),
            }
        }
        let replicas = fixed.iter().cloned().map(Replica::new).collect::<Result<Vec<_>>>()?;
        let (done, first_resolution) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            target: target.to_string(),
            replicas: RwLock::new(replicas),
            fixed,
            turn: AtomicUsize::new(0),
            first_resolution: (!names.is_empty()).then_some(first_resolution),
        });
        if !names.is_empty() {
            tokio::spawn(resolve_forever(Arc::downgrade(&inner), names, done));
        }
        Ok(Self { inner })
    }

    /// The replicas resting now (they failed lately), by URI.
    pub fn resting(&self) -> Vec<String> {
        let now = Instant::now();
        let replicas = self.inner.replicas.read();
        replicas
            .map(|r| r.iter().filter(|r| r.resting_until(now).is_some()).map(|r| r.uri.clone()).collect())
            .unwrap_or_default()
    }

    /// The replicas' URIs as of now.
    pub fn replicas(&self) -> Vec<String> {
        self.inner.replicas.read().map(|r| r.iter().map(|r| r.uri.clone()).collect()).unwrap_or_default()
    }

    /// The model each replica last answered with, by URI (None: not seen yet).
    pub fn models(&self) -> Vec<(String, Option<String>)> {
        let replicas = self.inner.replicas.read();
        let model = |r: &Replica| r.model.lock().ok()?.as_ref().and_then(|m| m.to_str().ok()).map(str::to_string);
        replicas.map(|r| r.iter().map(|r| (r.uri.clone(), model(r))).collect()).unwrap_or_default()
    }
}

/// A call's error for tonic to find as UNAVAILABLE (boxed once: a `?` on a `Box<Status>` would
/// box it again, and tonic would no longer see the status).
fn unavailable(message: String) -> tonic::codegen::StdError {
    Box::new(tonic::Status::unavailable(message))
}

/// An error and its sources, one line.
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        // Some errors repeat their source's text (hyper's "tcp connect error" twice).
        if parts.last() != Some(&part) {
            parts.push(part);
        }
        source = s.source();
    }
    parts.join(": ")
}

impl tower::Service<http::Request<tonic::body::Body>> for ReplicaSet {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::codegen::StdError;
    type Future = futures::future::BoxFuture<'static, std::result::Result<Self::Response, Self::Error>>;

    /// Always ready: the replica is chosen, and waited for, when the call is made.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        use tower::ServiceExt;
        let inner = self.inner.clone();
        let pinned = request.headers_mut().remove(REPLICA_HEADER);
        // Read here, while the caller's task (and so its job) is current.
        let wanted = job_model(&inner.target);
        if let Some(model) = &wanted {
            request.headers_mut().insert(crate::serve::MODEL_HEADER, model.clone());
        }
        Box::pin(async move {
            if let Some(mut first) = inner.first_resolution.clone() {
                let _ = tokio::time::timeout(FIRST_RESOLUTION_WAIT, first.wait_for(|done| *done)).await;
            }
            let replica =
                inner.pick(pinned.as_ref().and_then(|p| p.to_str().ok()), wanted.as_ref()).ok_or_else(|| {
                    unavailable(format!("no replica of {} (its names resolved to no address)", inner.target))
                })?;
            let _in_flight = InFlight::new(replica.clone());
            let mut channel = replica.channel.clone();
            let response = match channel.ready().await {
                Ok(ready) => ready.call(request).await,
                Err(e) => Err(e),
            };
            match response {
                Ok(mut response) => {
                    if let Ok(uri) = http::HeaderValue::from_str(&replica.uri) {
                        response.headers_mut().insert(REPLICA_HEADER, uri);
                    }
                    let served = response.headers().get(crate::serve::MODEL_HEADER).cloned();
                    if let (Some(served), Ok(mut known)) = (&served, replica.model.lock()) {
                        *known = Some(served.clone());
                    }
                    // Errors come back trailers-only: the status is in the headers.
                    let unavailable =
                        crate::telemetry::grpc_status(response.headers()) == Some(tonic::Code::Unavailable);
                    let refused_for_its_model = unavailable && wanted.is_some() && served.is_some() && served != wanted;
                    if refused_for_its_model {
                        // It serves other jobs well; this job's retry goes to a replica of its model.
                        tracing::debug!(replica = %replica.uri, "replica serves another model than the job's");
                        refused_for_model();
                    } else if unavailable {
                        let message = response
                            .headers()
                            .get("grpc-message")
                            .map(|m| percent_encoding::percent_decode(m.as_bytes()).decode_utf8_lossy().into_owned());
                        replica.failed(&format!("it answered UNAVAILABLE: {}", message.unwrap_or_default()));
                    } else {
                        replica.answered();
                        if let Some(model) = &served {
                            answered_by_model(&inner.target, model);
                        }
                    }
                    Ok(response)
                }
                Err(e) => {
                    // The call never got an answer: UNAVAILABLE, so that it is sent again.
                    let why = with_sources(&e);
                    replica.failed(&why);
                    Err(unavailable(format!("replica {}: {why}", replica.uri)))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_into_fixed_and_dns_entries() {
        let dns = |h: &str, port| Entry::Dns { host: h.into(), port };
        assert_eq!(parse("http://a:1").unwrap(), [Entry::Fixed("http://a:1".into())]);
        assert_eq!(
            parse("a:1, https://b:2,dns:///unet-headless:50051,dns:c:3").unwrap(),
            [
                Entry::Fixed("http://a:1".into()),
                Entry::Fixed("https://b:2".into()),
                dns("unet-headless", 50051),
                dns("c", 3)
            ]
        );
        assert_eq!(parse("dns:///[::1]:7").unwrap(), [dns("::1", 7)]);
        for bad in
            ["", "http://a:1,", "dns:///unet", "dns:///:50051", "dns://8.8.8.8/unet:1", "dns:///u:port", "http://a b"]
        {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
        }
    }

    fn set(uris: &[&str]) -> Inner {
        Inner {
            target: uris.join(","),
            replicas: RwLock::new(uris.iter().map(|u| Replica::new(u.to_string()).unwrap()).collect()),
            fixed: uris.iter().map(|u| u.to_string()).collect(),
            turn: AtomicUsize::new(0),
            first_resolution: None,
        }
    }

    fn picked(inner: &Inner) -> String {
        inner.pick(None, None).unwrap().uri.clone()
    }

    #[tokio::test]
    async fn picks_in_turn_then_the_least_busy_and_avoids_resting_replicas() {
        let inner = set(&["http://a:1", "http://b:1", "http://c:1"]);
        let turns: Vec<String> = (0..6).map(|_| picked(&inner)).collect();
        assert_eq!(turns, ["http://a:1", "http://b:1", "http://c:1", "http://a:1", "http://b:1", "http://c:1"]);

        let a = inner.replicas.read().unwrap()[0].clone();
        let b = inner.replicas.read().unwrap()[1].clone();
        let c = inner.replicas.read().unwrap()[2].clone();
        let busy = [InFlight::new(a.clone()), InFlight::new(b.clone())];
        assert!((0..4).all(|_| picked(&inner) == "http://c:1"), "the one with nothing in flight");
        assert_eq!(inner.pick(Some("http://a:1"), None).unwrap().uri, "http://a:1", "pinned, however busy");
        assert_eq!(picked(&inner), "http://c:1", "a pin holds for its call only");
        drop(busy);
        assert_ne!(inner.pick(Some("http://elsewhere:1"), None).unwrap().uri, "http://elsewhere:1");

        c.failed("test");
        assert!((0..4).all(|_| picked(&inner) != "http://c:1"), "a failed replica rests");
        assert_ne!(inner.pick(Some("http://c:1"), None).unwrap().uri, "http://c:1", "even when pinned");
        a.failed("test");
        b.failed("test");
        let rest = |r: &Replica| r.resting_until(Instant::now()).map(|t| t - Instant::now());
        b.failed("test");
        assert!(rest(&b).unwrap() <= FIRST_REST, "failing again while resting does not lengthen the rest");
        // All rest: the one that failed longest ago (c; then a, then b).
        assert_eq!(picked(&inner), "http://c:1");
        c.answered();
        assert!((0..4).all(|_| picked(&inner) == "http://c:1"));
        // Failures in a row, each after the rest before it: rests double, up to the longest.
        let back_now = |r: &Replica| r.health.lock().unwrap().resting_until = Some(Instant::now());
        back_now(&b);
        b.failed("test");
        assert!(rest(&b).unwrap() > FIRST_REST, "rests double with failures in a row");
        for _ in 0..40 {
            back_now(&b);
            b.failed("test");
        }
        assert!(rest(&b).unwrap() > LONGEST_REST / 2 && rest(&b).unwrap() <= LONGEST_REST);
    }

    /// The last replica that served dies while the only other one rests longer (it failed
    /// over and over before it came up): the retries go to that one, not to the dead one again
    /// each time its short rest ends.
    #[tokio::test]
    async fn when_all_rest_a_call_goes_to_the_one_that_failed_longest_ago() {
        let inner = set(&["http://old:1", "http://new:1"]);
        let r: Vec<Arc<Replica>> = inner.replicas.read().unwrap().clone();
        let (old, new) = (&r[0], &r[1]);
        for _ in 0..4 {
            new.health.lock().unwrap().resting_until = Some(Instant::now());
            new.failed("not up yet");
        }
        assert!(new.resting_until(Instant::now()).unwrap() > Instant::now() + FIRST_REST * 4);
        assert!((0..4).all(|_| picked(&inner) == "http://old:1"));
        old.failed("killed");
        assert_eq!(picked(&inner), "http://new:1", "it rests longer, but failed longer ago");
        new.failed("still down");
        assert_eq!(picked(&inner), "http://old:1", "a failure while resting counts too: calls go round");
        new.answered();
        assert_eq!(picked(&inner), "http://new:1");
    }

    #[tokio::test]
    async fn a_jobs_calls_go_to_replicas_that_may_serve_its_model() {
        let inner = set(&["http://a:1", "http://b:1", "http://c:1"]);
        let r: Vec<Arc<Replica>> = inner.replicas.read().unwrap().clone();
        let m = http::HeaderValue::from_static;
        *r[0].model.lock().unwrap() = Some(m("old"));
        *r[1].model.lock().unwrap() = Some(m("new"));
        let picks = |model: Option<&'static str>| {
            let model = model.map(m);
            (0..6).map(|_| inner.pick(None, model.as_ref()).unwrap().uri.clone()).collect::<BTreeSet<_>>()
        };
        let set = |uris: &[&str]| uris.iter().map(|u| u.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(picks(Some("old")), set(&["http://a:1", "http://c:1"]), "c has not said what it serves");
        assert_eq!(picks(Some("new")), set(&["http://b:1", "http://c:1"]));
        assert_eq!(picks(None), set(&["http://a:1", "http://b:1", "http://c:1"]), "a call outside a job");
        *r[2].model.lock().unwrap() = Some(m("new"));
        assert_eq!(picks(Some("old")), set(&["http://a:1"]));
        r[0].failed("test");
        assert_eq!(
            picks(Some("old")),
            set(&["http://b:1", "http://c:1"]),
            "none awake serves it: one is asked (it refuses, and the job fails)"
        );
    }

    #[tokio::test]
    async fn a_job_keeps_the_first_model_each_target_answered_with() {
        let m = http::HeaderValue::from_static;
        assert_eq!(job_model("unet"), None, "outside a job");
        answered_by_model("unet", &m("x"));
        let ((), went) = one_job(async {
            assert_eq!(job_model("unet"), None, "a job starts with none");
            answered_by_model("unet", &m("first"));
            answered_by_model("unet", &m("second"));
            answered_by_model("vae", &m("v"));
            assert_eq!(job_model("unet"), Some(m("first")));
            assert_eq!(job_model("vae"), Some(m("v")));
            refused_for_model();
        })
        .await;
        assert!(went.refused_for_model);
        let ((), went) = one_job(async { assert_eq!(job_model("unet"), None, "the next job starts afresh") }).await;
        assert!(!went.refused_for_model);
    }

    #[tokio::test]
    async fn resolving_keeps_listed_replicas_and_their_state() {
        let inner = set(&["http://fixed:1"]);
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        inner.resolved(&[addr("10.0.0.1:5"), addr("10.0.0.2:5")].into());
        let uris = |i: &Inner| i.replicas.read().unwrap().iter().map(|r| r.uri.clone()).collect::<Vec<_>>();
        assert_eq!(uris(&inner), ["http://fixed:1", "http://10.0.0.1:5", "http://10.0.0.2:5"]);
        let second = inner.replicas.read().unwrap()[2].clone();
        second.failed("test");
        inner.resolved(&[addr("10.0.0.2:5"), addr("10.0.0.3:5")].into());
        assert_eq!(uris(&inner), ["http://fixed:1", "http://10.0.0.2:5", "http://10.0.0.3:5"]);
        assert!(Arc::ptr_eq(&second, &inner.replicas.read().unwrap()[1]), "the same replica, still resting");
        assert!(second.resting_until(Instant::now()).is_some());
    }
}
