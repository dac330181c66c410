//! A bound on each tenant's jobs across every orchestrator that shares one Redis.
//!
//! Admission (`admission.rs`) bounds the jobs of one orchestrator. A platform runs several
//! orchestrator replicas behind one address, and a tenant's calls land on all of them: a cap of
//! `--max-jobs-per-tenant 4` there lets a tenant run 4 jobs on each replica. This module keeps a
//! tenant's jobs to `--fleet-max-jobs-per-tenant` across the whole fleet (or to its API key's
//! `fleet_max_jobs`, where its key has one).
//!
//! How: each admitted job (waiting or running) holds a lease in Redis, a member of the sorted
//! set `sdmesh:tenant-jobs:{TENANT}` whose score is the lease's expiry (Redis' own clock, so
//! orchestrators' clocks need not agree). A Lua script drops expired leases, counts the rest
//! and adds the new one only if the count is below the cap, atomically. One task per
//! orchestrator renews its leases every third of their life and gives them back when jobs end;
//! an orchestrator that dies leaves leases that expire within one lease (`--fleet-quota-lease`).
//!
//! A job over the cap is refused at once with RESOURCE_EXHAUSTED and a retry hint, like a full
//! line. While Redis cannot be reached, jobs are admitted without the quota (the default: Redis
//! going down must not stop generation) or refused with UNAVAILABLE
//! (`--fleet-quota-on-redis-error refuse`, for platforms that bill by it).

use crate::redis_link::{RedisLink, RedisOptions, Use};
use sdmesh_core::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What to do with a job when Redis cannot say whether its tenant is under the cap.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisError {
    /// Run it, without the fleet-wide quota (each orchestrator's own limits still hold).
    #[default]
    Admit,
    /// Refuse it with UNAVAILABLE.
    Refuse,
}

#[derive(Debug, Clone)]
pub struct QuotaOptions {
    /// Jobs one tenant may have running or waiting across the fleet (at least 1).
    pub max_jobs_per_tenant: usize,
    /// How long a lease lives unless renewed: how long a dead orchestrator's jobs still count.
    pub lease: Duration,
    pub on_redis_error: OnRedisError,
}

/// The Lua that takes a lease: KEYS[1] the tenant's set; ARGV the cap, the lease in ms, the
/// member. Returns {1, count with it} when taken, {0, count} when the tenant is at its cap.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return {1, held + 1}
";

/// The Lua that renews leases: KEYS[1] the tenant's set; ARGV the lease in ms, then the
/// members. A lease that expired meanwhile (Redis was out of reach) is taken again: its job
/// still runs.
const RENEW: &str = r"
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
redis.call('PEXPIREAT', KEYS[1], expiry)
return #ARGV - 1
";

/// The fleet-wide quota of one orchestrator. Cheap to clone.
#[derive(Clone)]
pub struct FleetQuota {
    inner: Arc<Inner>,
}

struct Inner {
    link: Arc<RedisLink>,
    opts: QuotaOptions,
    /// Names this orchestrator's leases: random, so that restarts and replicas never collide.
    instance: String,
    next: AtomicU64,
    /// To the task that renews and gives back leases.
    keeper: mpsc::UnboundedSender<Lease>,
}

enum Lease {
    Held { key: String, member: String },
    Released { key: String, member: String },
}

/// A job's lease; given back when dropped.
pub struct QuotaLease {
    keeper: mpsc::UnboundedSender<Lease>,
    key: String,
    member: String,
}

impl Drop for QuotaLease {
    fn drop(&mut self) {
        let _ = self
            .keeper
            .send(Lease::Released { key: std::mem::take(&mut self.key), member: std::mem::take(&mut self.member) });
    }
}

/// The Redis key of a tenant's leases (the braces keep it in one Redis Cluster slot).
pub fn tenant_key(tenant: &str) -> String {
    format!("sdmesh:tenant-jobs:{{{tenant}}}")
}

impl FleetQuota {
    /// Checks the URL only (Redis need not be up yet), and starts the task that keeps this
    /// orchestrator's leases.
    pub fn new(redis: RedisOptions, opts: QuotaOptions) -> std::result::Result<Self, redis::RedisError> {
        let purpose = Use {
            meanwhile: match opts.on_redis_error {
                OnRedisError::Admit => "admitting jobs without the fleet-wide tenant quota",
                OnRedisError::Refuse => "refusing jobs (--fleet-quota-on-redis-error refuse)",
            },
            name: "fleet-wide tenant quota",
            count_failure: |operation| {
                metrics::counter!("sdmesh_tenant_quota_errors_total", "operation" => operation).increment(1)
            },
        };
        let link = Arc::new(RedisLink::new(redis, purpose)?);
        let opts = QuotaOptions { max_jobs_per_tenant: opts.max_jobs_per_tenant.max(1), ..opts };
        let (keeper, leases) = mpsc::unbounded_channel();
        tokio::spawn(keep(link.clone(), opts.lease, leases));
        let instance = format!("{:016x}", rand::random::<u64>());
        Ok(Self { inner: Arc::new(Inner { link, opts, instance, next: AtomicU64::new(0), keeper }) })
    }

    /// A lease for a job of `tenant`; RESOURCE_EXHAUSTED (retry after `hint`) when the tenant
    /// is at its cap. None when Redis could not be asked and jobs are then admitted.
    pub async fn take(&self, tenant: &str, hint: Duration) -> Result<Option<QuotaLease>> {
        self.take_capped(tenant, None, hint).await
    }

    /// [`Self::take`], with the tenant's own cap (its API key's `fleet_max_jobs`) in place of
    /// `--fleet-max-jobs-per-tenant` when given.
    pub async fn take_capped(&self, tenant: &str, cap: Option<usize>, hint: Duration) -> Result<Option<QuotaLease>> {
        let inner = &self.inner;
        let (cap, whose) = match cap {
            Some(cap) => (cap.max(1), format!("its API key's fleet_max_jobs = {}", cap.max(1))),
            None => (
                inner.opts.max_jobs_per_tenant,
                format!("--fleet-max-jobs-per-tenant {}", inner.opts.max_jobs_per_tenant),
            ),
        };
        let key = tenant_key(tenant);
        let member = format!("{}-{}", inner.instance, inner.next.fetch_add(1, Ordering::Relaxed));
        let mut take = redis::cmd("EVAL");
        take.arg(TAKE).arg(1).arg(&key);
        take.arg(cap).arg(inner.opts.lease.as_millis().max(1) as u64).arg(&member);
        let Some((taken, count)) = inner.link.query::<(i64, i64)>("take", take).await else {
            return match inner.opts.on_redis_error {
                OnRedisError::Admit => Ok(None),
                OnRedisError::Refuse => {
                    metrics::counter!("sdmesh_jobs_refused_total", "reason" => "tenant_quota_unknown").increment(1);
                    Err(Error::Unavailable(
                        "the fleet-wide tenant quota cannot be checked (Redis is out of reach) and this \
                         orchestrator refuses jobs meanwhile (--fleet-quota-on-redis-error refuse); retry later"
                            .into(),
                    ))
                }
            };
        };
        if taken != 1 {
            metrics::counter!("sdmesh_jobs_refused_total", "reason" => "tenant_quota").increment(1);
            return Err(Error::ResourceExhausted {
                message: format!(
                    "tenant {tenant:?} has {count} jobs running or waiting across the orchestrators, the most it \
                     may ({whose}); retry once one ends"
                ),
                retry_after: hint,
            });
        }
        let _ = inner.keeper.send(Lease::Held { key: key.clone(), member: member.clone() });
        Ok(Some(QuotaLease { keeper: inner.keeper.clone(), key, member }))
    }
}

/// Renews this orchestrator's leases every third of their life, and gives back each lease
/// whose job ended. One task does both, so a renewal never brings back a given-back lease.
/// Ends once the quota and every lease are dropped.
async fn keep(link: Arc<RedisLink>, lease: Duration, mut leases: mpsc::UnboundedReceiver<Lease>) {
    let lease_ms = lease.as_millis().max(1) as u64;
    let mut held: HashMap<String, HashSet<String>> = HashMap::new();
    let mut renewal = tokio::time::interval((lease / 3).max(Duration::from_millis(10)));
    renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            lease = leases.recv() => match lease {
                Some(Lease::Held { key, member }) => {
                    held.entry(key).or_default().insert(member);
                }
                Some(Lease::Released { key, member }) => {
                    if let Some(members) = held.get_mut(&key) {
                        members.remove(&member);
                        if members.is_empty() {
                            held.remove(&key);
                        }
                    }
                    let mut release = redis::cmd("ZREM");
                    release.arg(&key).arg(&member);
                    // Not given back (Redis out of reach): it expires within one lease.
                    link.query::<i64>("release", release).await;
                }
                None => return,
            },
            _ = renewal.tick() => {
                for (key, members) in &held {
                    let mut renew = redis::cmd("EVAL");
                    renew.arg(RENEW).arg(1).arg(key).arg(lease_ms).arg(members.iter().collect::<Vec<_>>());
                    link.query::<i64>("renew", renew).await;
                }
            }
        }
    }
}
