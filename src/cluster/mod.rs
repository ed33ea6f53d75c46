//! The cluster: a coordinator (control plane) and workers (compute and the data-plane ring),
//! connected over authenticated gRPC; `launch` runs a whole local cluster from one config.
pub mod c10d;
pub mod coordinator;
pub mod files;
pub mod launch;
pub mod peer;
pub mod ring;
pub mod signals;
pub mod state;
pub mod status;
pub mod worker;
