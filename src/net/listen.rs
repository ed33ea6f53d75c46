//! A listener that holds at most a fixed number of open connections per client address: one host
//! (or one NAT) cannot exhaust the coordinator's sockets and tasks, however many it opens.
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::net::auth::log_refusal;

/// Open connections one address may hold: a node's workers (one channel each, and one more while
/// a generation re-forms), `status` calls and `launch`'s watcher, with room to spare.
pub(crate) const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;

type Open = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// An accepted connection, counted against its address until dropped.
pub(crate) struct Counted {
    inner: TcpStream,
    ip: IpAddr,
    open: Open,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The connections of `listener`, each address's beyond `cap` closed at once (and logged once a
/// window).
pub(crate) fn capped(
    listener: TcpListener,
    cap: usize,
) -> impl Stream<Item = std::io::Result<Counted>> + Send + 'static {
    let open: Open = Arc::default();
    tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |accepted| {
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        let ip = stream.peer_addr().ok()?.ip();
        let mut counts = open.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_default();
        if *n >= cap {
            drop(counts);
            log_refusal("too many connections from one address", Some(ip), "");
            return None;
        }
        *n += 1;
        drop(counts);
        Some(Ok(Counted {
            inner: stream,
            ip,
            open: open.clone(),
        }))
    })
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Connections past the cap from one address are closed; another address and a freed slot
    /// are served.
    #[tokio::test]
    async fn an_address_holds_at_most_cap_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(capped(listener, 2));
        let connect = |from: &'static str| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            socket.connect(addr).await.unwrap()
        };
        let _a1 = connect("127.0.0.2").await;
        let _a2 = connect("127.0.0.2").await;
        let mut a3 = connect("127.0.0.2").await;
        let _b1 = connect("127.0.0.3").await;
        let first = accepted.next().await.unwrap().unwrap();
        let _second = accepted.next().await.unwrap().unwrap();
        // The third from 127.0.0.2 is skipped: the next one handed out is 127.0.0.3's.
        let other = accepted.next().await.unwrap().unwrap();
        assert_eq!(other.ip.to_string(), "127.0.0.3");
        let mut byte = [0u8; 1];
        assert_eq!(a3.read(&mut byte).await.unwrap(), 0, "closed by the server");
        drop(first);
        let _a4 = connect("127.0.0.2").await;
        let again = accepted.next().await.unwrap().unwrap();
        assert_eq!(again.ip.to_string(), "127.0.0.2", "a freed slot is served");
    }
}
