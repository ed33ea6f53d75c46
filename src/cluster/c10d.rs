//! c10d's Gloo as the data plane of a ring (docs/design.md §8), through the C++ shim
//! (`src/shim/c10d.cpp`): the coordinator serves a c10d `TCPStore` for the rendezvous, every ring
//! generation makes a Gloo process group of its own under the generation's prefix, and a step's
//! collectives run on it as tensors. A collective is started, then waited for in short slices, so
//! a worker whose generation ends gives it up at once instead of waiting for Gloo's timeout. Gloo
//! cannot cancel it, though: it runs on until it fails or its peers finish it (a stalled peer that
//! wakes), and may then write its result; the worker therefore gives its replica a new gradient
//! buffer whenever it leaves a generation, and the group is let go without waiting for it.
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::fd::IntoRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tch::{Device, Kind, Tensor};
use tokio::sync::watch;

use crate::collective::{Collective, CollectiveError, Wire};
use crate::error::{Error, Result};

#[repr(C)]
struct RawStore {
    _opaque: [u8; 0],
}
#[repr(C)]
struct RawGroup {
    _opaque: [u8; 0],
}
#[repr(C)]
struct RawWork {
    _opaque: [u8; 0],
}

unsafe extern "C" {
    fn multipos_store_serve(
        fd: c_int,
        host: *const c_char,
        port: u16,
        timeout_ms: i64,
        out: *mut *mut RawStore,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn multipos_store_free(store: *mut RawStore);
    fn multipos_gloo_group(
        host: *const c_char,
        port: u16,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        device_host: *const c_char,
        device_interface: *const c_char,
        out: *mut *mut RawGroup,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn multipos_group_free(group: *mut RawGroup, in_flight: c_int);
    fn multipos_all_gather(
        group: *mut RawGroup,
        local: *mut c_void,
        out: *mut *mut RawWork,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn multipos_all_reduce_sum(
        group: *mut RawGroup,
        tensor: *mut c_void,
        out: *mut *mut RawWork,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn multipos_work_wait(
        work: *mut RawWork,
        wait_ms: i64,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn multipos_work_output(work: *mut RawWork) -> *mut c_void;
    fn multipos_work_free(work: *mut RawWork);
}

/// A buffer for the shim's error message.
struct Message([c_char; Message::LEN]);

impl Message {
    /// The buffer's length, as every shim call that takes one is told.
    const LEN: usize = 1024;

    fn new() -> Self {
        Self([0; Self::LEN])
    }
    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr()
    }
    fn text(&self) -> String {
        // SAFETY: the buffer starts zeroed and the shim writes a NUL-terminated message into it.
        unsafe { CStr::from_ptr(self.0.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Usage(format!("{what} {s:?} holds a NUL byte")))
}

/// The c10d `TCPStore` every Gloo group of a run meets through (served by the coordinator).
pub struct StoreServer {
    raw: *mut RawStore,
    /// Where it listens.
    addr: std::net::SocketAddr,
}

// SAFETY: a TCPStore serves from threads of its own and is only freed by its owner.
unsafe impl Send for StoreServer {}
unsafe impl Sync for StoreServer {}

impl StoreServer {
    /// Serves a store on `addr` (`host:port`, port 0 = any free one), and only there.
    pub fn serve(addr: &str) -> Result<Self> {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            Error::Network(format!("cannot listen on {addr} (the Gloo store): {e}"))
        })?;
        let local = listener
            .local_addr()
            .map_err(Error::io("read address of", "the Gloo store"))?;
        let host = c_string("store host", &local.ip().to_string())?;
        let mut raw = std::ptr::null_mut();
        let mut error = Message::new();
        // SAFETY: the shim takes over the listening socket (it closes it with the store); the
        // strings outlive the call and `error` is a buffer of the length passed.
        let failed = unsafe {
            multipos_store_serve(
                listener.into_raw_fd(),
                host.as_ptr(),
                local.port(),
                60_000,
                &mut raw,
                error.ptr(),
                Message::LEN,
            )
        };
        if failed != 0 {
            return Err(Error::Network(format!(
                "cannot serve the Gloo store on {addr}: {}",
                error.text()
            )));
        }
        Ok(Self { raw, addr: local })
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The port it serves on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        // SAFETY: `raw` came from multipos_store_serve and is freed once, here.
        unsafe { multipos_store_free(self.raw) }
    }
}

/// Where and how a generation's Gloo group meets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// The store's address, as this worker dials it.
    pub store_host: String,
    pub store_port: u16,
    /// The generation's key prefix in the store: every generation meets afresh.
    pub prefix: String,
    /// Gloo's connections go out on the address of this host (the worker's `peer_host`)...
    pub device_host: String,
    /// ...or on this network interface, when set (`GLOO_SOCKET_IFNAME`).
    pub interface: Option<String>,
}

/// One generation's Gloo process group.
pub struct GlooGroup {
    raw: *mut RawGroup,
    rank: usize,
    world: usize,
    /// The host buffer gradients of another kind or device are summed in (made on first use).
    staging: Mutex<Option<Tensor>>,
    /// A collective was given up on while running: freeing the group must not wait for it.
    in_flight: AtomicBool,
}

// SAFETY: c10d's process groups are thread-safe; a group is used by one step at a time (the
// collectives take `&mut` of the [`Gloo`] that borrows it) and freed once by its owner.
unsafe impl Send for GlooGroup {}
unsafe impl Sync for GlooGroup {}

impl GlooGroup {
    /// Joins the group of `world` ranks as `rank`; blocks until every rank joined or `timeout`
    /// passed. Every collective of the group is bounded by `timeout` too.
    pub fn join(
        at: &Rendezvous,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let failed = |reason: String| CollectiveError::Connect {
            rank,
            address: format!("{}:{}", at.store_host, at.store_port),
            reason,
        };
        let strings = [
            at.store_host.as_str(),
            at.prefix.as_str(),
            at.device_host.as_str(),
            at.interface.as_deref().unwrap_or(""),
        ]
        .map(|s| CString::new(s).map_err(|_| failed(format!("{s:?} holds a NUL byte"))));
        let [host, prefix, device_host, interface] = strings;
        let (host, prefix, device_host, interface) = (host?, prefix?, device_host?, interface?);
        let mut raw = std::ptr::null_mut();
        let mut error = Message::new();
        // SAFETY: the strings outlive the call, `error` is a buffer of the length passed, and the
        // shim catches C++ exceptions.
        let code = unsafe {
            multipos_gloo_group(
                host.as_ptr(),
                at.store_port,
                prefix.as_ptr(),
                rank as c_int,
                world as c_int,
                timeout.as_millis() as i64,
                device_host.as_ptr(),
                interface.as_ptr(),
                &mut raw,
                error.ptr(),
                Message::LEN,
            )
        };
        if code != 0 {
            return Err(failed(format!("Gloo: {}", error.text())));
        }
        Ok(Self {
            raw,
            rank,
            world,
            staging: Mutex::new(None),
            in_flight: AtomicBool::new(false),
        })
    }

    /// This group driven by a step: a reason published on `abort` gives up the collective in
    /// flight.
    pub fn collective(&self, abort: watch::Receiver<Option<String>>) -> Gloo<'_> {
        Gloo { group: self, abort }
    }

    /// Sums `tensor` (contiguous, on the CPU) over the ranks, in place.
    fn sum(
        &self,
        abort: &watch::Receiver<Option<String>>,
        tensor: &Tensor,
    ) -> Result<(), CollectiveError> {
        self.run(abort, |group, work, error| {
            // SAFETY: `tensor` is a live tch handle; the group's work holds its own reference.
            unsafe {
                multipos_all_reduce_sum(
                    group,
                    tensor.as_ptr() as *mut c_void,
                    work,
                    error,
                    Message::LEN,
                )
            }
        })
        .map(drop)
    }

    /// Starts a collective with `start` and waits for it, giving it up when `abort` carries a
    /// reason; returns its output tensor.
    fn run(
        &self,
        abort: &watch::Receiver<Option<String>>,
        start: impl FnOnce(*mut RawGroup, *mut *mut RawWork, *mut c_char) -> c_int,
    ) -> Result<Tensor, CollectiveError> {
        let mut work = std::ptr::null_mut();
        let mut error = Message::new();
        if start(self.raw, &mut work, error.ptr()) != 0 {
            return Err(CollectiveError::Failed(format!("Gloo: {}", error.text())));
        }
        let outcome = loop {
            // SAFETY: `work` came from the shim and is freed once, below.
            match unsafe { multipos_work_wait(work, 20, error.ptr(), Message::LEN) } {
                0 => break Ok(()),
                1 => break Err(CollectiveError::Failed(format!("Gloo: {}", error.text()))),
                _ => {
                    if let Some(why) = abort.borrow().clone() {
                        self.in_flight.store(true, Ordering::SeqCst);
                        break Err(CollectiveError::Aborted(why));
                    }
                }
            }
        };
        // SAFETY: as above; the output handle is a new tensor that tch owns from here.
        let out =
            outcome.map(|()| unsafe { Tensor::from_ptr(multipos_work_output(work) as *mut _) });
        // SAFETY: `work` is not used after this.
        unsafe { multipos_work_free(work) };
        out
    }
}

impl Drop for GlooGroup {
    fn drop(&mut self) {
        let in_flight = self.in_flight.load(Ordering::SeqCst) as c_int;
        // SAFETY: `raw` came from multipos_gloo_group and is freed once, here.
        unsafe { multipos_group_free(self.raw, in_flight) }
    }
}

/// A [`GlooGroup`] as a step's [`Collective`].
pub struct Gloo<'a> {
    group: &'a GlooGroup,
    abort: watch::Receiver<Option<String>>,
}

impl Gloo<'_> {
    /// Gathers `local` (contiguous, on the CPU) from every rank.
    fn gather(&self, local: &Tensor) -> Result<Tensor, CollectiveError> {
        self.group.run(&self.abort, |group, work, error| {
            // SAFETY: `local` is a live tch handle for the call; the shim copies what it keeps.
            unsafe {
                multipos_all_gather(
                    group,
                    local.as_ptr() as *mut c_void,
                    work,
                    error,
                    Message::LEN,
                )
            }
        })
    }
}

impl Collective for Gloo<'_> {
    fn rank(&self) -> usize {
        self.group.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }

    fn all_gather(&mut self, step: u64, local: &Tensor) -> Result<Tensor, CollectiveError> {
        // Gloo matches collectives by their order alone: the ranks first agree on the step, so
        // a rank a step behind fails the step instead of mixing two steps' values.
        let steps = self.gather(&Tensor::from_slice(&[step as i64]))?;
        let steps = Vec::<i64>::try_from(&steps)
            .map_err(|e: tch::TchError| CollectiveError::Failed(e.to_string()))?;
        if let Some((from, other)) = steps.iter().enumerate().find(|(_, s)| **s != step as i64) {
            return Err(CollectiveError::Protocol {
                from,
                reason: format!("at step {other}, this rank at step {step}"),
            });
        }
        let host = local
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let all = self.gather(&host)?;
        Ok(crate::device::upload(&all, local.device()))
    }

    fn all_reduce_sum(
        &mut self,
        _step: u64,
        grads: &Tensor,
        wire: Wire,
        _bucket_bytes: usize,
    ) -> Result<u64, CollectiveError> {
        if wire == Wire::F32 && grads.device() == Device::Cpu {
            // In place: a sum given up on may still land in this buffer later, which is why a
            // worker leaving its generation gives its replica a new one (`renew_gradients`).
            return self.group.sum(&self.abort, grads).map(|()| 0);
        }
        // Gloo sums host tensors: the gradients cross to the host (in bf16 when the wire says).
        let kind = match wire {
            Wire::F32 => Kind::Float,
            Wire::Bf16 => Kind::BFloat16,
        };
        let mut staging = self
            .group
            .staging
            .lock()
            .map_err(|_| CollectiveError::Failed("the staging buffer was poisoned".into()))?;
        let fits = |t: &Tensor| t.size() == grads.size() && t.kind() == kind;
        if !staging.as_ref().is_some_and(fits) {
            *staging = Some(Tensor::zeros(grads.size(), (kind, Device::Cpu)));
        }
        let buf = staging.as_ref().expect("made above");
        tch::no_grad(|| buf.shallow_clone().copy_(grads));
        self.group.sum(&self.abort, buf)?;
        tch::no_grad(|| grads.shallow_clone().copy_(buf));
        Ok(if grads.device() == Device::Cpu {
            0
        } else {
            2 * grads.numel() as u64 * wire.value_bytes() as u64
        })
    }
}
