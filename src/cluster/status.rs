//! Asking a running coordinator how the run goes (`multipos status`, `launch`'s progress bar).
use std::time::Duration;

use crate::cluster::ring::connect_with_retry;
use crate::error::{Error, Result};
use crate::net::auth::Token;
use crate::net::tls::Tls;
use crate::pb::coordinator_client::CoordinatorClient;
use crate::pb::{StatusRequest, StatusResponse};

/// A client of one coordinator's `Status`.
pub(crate) struct StatusClient {
    client: CoordinatorClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            crate::net::auth::Attach,
        >,
    >,
}

impl StatusClient {
    /// Connects to `address`, trying for at most `timeout`.
    pub(crate) async fn connect(
        address: &str,
        token: &Token,
        tls: Option<&Tls>,
        timeout: Duration,
    ) -> Result<Self> {
        let channel = connect_with_retry(address, timeout, tls)
            .await
            .map_err(|e| {
                Error::Network(format!("cannot reach the coordinator at {address}: {e}"))
            })?;
        Ok(Self {
            client: CoordinatorClient::with_interceptor(channel, token.attach()),
        })
    }

    /// The run as the coordinator sees it now.
    pub(crate) async fn get(&mut self) -> Result<StatusResponse> {
        let mut request = tonic::Request::new(StatusRequest {});
        request.set_timeout(Duration::from_secs(10));
        let reply = self
            .client
            .status(request)
            .await
            .map_err(|s| Error::Network(format!("the coordinator refused: {}", s.message())))?;
        Ok(reply.into_inner())
    }
}
