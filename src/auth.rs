//! The cluster token: every RPC carries `authorization: Bearer <token>`; servers refuse others, and
//! refuse an address altogether for a while after too many failed attempts.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The fewest characters a cluster token may have.
pub const MIN_TOKEN_LEN: usize = 16;

/// A shared secret of the run.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Wraps a token of at least [`MIN_TOKEN_LEN`] printable ASCII characters (it travels as an
    /// HTTP header). Guessing is hopeless at that length: 16 random hex digits are 64 bits.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the cluster token must be at least {MIN_TOKEN_LEN} printable ASCII characters \
                 without spaces (got {}); make one with `openssl rand -hex 16`",
                token.len()
            ));
        }
        Ok(Self(token.into()))
    }

    /// A fresh random token (for `launch`, which hands it to its children).
    pub fn random() -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        let hex: String = (0..32)
            .map(|_| format!("{:x}", rng.random_range(0..16u8)))
            .collect();
        Self(hex.into())
    }

    /// The secret itself (to pass to child processes).
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn matches(&self, presented: &[u8]) -> bool {
        same_bytes(format!("Bearer {}", self.0).as_bytes(), presented)
    }

    /// Server-side interceptor: refuses calls without the right token.
    pub fn check(&self) -> Check {
        Check {
            token: self.clone(),
            failures: Arc::default(),
        }
    }

    /// Client-side interceptor: adds the token to every call.
    pub fn attach(&self) -> Attach {
        Attach {
            token: format!("Bearer {}", self.0)
                .parse()
                .expect("validated ASCII token"),
            member: None,
        }
    }

    /// Adds the token and the caller's ring membership (`MEMBER_HEADER`: its member id and the
    /// secret ring key the coordinator gave it for this generation) to every call.
    pub fn attach_member(&self, member: u64, key: &str) -> Result<Attach, String> {
        Ok(Attach {
            member: Some(
                format!("{member}:{key}")
                    .parse()
                    .map_err(|_| "the ring key is not valid metadata".to_string())?,
            ),
            ..self.attach()
        })
    }
}

/// The metadata key with which a ring member proves who it is: `ID:RING_KEY`.
pub const MEMBER_HEADER: &str = "x-multipos-member";

/// A caller's claim to be a ring member, read from `MEMBER_HEADER`.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberClaim {
    pub id: u64,
    pub key: String,
}

impl MemberClaim {
    /// The claim a request carries, if it carries a well-formed one.
    pub fn of<T>(request: &Request<T>) -> Option<Self> {
        let (id, key) = request
            .metadata()
            .get(MEMBER_HEADER)?
            .to_str()
            .ok()?
            .split_once(':')?;
        Some(Self {
            id: id.parse().ok()?,
            key: key.to_string(),
        })
    }

    /// True when the claim names member `id` and presents `key`, compared in time independent of
    /// where they differ.
    pub fn proves(&self, id: u64, key: &str) -> bool {
        self.id == id && same_bytes(self.key.as_bytes(), key.as_bytes())
    }
}

/// Compares secrets byte by byte regardless of where they differ, so timing says nothing.
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses requests that do not carry the token, and every request from an address that failed
/// too often lately.
#[derive(Clone)]
pub struct Check {
    token: Token,
    failures: Arc<Mutex<Failures>>,
}

impl Interceptor for Check {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let now = Instant::now();
        let from = req.remote_addr().map(|a| a.ip());
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = from
            && let Some(left) = failures.locked(ip, now)
        {
            return Err(Status::unauthenticated(format!(
                "too many failed token attempts from {ip}: refused for {}s more",
                left.as_secs() + 1
            )));
        }
        let wrong = match req.metadata().get("authorization") {
            Some(v) if self.token.matches(v.as_bytes()) => return Ok(req),
            Some(_) => "wrong cluster token",
            None => "missing cluster token",
        };
        if let Some(ip) = from
            && failures.failed(ip, now)
        {
            tracing::warn!(%ip, seconds = LOCKOUT.as_secs(), "too many failed token attempts: refusing the address");
        }
        Err(Status::unauthenticated(wrong))
    }
}

/// Failed token attempts an address may make within [`FAILURE_WINDOW`] before it is refused.
pub const MAX_FAILURES: u32 = 20;
/// The span over which failed attempts count.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long an address that failed too often is refused, whatever it presents.
pub const LOCKOUT: Duration = Duration::from_secs(60);
/// Addresses tracked at most; beyond, expired records are dropped and new addresses go uncounted.
const MAX_TRACKED: usize = 4096;

/// Failed token attempts per address, a pure function of the calls and the clock passed in.
#[derive(Debug, Default)]
pub struct Failures {
    by_addr: HashMap<IpAddr, Record>,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    count: u32,
    since: Instant,
    locked_until: Option<Instant>,
}

impl Failures {
    /// How much longer `ip` is refused, if it is.
    pub fn locked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let until = self.by_addr.get(&ip)?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failed attempt; true when it locks the address.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.by_addr.contains_key(&ip) && self.by_addr.len() >= MAX_TRACKED {
            self.by_addr.retain(|_, r| !r.expired(now));
            if self.by_addr.len() >= MAX_TRACKED {
                return false;
            }
        }
        let r = self.by_addr.entry(ip).or_insert(Record {
            count: 0,
            since: now,
            locked_until: None,
        });
        if r.expired(now) {
            *r = Record {
                count: 0,
                since: now,
                locked_until: None,
            };
        }
        r.count += 1;
        if r.count >= MAX_FAILURES && r.locked_until.is_none() {
            r.locked_until = Some(now + LOCKOUT);
            return true;
        }
        false
    }
}

impl Record {
    /// Past its window and any lock: forgotten.
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.since) >= FAILURE_WINDOW
            && self.locked_until.is_none_or(|u| u <= now)
    }
}

/// Adds the token (and a ring member's claim, once it has one) to outgoing requests.
#[derive(Clone)]
pub struct Attach {
    token: MetadataValue<tonic::metadata::Ascii>,
    member: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Interceptor for Attach {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.token.clone());
        if let Some(m) = &self.member {
            req.metadata_mut().insert(MEMBER_HEADER, m.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_that_fails_too_often_is_locked_out_for_a_while_and_others_are_not() {
        let t0 = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut f = Failures::default();
        for i in 1..MAX_FAILURES {
            assert!(!f.failed(a, t0 + Duration::from_millis(i as u64)));
            assert_eq!(f.locked(a, t0), None);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert!(f.failed(a, t1), "the last allowed failure locks");
        assert_eq!(f.locked(a, t1), Some(LOCKOUT));
        assert_eq!(f.locked(b, t1), None, "another address is not affected");
        assert!(!f.failed(a, t1), "a locked address is locked once");
        let after = t1 + LOCKOUT;
        assert_eq!(f.locked(a, after), None, "the lock ends");
        assert!(!f.failed(a, after), "and counting starts over");
        // Failures spread wider than the window never lock.
        let mut f = Failures::default();
        for i in 0..3 * MAX_FAILURES {
            let at = t0 + (FAILURE_WINDOW / (MAX_FAILURES - 1) + Duration::from_millis(1)) * i;
            assert!(!f.failed(b, at), "failure {i}");
        }
    }

    #[test]
    fn tracking_stays_bounded_and_keeps_locked_addresses() {
        let t0 = Instant::now();
        let mut f = Failures::default();
        let locked: IpAddr = "10.1.0.1".parse().unwrap();
        // Its first failure at t0, the one that locks it half a window later.
        f.failed(locked, t0);
        for _ in 1..MAX_FAILURES {
            f.failed(locked, t0 + FAILURE_WINDOW / 2);
        }
        for i in 0..(MAX_TRACKED as u32 + 10) {
            f.failed(IpAddr::from(std::net::Ipv4Addr::from(0x0a02_0000 + i)), t0);
        }
        assert_eq!(f.by_addr.len(), MAX_TRACKED);
        let later = t0 + FAILURE_WINDOW;
        f.failed("10.3.0.1".parse().unwrap(), later);
        assert!(f.by_addr.len() <= MAX_TRACKED);
        assert!(
            f.locked(locked, later).is_some(),
            "expiry never frees a locked address early"
        );
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused_and_claims_prove_only_their_own_key() {
        assert!(Token::new("fifteen-chars-x").is_err());
        assert!(Token::new("sixteen-chars-xx").is_ok());
        assert!(Token::new("sixteen chars xx").is_err());
        assert!(Token::new(Token::random().expose()).is_ok());
        let claim = MemberClaim {
            id: 3,
            key: "abc".into(),
        };
        assert!(claim.proves(3, "abc"));
        assert!(!claim.proves(3, "abd"));
        assert!(!claim.proves(4, "abc"));
        assert!(!claim.proves(3, "abcd"));
    }
}
