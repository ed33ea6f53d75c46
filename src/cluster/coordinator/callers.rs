//! Who calls the coordinator and what they may speak for: the checks every handler makes before
//! it reads or changes the run, and the refusals (logged once a window) when they fail.
use std::net::IpAddr;

use tonic::{Request, Status};

use super::State;
use crate::net::auth::{Identity, MEMBER_HEADER, MemberClaim, log_refusal, name_allows};

/// Who is calling: the address it calls from, the identity its secret proved, and its claim to be
/// a ring member, if it makes one.
pub(super) struct Caller {
    from: Option<IpAddr>,
    identity: Option<Identity>,
    claim: Option<MemberClaim>,
}

impl Caller {
    pub(super) fn of<T>(request: &Request<T>) -> Self {
        Self {
            from: request.remote_addr().map(|a| a.ip()),
            identity: Identity::of(request).cloned(),
            claim: MemberClaim::of(request),
        }
    }

    /// A refusal, logged once a window per cause and address: a caller with a secret that speaks
    /// for someone else is hostile or lost.
    pub(super) fn refused(&self, cause: &'static str, detail: String) -> Status {
        log_refusal(cause, self.from, &detail);
        Status::permission_denied(detail)
    }
}

/// The rank `rank` of the live generation `generation`, which the caller must prove to hold: its
/// claim names the member at that rank and presents that member's ring key. A secret alone lets a
/// worker join; only a member speaks for a rank.
pub(super) fn check_member(
    st: &State,
    generation: u64,
    rank: u32,
    caller: &Caller,
) -> std::result::Result<usize, Status> {
    let r = rank as usize;
    let key = st
        .formation
        .as_ref()
        .filter(|f| f.generation == generation)
        .and_then(|f| f.keys.get(r));
    match (&caller.claim, st.ring.get(r), key) {
        (Some(claim), Some(member), Some(key)) if claim.proves(member.id, key) => Ok(r),
        (None, _, _) => Err(caller.refused(
            "not a member",
            format!("{MEMBER_HEADER} is missing: not a member of the ring"),
        )),
        _ => Err(caller.refused(
            "not the rank it speaks for",
            format!("the caller is not rank {rank} of generation {generation}"),
        )),
    }
}

/// Some member of the ring being formed or live, as its claim proves (fetches of the model and of
/// checkpoints come between `Join` and the first step).
pub(super) fn check_any_member(st: &State, caller: &Caller) -> std::result::Result<(), Status> {
    let claim = caller.claim.as_ref().ok_or_else(|| {
        caller.refused(
            "not a member",
            format!("{MEMBER_HEADER} is missing: not a member"),
        )
    })?;
    let proven = st.formation.as_ref().is_some_and(|f| {
        st.ring
            .iter()
            .zip(&f.keys)
            .any(|(m, key)| claim.proves(m.id, key))
    });
    if proven {
        Ok(())
    } else {
        Err(caller.refused(
            "not a member",
            format!("member {} is not in the ring", claim.id),
        ))
    }
}

/// The worker name the caller proved (its TLS client certificate's, or its credential's), which
/// the worker id it joins with must carry: a worker can join only as itself, so no one ends the
/// ring by joining under a live member's id.
pub(super) fn check_identity(
    caller: &Caller,
    certificate: Option<&str>,
    worker_id: &str,
) -> std::result::Result<(), Status> {
    let names: Vec<&str> = certificate
        .into_iter()
        .chain(match &caller.identity {
            Some(Identity::Worker(name)) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Err(caller.refused(
            "join without a worker identity",
            "a worker joins with its own credential (`multipos credential NAME`, or the cluster \
             token on the worker) or a client certificate"
                .into(),
        ));
    }
    match names.iter().find(|n| !name_allows(n, worker_id)) {
        Some(name) => Err(caller.refused(
            "join under another worker's id",
            format!("worker {name:?} cannot join as {worker_id:?} (ids of {name:?} read {name} or {name}:...)"),
        )),
        None => Ok(()),
    }
}

/// An upload that could not be taken; one past its cap is logged as a refusal.
pub(super) fn upload_refused(caller: &Caller, e: crate::Error) -> Status {
    match e {
        crate::Error::TooLarge(why) => {
            log_refusal("an upload past its cap", caller.from, &why);
            Status::resource_exhausted(why)
        }
        crate::Error::Protocol(why) => {
            log_refusal("a malformed upload", caller.from, &why);
            Status::invalid_argument(why)
        }
        other => Status::invalid_argument(other.to_string()),
    }
}

/// Joins waiting beyond the cap: retryable (a worker backs off and tries again).
pub(super) fn caller_refused_busy(caller: &Caller, waiting: usize) -> Status {
    log_refusal("too many joins waiting", caller.from, &waiting.to_string());
    Status::resource_exhausted(format!(
        "{waiting} workers already wait to join: try again later"
    ))
}
