//! The fleet-wide tenant quota against a real redis-server (started by the test; `make test`
//! installs it): two quotas stand for two orchestrators sharing it.

use sdmesh_orchestrator::fleet_quota::{tenant_key, FleetQuota, OnRedisError, QuotaOptions};
use sdmesh_orchestrator::redis_link::RedisOptions;
use sdmesh_testkit::process::RedisServer;
use std::time::{Duration, Instant};

fn quota(redis: &RedisServer, max_jobs_per_tenant: usize, lease: Duration, on_redis_error: OnRedisError) -> FleetQuota {
    let redis = RedisOptions {
        url: redis.url(),
        timeout: Duration::from_millis(250),
        ttl: None,
        retry_interval: Duration::from_millis(100),
    };
    FleetQuota::new(redis, QuotaOptions { max_jobs_per_tenant, lease, on_redis_error }).unwrap()
}

/// The leases Redis holds for `tenant`.
fn held(redis: &RedisServer, tenant: &str) -> String {
    redis.command(&["ZCARD", &tenant_key(tenant)]).unwrap()
}

/// Polls until `tenant` gets a lease (a given-back lease reaches Redis a moment after its job).
async fn take_soon(quota: &FleetQuota, tenant: &str, within: Duration) -> sdmesh_orchestrator::fleet_quota::QuotaLease {
    let deadline = Instant::now() + within;
    loop {
        match quota.take(tenant, Duration::from_secs(1)).await {
            Ok(lease) => return lease.expect("redis is up"),
            Err(e) => assert!(Instant::now() < deadline, "still refused: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_tenant_is_bounded_across_orchestrators_and_a_lease_given_back_frees_a_place() {
    let redis = RedisServer::start();
    let lease = Duration::from_secs(30);
    let (first, second) = (quota(&redis, 2, lease, OnRedisError::Admit), quota(&redis, 2, lease, OnRedisError::Admit));
    let hint = Duration::from_millis(1500);
    let a1 = first.take("a", hint).await.unwrap().expect("redis is up");
    let _a2 = second.take("a", hint).await.unwrap().expect("redis is up");
    assert_eq!(held(&redis, "a"), ":2");
    for quota in [&first, &second] {
        let refused = quota.take("a", hint).await.err().expect("a third job of tenant a");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let status = tonic::Status::from(refused);
        assert!(status.message().contains("--fleet-max-jobs-per-tenant 2"), "{}", status.message());
        assert!(status.message().contains("has 2 jobs"), "{}", status.message());
        assert_eq!(sdmesh_core::retry_after(&status), Some(hint));
    }
    // Other tenants are not bound by a's jobs.
    let _b = second.take("b", hint).await.unwrap().expect("redis is up");
    assert_eq!(held(&redis, "b"), ":1");
    // a's job on the first orchestrator ends: the second may run one more for a.
    drop(a1);
    let _a3 = take_soon(&second, "a", Duration::from_secs(5)).await;
    assert_eq!(held(&redis, "a"), ":2");
}

#[tokio::test]
async fn leases_live_while_renewed_and_a_dead_orchestrators_expire() {
    let redis = RedisServer::start();
    let lease = Duration::from_millis(300);
    let (alive, other) = (quota(&redis, 1, lease, OnRedisError::Admit), quota(&redis, 1, lease, OnRedisError::Admit));
    let _running = alive.take("a", Duration::from_secs(1)).await.unwrap().expect("redis is up");
    // Five lease lives later the job still holds its place: its orchestrator renews it.
    tokio::time::sleep(5 * lease).await;
    assert_eq!(held(&redis, "a"), ":1");
    assert!(other.take("a", Duration::from_secs(1)).await.is_err(), "a's job still runs");

    // An orchestrator that died without giving its lease back: the lease counts until it
    // expires, then its place is free.
    let dead = "local t = redis.call('TIME') \
                return redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[1], ARGV[2])";
    assert_eq!(redis.command(&["EVAL", dead, "1", &tenant_key("c"), "600", "dead-orchestrator-1"]).unwrap(), ":1");
    let started = Instant::now();
    assert!(other.take("c", Duration::from_secs(1)).await.is_err(), "the dead orchestrator's lease counts");
    let _c = take_soon(&other, "c", Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(400), "taken before the lease expired");
}

#[tokio::test]
async fn without_redis_jobs_are_admitted_or_refused_as_configured() {
    let mut redis = RedisServer::start();
    let admit = quota(&redis, 1, Duration::from_secs(30), OnRedisError::Admit);
    let refuse = quota(&redis, 1, Duration::from_secs(30), OnRedisError::Refuse);
    redis.kill();
    assert!(admit.take("a", Duration::from_secs(1)).await.unwrap().is_none(), "admitted without a lease");
    let refused = refuse.take("a", Duration::from_secs(1)).await.err().expect("refused while redis is down");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(tonic::Status::from(refused).message().contains("--fleet-quota-on-redis-error"));

    // Redis is back: the quota holds again (after the reconnection interval).
    redis.restart();
    let _a = take_soon(&refuse, "a", Duration::from_secs(5)).await;
    assert!(refuse.take("a", Duration::from_secs(1)).await.is_err());
}

/// A tenant's own cap (its API key's fleet_max_jobs) holds in place of the orchestrators':
/// below it and above it.
#[tokio::test]
async fn a_tenant_may_have_its_own_cap_across_the_fleet() {
    let redis = RedisServer::start();
    let lease = Duration::from_secs(30);
    let (first, second) = (quota(&redis, 2, lease, OnRedisError::Admit), quota(&redis, 2, lease, OnRedisError::Admit));
    let hint = Duration::from_millis(500);
    let _small = first.take_capped("small", Some(1), hint).await.unwrap().expect("redis is up");
    let refused = second.take_capped("small", Some(1), hint).await.err().expect("small's second job");
    let status = tonic::Status::from(refused);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("fleet_max_jobs = 1"), "{}", status.message());
    let mut big = Vec::new();
    for quota in [&first, &second, &first] {
        big.push(quota.take_capped("big", Some(3), hint).await.unwrap().expect("redis is up"));
    }
    assert_eq!(held(&redis, "big"), ":3");
    let refused = second.take_capped("big", Some(3), hint).await.err().expect("big's fourth job");
    assert!(tonic::Status::from(refused).message().contains("fleet_max_jobs = 3"));
    // Without a cap of its own, the orchestrators' holds.
    let _other = first.take_capped("other", None, hint).await.unwrap();
    let _other2 = first.take_capped("other", None, hint).await.unwrap();
    let refused = first.take_capped("other", None, hint).await.err().expect("other's third job");
    assert!(tonic::Status::from(refused).message().contains("--fleet-max-jobs-per-tenant 2"));
}
