//! The safety checker's place in a job: after the last decode, each image is checked (unless
//! the policy is off); flagged ones are reported, and with the replace policy blacked out as
//! diffusers' pipelines do. What happens when the safety service cannot answer is a setting:
//! fail the job (UNAVAILABLE, nothing unchecked leaves) or deliver the images unchecked with a
//! warning.

use candle_core::Tensor;
use sdmesh_core::{Error, Result, SafetyChecker};
use sdmesh_proto::v1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Do not check.
    Off,
    /// Check and report which images were flagged; keep them.
    Flag,
    /// Check, and replace flagged images with black ones (diffusers' behaviour).
    Replace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnUnavailable {
    /// Fail the job with UNAVAILABLE: no unchecked image leaves.
    Fail,
    /// Deliver the images unchecked, with a warning.
    FlagOnly,
}

/// The orchestrator's safety settings.
#[derive(Debug, Clone, Copy)]
pub struct SafetySettings {
    /// For requests that do not choose; None: replace when there is a checker (diffusers'
    /// behaviour), else off.
    pub default_policy: Option<Policy>,
    pub on_unavailable: OnUnavailable,
}

impl Default for SafetySettings {
    fn default() -> Self {
        Self { default_policy: None, on_unavailable: OnUnavailable::Fail }
    }
}

/// Flags of the safety checker.
#[derive(clap::Args, Debug, Clone)]
pub struct SafetyArgs {
    /// The safety-checker service (StableDiffusionSafetyChecker; URLs as --text-encoder-url).
    #[arg(long, env = "SDMESH_SAFETY_URL")]
    pub safety_url: Option<String>,
    /// What to do with flagged images when a request does not say: off, flag (report, keep),
    /// replace (black image, diffusers' behaviour). Unset: replace with --safety-url, else off.
    #[arg(long, env = "SDMESH_SAFETY_POLICY", value_enum)]
    pub safety_policy: Option<Policy>,
    /// When the safety service cannot answer: fail (the job fails with UNAVAILABLE) or
    /// flag-only (the images go out unchecked, with a warning).
    #[arg(long, env = "SDMESH_SAFETY_ON_UNAVAILABLE", value_enum, default_value = "fail")]
    pub safety_on_unavailable: OnUnavailable,
}

impl SafetyArgs {
    pub fn settings(&self) -> anyhow::Result<SafetySettings> {
        if let (Some(p @ (Policy::Flag | Policy::Replace)), None) = (self.safety_policy, &self.safety_url) {
            anyhow::bail!("--safety-policy {p:?} needs --safety-url (a safety service to ask)");
        }
        Ok(SafetySettings { default_policy: self.safety_policy, on_unavailable: self.safety_on_unavailable })
    }
}

/// The request's policy, or the default; asking for a check with no checker is
/// FAILED_PRECONDITION.
pub fn resolve(request: i32, settings: &SafetySettings, has_checker: bool) -> Result<Policy> {
    let asked =
        v1::SafetyPolicy::try_from(request).map_err(|_| Error::invalid(format!("safety: unknown value {request}")))?;
    let policy = match asked {
        v1::SafetyPolicy::Unspecified => match settings.default_policy {
            Some(policy) => policy,
            None if has_checker => Policy::Replace,
            None => Policy::Off,
        },
        v1::SafetyPolicy::Off => Policy::Off,
        v1::SafetyPolicy::Flag => Policy::Flag,
        v1::SafetyPolicy::Replace => Policy::Replace,
    };
    if policy != Policy::Off && !has_checker {
        return Err(Error::failed_precondition(
            "safety: this orchestrator has no safety checker (start it with --safety-url)",
        ));
    }
    Ok(policy)
}

/// What the check found: per image flagged, and whether the images were checked at all.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub flagged: Vec<bool>,
    pub checked: bool,
}

/// Checks `images` (f32 NHWC in [0, 1]) under `policy`; returns the images to deliver
/// (flagged ones black under Replace) and the outcome; warnings are appended.
pub async fn apply(
    checker: Option<&dyn SafetyChecker>,
    policy: Policy,
    on_unavailable: OnUnavailable,
    images: Tensor,
    warnings: &mut Vec<String>,
) -> Result<(Tensor, Outcome)> {
    let n = images.dim(0)?;
    let (Some(checker), true) = (checker, policy != Policy::Off) else {
        return Ok((images, Outcome { flagged: vec![false; n], checked: false }));
    };
    let verdicts = match checker.check(images.clone()).await {
        Ok(v) => v,
        Err(e) => {
            let why = format!("the safety checker could not check the images: {e}");
            return match on_unavailable {
                OnUnavailable::Fail => Err(Error::Unavailable(format!("{why} (--safety-on-unavailable fail)"))),
                OnUnavailable::FlagOnly => {
                    tracing::warn!("{why}; delivering them unchecked");
                    warnings.push(format!("{why}; the images were not checked"));
                    Ok((images, Outcome { flagged: vec![false; n], checked: false }))
                }
            };
        }
    };
    let flagged: Vec<bool> = verdicts.iter().map(|v| v.flagged).collect();
    if flagged.len() != n {
        return Err(Error::internal(format!("the safety checker answered {} verdicts for {n} images", flagged.len())));
    }
    let count = flagged.iter().filter(|&&f| f).count();
    metrics::counter!("sdmesh_safety_flagged_total").increment(count as u64);
    if count > 0 {
        warnings.push(match policy {
            Policy::Replace => {
                format!("{count} of {n} images were flagged by the safety checker and replaced with black images")
            }
            _ => format!("{count} of {n} images were flagged by the safety checker"),
        });
    }
    let images = if policy == Policy::Replace && count > 0 {
        let rows: Vec<Tensor> = (0..n)
            .map(|i| {
                let row = images.narrow(0, i, 1)?;
                if flagged[i] {
                    row.zeros_like()
                } else {
                    Ok(row)
                }
            })
            .collect::<candle_core::Result<_>>()?;
        Tensor::cat(&rows, 0)?
    } else {
        images
    };
    Ok((images, Outcome { flagged, checked: true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: Option<&str>, policy: Option<Policy>) -> SafetyArgs {
        SafetyArgs {
            safety_url: url.map(String::from),
            safety_policy: policy,
            safety_on_unavailable: OnUnavailable::Fail,
        }
    }

    /// Unset, the default follows the checker: replace with one, off without; an explicit
    /// check without a checker is refused at start-up, and per request.
    #[test]
    fn the_default_policy_follows_the_checker() {
        let unset = args(None, None).settings().unwrap();
        let unspecified = v1::SafetyPolicy::Unspecified as i32;
        assert_eq!(resolve(unspecified, &unset, true).unwrap(), Policy::Replace);
        assert_eq!(resolve(unspecified, &unset, false).unwrap(), Policy::Off);
        let flag = args(Some("http://x"), Some(Policy::Flag)).settings().unwrap();
        assert_eq!(resolve(unspecified, &flag, true).unwrap(), Policy::Flag);
        assert_eq!(resolve(v1::SafetyPolicy::Off as i32, &flag, true).unwrap(), Policy::Off);
        assert!(args(None, Some(Policy::Replace)).settings().is_err());
        assert_eq!(args(None, Some(Policy::Off)).settings().unwrap().default_policy, Some(Policy::Off));
        let err = resolve(v1::SafetyPolicy::Flag as i32, &unset, false).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    }
}
