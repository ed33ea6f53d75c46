//! The coordinator's RPCs: each handler decodes the request and its caller, calls the
//! coordinator, and encodes the answer; the decisions live in the modules beside it.
use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::Shared;
use super::callers::{Caller, check_any_member};
use crate::cluster::files::file_stream;
use crate::pb::coordinator_server::Coordinator as CoordinatorRpc;
use crate::pb::*;

/// The gRPC face of the coordinator.
pub(super) struct Service(pub(super) Shared);

/// A stream of file chunks, as the transfer calls return it.
type ChunkStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;

fn transfer_stream(dir: &std::path::Path) -> Result<ChunkStream, Status> {
    use tokio_stream::StreamExt;
    let chunks = file_stream(dir).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Box::pin(
        chunks.map(|c| c.map_err(|e| Status::internal(e.to_string()))),
    ))
}

/// Embeddings as whole little-endian f32 values.
fn decode_embeddings(bytes: &[u8]) -> Result<Vec<f32>, Status> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Status::invalid_argument(
            "embeddings must be whole little-endian f32 values",
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let caller = Caller::of(&request);
        let certificate = crate::net::tls::peer_name(&request);
        let req = request.into_inner();
        let joined = self.0.join(&caller, certificate.as_deref(), &req).await?;
        Ok(Response::new(joined))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = Caller::of(&request);
        let member = request.into_inner().member;
        Ok(Response::new(self.0.heartbeat(&caller, member)?))
    }

    async fn next_step(
        &self,
        request: Request<NextStepRequest>,
    ) -> Result<Response<NextStepResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        Ok(Response::new(self.0.next_step(&caller, &req).await?))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        Ok(Response::new(self.0.commit(&caller, req).await?))
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> Result<Response<UploadCheckpointResponse>, Status> {
        let caller = Caller::of(&request);
        let path = self
            .0
            .upload_checkpoint(&caller, request.into_inner())
            .await?;
        Ok(Response::new(UploadCheckpointResponse {
            saved_to: path.display().to_string(),
        }))
    }

    async fn report_eval(
        &self,
        request: Request<EvalReport>,
    ) -> Result<Response<EvalReportResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let values = decode_embeddings(&req.embeddings)?;
        self.0.deliver_page(&caller, &req, values)?;
        Ok(Response::new(EvalReportResponse {}))
    }

    type FetchCheckpointStream = ChunkStream;

    async fn fetch_checkpoint(
        &self,
        request: Request<FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        check_any_member(&self.0.lock(), &Caller::of(&request))?;
        let step = request.into_inner().step;
        let path = self.0.checkpoint_to_fetch(step).await?;
        Ok(Response::new(transfer_stream(&path)?))
    }

    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        request: Request<FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        check_any_member(&self.0.lock(), &Caller::of(&request))?;
        Ok(Response::new(transfer_stream(&self.0.model_dir)?))
    }

    async fn upload_model(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> Result<Response<UploadModelResponse>, Status> {
        let caller = Caller::of(&request);
        let target = self.0.upload_model(&caller, request.into_inner()).await?;
        Ok(Response::new(UploadModelResponse {
            saved_to: target.display().to_string(),
        }))
    }
}
