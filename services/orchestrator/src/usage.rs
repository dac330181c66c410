//! Usage per tenant (the `x-sdmesh-tenant` metadata), for platforms that account for it:
//! `sdmesh_tenant_jobs_total{tenant,code}`, `sdmesh_tenant_images_total{tenant}` and
//! `sdmesh_tenant_run_seconds{tenant}` (a histogram: each job's time holding a place to run;
//! its `_sum` is the tenant's total).
//!
//! The metadata comes from callers, so its distinct values are bounded as labels: the first
//! [`MAX_TENANT_LABELS`] tenants seen are labelled by name, later ones `_other`, so that a
//! stream of made-up names cannot grow the metrics without bound. A job without a tenant is
//! labelled with the empty string.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// Distinct tenants labelled by name in one process.
pub const MAX_TENANT_LABELS: usize = 1000;

/// The label for `tenant` in the usage metrics.
pub fn label(tenant: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let Ok(mut seen) = SEEN.get_or_init(Mutex::default).lock() else { return "_other".into() };
    if seen.contains(tenant) || seen.len() < MAX_TENANT_LABELS && seen.insert(tenant.to_string()) {
        tenant.to_string()
    } else {
        "_other".into()
    }
}

/// A job of `tenant` ended with `code`.
pub fn job_ended(tenant: &str, code: tonic::Code) {
    metrics::counter!("sdmesh_tenant_jobs_total", "tenant" => label(tenant), "code" => format!("{code:?}"))
        .increment(1);
}

/// `images` were delivered to `tenant`.
pub fn images_delivered(tenant: &str, images: usize) {
    metrics::counter!("sdmesh_tenant_images_total", "tenant" => label(tenant)).increment(images as u64);
}

/// A job of `tenant` held a place to run for `seconds`.
pub fn ran(tenant: &str, seconds: f64) {
    metrics::histogram!("sdmesh_tenant_run_seconds", "tenant" => label(tenant)).record(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_beyond_the_bound_share_one_label() {
        assert_eq!(label("first"), "first");
        for i in 0..MAX_TENANT_LABELS {
            label(&format!("tenant-{i}"));
        }
        assert_eq!(label("one-too-many"), "_other");
        assert_eq!(label("first"), "first", "a tenant seen before keeps its label");
    }
}
