//! Channels to other services.

use crate::{Error, Result};
use tonic::transport::{Channel, Endpoint};

/// A lazily-connecting channel: the first call connects, and a peer that is not up yet
/// (or went away) fails that call with UNAVAILABLE instead of failing start-up.
pub fn lazy_channel(url: &str) -> Result<Channel> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::invalid(format!("invalid endpoint {url:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}
