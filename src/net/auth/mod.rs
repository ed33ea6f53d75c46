//! Who may call: the cluster token (the operator's secret: coordinator, `launch`, `status`), a
//! worker's own credential derived from it (`Worker NAME:MAC`), and, once a worker is in a ring,
//! the keys of its generation. Failed attempts are counted per address and presented identity:
//! their answers are held longer and longer (`throttle`) and each cause is logged once a window
//! (`refusals`); the right credential is always answered at once.
mod refusals;
pub mod throttle;
mod window;

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

pub use refusals::{LOG_WINDOW, RefusalLog, log_refusal};
pub use throttle::Throttled;

/// The fewest characters a cluster token may have.
pub(crate) const MIN_TOKEN_LEN: usize = 16;

/// The shared secret of the run: whoever holds it can act as the operator and derive any worker's
/// credential, so it stays on the coordinator's host (docs/design.md §13).
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
    pub(crate) fn random() -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        let hex: String = (0..32)
            .map(|_| format!("{:x}", rng.random_range(0..16u8)))
            .collect();
        Self(hex.into())
    }

    /// The secret itself (to pass to child processes).
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    fn matches(&self, presented: &[u8]) -> bool {
        same_bytes(format!("Bearer {}", self.0).as_bytes(), presented)
    }

    fn mac(&self, name: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.0.as_bytes()).expect("HMAC takes any key length");
        mac.update(b"multipos worker credential\0");
        mac.update(name.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The credential of worker name `name` (`multipos credential NAME` prints it).
    pub fn credential(&self, name: &str) -> Result<Credential, String> {
        check_worker_name(name)?;
        Ok(Credential {
            name: name.into(),
            mac: self.mac(name),
        })
    }

    /// Client-side interceptor: adds the token to every call (the operator's tools).
    pub fn attach(&self) -> Attach {
        Secret::Token(self.clone()).attach()
    }

    /// Server-side interceptor: admits the token or a valid worker credential, refuses others.
    pub(crate) fn check(&self) -> Check {
        Check {
            token: self.clone(),
        }
    }
}

/// A worker name: what its worker ids start with, and what its credential or TLS certificate says.
fn check_worker_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(format!(
            "worker name {name:?}: 1 to 253 letters, digits, '-', '.' or '_'"
        ));
    }
    Ok(())
}

/// One worker's own secret: its name and an HMAC of it under the cluster token. It proves the name
/// to the coordinator and nothing else: a worker host that holds only its credential cannot speak
/// for another worker.
#[derive(Clone, PartialEq)]
pub struct Credential {
    name: String,
    mac: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}:<redacted>)", self.name)
    }
}

impl Credential {
    /// Reads `NAME:MAC` as `multipos credential` prints it.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (name, mac) = text
            .rsplit_once(':')
            .ok_or("a worker credential reads NAME:MAC (from `multipos credential NAME`)")?;
        check_worker_name(name)?;
        if mac.len() != 64 || !mac.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a worker credential's MAC is 64 hex digits".into());
        }
        Ok(Self {
            name: name.into(),
            mac: mac.to_ascii_lowercase(),
        })
    }

    /// The worker name it proves.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `NAME:MAC`, the form `parse` reads.
    pub(crate) fn expose(&self) -> String {
        format!("{}:{}", self.name, self.mac)
    }
}

/// What a client presents to the coordinator.
#[derive(Clone, Debug)]
pub enum Secret {
    /// The cluster token: the operator (and workers deployed with it).
    Token(Token),
    /// A worker's own credential.
    Worker(Credential),
}

impl Secret {
    /// The credential a worker presents: its own, or the one derived for `name` from the token.
    pub(crate) fn worker_credential(&self, name: &str) -> Result<Credential, String> {
        match self {
            Secret::Token(t) => t.credential(name),
            Secret::Worker(c) => Ok(c.clone()),
        }
    }

    /// Client-side interceptor: adds this secret to every call.
    pub fn attach(&self) -> Attach {
        let header = match self {
            Secret::Token(t) => format!("Bearer {}", t.0),
            Secret::Worker(c) => format!("Worker {}", c.expose()),
        };
        Attach {
            headers: vec![(
                "authorization",
                header.parse().expect("validated ASCII secret"),
            )],
        }
    }

    /// Adds the secret and the caller's ring membership (`MEMBER_HEADER`: its member id and the
    /// secret ring key the coordinator gave it for this generation) to every call.
    pub(crate) fn attach_member(&self, member: u64, key: &str) -> Result<Attach, String> {
        let mut attach = self.attach();
        attach.headers.push((
            MEMBER_HEADER,
            format!("{member}:{key}")
                .parse()
                .map_err(|_| "the ring key is not valid metadata".to_string())?,
        ));
        Ok(attach)
    }
}

/// Who a call's secret proved the caller to be (in the request's extensions once admitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// The cluster token.
    Operator,
    /// A worker credential for this name.
    Worker(String),
}

impl Identity {
    /// The identity `Check` admitted `request` with.
    pub(crate) fn of<T>(request: &Request<T>) -> Option<&Identity> {
        request.extensions().get::<Identity>()
    }
}

/// True when a worker named `name` (by its credential or certificate) may use worker id `id`: the
/// name itself or `NAME:anything` (a host's several workers, `HOST:PID`).
pub(crate) fn name_allows(name: &str, id: &str) -> bool {
    id == name
        || id
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(':'))
}

/// The metadata key with which a ring member proves who it is: `ID:RING_KEY`.
pub const MEMBER_HEADER: &str = "x-multipos-member";

/// The metadata key of a call to a worker's peer server that is not a ring stream (fetching a
/// donor's state): `GENERATION:GENERATION_KEY`, the key every member of that generation received.
pub const GENERATION_HEADER: &str = "x-multipos-generation";

/// A caller's claim to be a ring member, read from `MEMBER_HEADER`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MemberClaim {
    pub id: u64,
    pub key: String,
}

impl MemberClaim {
    /// The claim a request carries, if it carries a well-formed one.
    pub(crate) fn of<T>(request: &Request<T>) -> Option<Self> {
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
    pub(crate) fn proves(&self, id: u64, key: &str) -> bool {
        self.id == id && same_bytes(self.key.as_bytes(), key.as_bytes())
    }
}

/// A `GENERATION:KEY` pair as a metadata header carries it.
pub(crate) fn generation_pass<T>(request: &Request<T>, header: &str) -> Option<(u64, String)> {
    let (g, k) = request
        .metadata()
        .get(header)?
        .to_str()
        .ok()?
        .split_once(':')?;
    Some((g.parse().ok()?, k.to_string()))
}

/// Compares secrets byte by byte regardless of where they differ, so timing says nothing.
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Admits calls that carry the cluster token or a valid worker credential, recording which in the
/// request's [`Identity`]; refuses the others, logging each cause once a window per address.
#[derive(Clone)]
pub(crate) struct Check {
    token: Token,
}

impl Check {
    fn identify(&self, presented: Option<&[u8]>) -> Result<Identity, &'static str> {
        let presented = presented.ok_or("missing cluster token or worker credential")?;
        if self.token.matches(presented) {
            return Ok(Identity::Operator);
        }
        let text = std::str::from_utf8(presented).map_err(|_| "wrong cluster token")?;
        match text.strip_prefix("Worker ") {
            Some(credential) => {
                let c = Credential::parse(credential).map_err(|_| "malformed worker credential")?;
                if same_bytes(self.token.mac(&c.name).as_bytes(), c.mac.as_bytes()) {
                    Ok(Identity::Worker(c.name))
                } else {
                    Err("wrong worker credential")
                }
            }
            None => Err("wrong cluster token"),
        }
    }
}

impl Interceptor for Check {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req.metadata().get("authorization").map(|v| v.as_bytes());
        match self.identify(presented) {
            Ok(identity) => {
                req.extensions_mut().insert(identity);
                Ok(req)
            }
            Err(cause) => {
                log_refusal(cause, req.remote_addr().map(|a| a.ip()), "");
                Err(Status::unauthenticated(cause))
            }
        }
    }
}

/// Adds the secret (and a ring member's claim, once it has one) to outgoing requests.
#[derive(Clone)]
pub struct Attach {
    headers: Vec<(&'static str, MetadataValue<tonic::metadata::Ascii>)>,
}

impl Attach {
    /// Only `GENERATION:KEY` under `header`: what a member presents to another's peer server.
    pub fn pass(header: &'static str, generation: u64, key: &str) -> Result<Self, String> {
        Ok(Self {
            headers: vec![(
                header,
                format!("{generation}:{key}")
                    .parse()
                    .map_err(|_| "the generation key is not valid metadata".to_string())?,
            )],
        })
    }
}

impl Interceptor for Attach {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        for (key, value) in &self.headers {
            req.metadata_mut().insert(*key, value.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_right_secret_is_always_admitted_whatever_failed_before() {
        let token = Token::new("sixteen-chars-xx").unwrap();
        let check = token.check();
        for _ in 0..1000 {
            assert_eq!(
                check.identify(Some(b"Bearer wrong-guess-xxxxx")),
                Err("wrong cluster token")
            );
        }
        assert_eq!(
            check.identify(Some(b"Bearer sixteen-chars-xx")),
            Ok(Identity::Operator)
        );
        let own = token.credential("node-3").unwrap();
        let header = format!("Worker {}", own.expose());
        assert_eq!(
            check.identify(Some(header.as_bytes())),
            Ok(Identity::Worker("node-3".into()))
        );
        // A credential for one name does not prove another.
        let forged = format!("Worker node-4:{}", own.mac);
        assert_eq!(
            check.identify(Some(forged.as_bytes())),
            Err("wrong worker credential")
        );
        let other = Token::new("another-token-xxx")
            .unwrap()
            .credential("node-3")
            .unwrap();
        let header = format!("Worker {}", other.expose());
        assert_eq!(
            check.identify(Some(header.as_bytes())),
            Err("wrong worker credential")
        );
        assert!(check.identify(None).is_err());
    }

    #[test]
    fn credentials_round_trip_and_names_bind_worker_ids() {
        let token = Token::new("sixteen-chars-xx").unwrap();
        let c = token.credential("gpu-node.7").unwrap();
        assert_eq!(Credential::parse(&c.expose()).unwrap(), c);
        assert!(!format!("{c:?}").contains(&c.mac), "Debug hides the MAC");
        assert!(token.credential("a:b").is_err());
        assert!(token.credential("").is_err());
        assert!(Credential::parse("node:abc").is_err());
        assert!(name_allows("node", "node"));
        assert!(name_allows("node", "node:1234"));
        assert!(!name_allows("node", "node2:1234"));
        assert!(!name_allows("node", "other:node"));
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
