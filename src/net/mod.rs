//! Who may talk to whom, and how safely: the cluster token, worker credentials and generation
//! keys (`auth`), TLS for every connection (`tls`) and the certificates it uses (`certs`), and the
//! listener that bounds connections per address (`listen`). Below `cluster/`, above `error`/`io`.
pub mod auth;
pub mod certs;
pub mod listen;
pub mod tls;
