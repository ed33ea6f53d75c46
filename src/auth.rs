//! The cluster token: every RPC carries `authorization: Bearer <token>`; servers refuse others.
use std::sync::Arc;

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
        Check(self.clone())
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

/// Refuses requests that do not carry the token.
#[derive(Clone)]
pub struct Check(Token);

impl Interceptor for Check {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get("authorization") {
            Some(v) if self.0.matches(v.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated("missing cluster token")),
        }
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
