//! etcd's JWT tokens (`--auth-token jwt,pub-key=…,priv-key=…,sign-method=…,ttl=…`): signed
//! claims `username`, `revision` and `exp`, verifiable by any member holding the key, so no
//! member keeps a token table and a token works on every member of a cluster.
//!
//! Parsing the option string ([`parse_auth_token`]) and signing/verifying ([`JwtTokens`]) are
//! pure; only [`JwtOptions::load`] reads the key files. Time is an argument (seconds since the
//! Unix epoch), so expiry is tested without sleeping. Signatures use `jsonwebtoken` on `ring`,
//! the crypto the TLS listeners already use.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::error::AuthError;

/// etcd's default JWT lifetime (the `ttl` option).
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

/// The option names etcd knows; others are warned about and ignored, as etcd does.
const KNOWN_OPTIONS: [&str; 4] = ["sign-method", "pub-key", "priv-key", "ttl"];

/// The `sign-method` values served.
pub const SIGN_METHODS: &str =
    "HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384";

/// What `--auth-token` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// etcd's simple tokens (also the empty flag).
    Simple,
    Jwt(JwtOptions),
}

/// The `jwt,…` options, files not read yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtOptions {
    pub alg: Algorithm,
    pub pub_key: Option<PathBuf>,
    pub priv_key: Option<PathBuf>,
    pub ttl: Duration,
    /// Options etcd does not know (ignored; the caller warns).
    pub unknown: Vec<String>,
}

/// A `--auth-token` value that cannot be served; each names the option at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenOptError {
    #[error("--auth-token: option {0:?} is not key=value")]
    Malformed(String),
    #[error("--auth-token: option {0:?} given twice")]
    Duplicate(String),
    #[error("--auth-token: unknown token type {0:?} (simple or jwt)")]
    UnknownType(String),
    #[error("--auth-token: sign-method is required for jwt (one of {SIGN_METHODS})")]
    MissingSignMethod,
    #[error("--auth-token: sign-method {0:?} is not supported (one of {SIGN_METHODS})")]
    SignMethod(String),
    #[error("--auth-token: ttl {0:?} is not a duration (e.g. 5m, 30s)")]
    Ttl(String),
    #[error("--auth-token: cannot read {option} {path:?}: {err}")]
    Read {
        option: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("--auth-token: missing key data: {0}")]
    MissingKey(&'static str),
    #[error("--auth-token: {option} is not a valid {kind} key for {alg:?}")]
    BadKey {
        option: &'static str,
        kind: &'static str,
        alg: Algorithm,
    },
    #[error("--auth-token: pub-key does not match priv-key")]
    Mismatch,
}

/// Parses etcd's `--auth-token` syntax: the type, then `key=value` options, comma-separated.
pub fn parse_auth_token(s: &str) -> Result<TokenKind, TokenOptError> {
    let mut parts = s.split(',');
    let kind = parts.next().unwrap_or_default();
    let mut opts: Vec<(&str, &str)> = Vec::new();
    for p in parts {
        let mut kv = p.split('=');
        let (Some(k), Some(v), None) = (kv.next(), kv.next(), kv.next()) else {
            return Err(TokenOptError::Malformed(p.to_string()));
        };
        if opts.iter().any(|(seen, _)| *seen == k) {
            return Err(TokenOptError::Duplicate(k.to_string()));
        }
        opts.push((k, v));
    }
    let get = |name: &str| {
        opts.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_empty())
    };
    match kind {
        // etcd ignores options after `simple`.
        "simple" | "" => Ok(TokenKind::Simple),
        "jwt" => {
            let method = get("sign-method").ok_or(TokenOptError::MissingSignMethod)?;
            let alg = sign_method(method)?;
            let ttl = match get("ttl") {
                None => DEFAULT_JWT_TTL,
                Some(t) => crate::server::compaction::parse_go_duration(t)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| TokenOptError::Ttl(t.to_string()))?,
            };
            Ok(TokenKind::Jwt(JwtOptions {
                alg,
                pub_key: get("pub-key").map(PathBuf::from),
                priv_key: get("priv-key").map(PathBuf::from),
                ttl,
                unknown: opts
                    .iter()
                    .filter(|(k, _)| !KNOWN_OPTIONS.contains(k))
                    .map(|(k, _)| k.to_string())
                    .collect(),
            }))
        }
        other => Err(TokenOptError::UnknownType(other.to_string())),
    }
}

/// etcd's sign-method names. ES512 (P-521) is refused: the crypto provider has no P-521.
fn sign_method(name: &str) -> Result<Algorithm, TokenOptError> {
    use Algorithm::*;
    Ok(match name {
        "HS256" => HS256,
        "HS384" => HS384,
        "HS512" => HS512,
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        _ => return Err(TokenOptError::SignMethod(name.to_string())),
    })
}

impl JwtOptions {
    /// Reads the key files and builds the signer/verifier.
    pub fn load(&self) -> Result<JwtTokens, TokenOptError> {
        let read = |option: &'static str, path: &Option<PathBuf>| {
            path.as_ref()
                .map(|p| {
                    std::fs::read(p).map_err(|err| TokenOptError::Read {
                        option,
                        path: p.clone(),
                        err,
                    })
                })
                .transpose()
        };
        let private = read("priv-key", &self.priv_key)?;
        let public = read("pub-key", &self.pub_key)?;
        JwtTokens::from_pem(self.alg, private.as_deref(), public.as_deref(), self.ttl)
    }
}

/// The claims etcd puts in its tokens.
#[derive(Serialize)]
struct IssuedClaims<'a> {
    exp: u64,
    revision: u64,
    username: &'a str,
}

/// The claims read back; `nbf` and `iat` are honoured when present, as etcd's JWT library does.
#[derive(Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
}

/// A JWT signer and verifier. Without a private key (only `pub-key`) it verifies but cannot
/// issue, as in etcd.
pub struct JwtTokens {
    alg: Algorithm,
    ttl: Duration,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtTokens")
            .field("alg", &self.alg)
            .field("ttl", &self.ttl)
            .field("can_sign", &self.encoding.is_some())
            .finish()
    }
}

impl JwtTokens {
    /// Builds from PEM key bytes. With a private key the verifying key is derived from it (a
    /// `pub-key` given too must match); with only a public key tokens are verified, not issued.
    /// HMAC methods take the `priv-key` file's bytes as the secret.
    pub fn from_pem(
        alg: Algorithm,
        private: Option<&[u8]>,
        public: Option<&[u8]>,
        ttl: Duration,
    ) -> Result<JwtTokens, TokenOptError> {
        use Algorithm::*;
        let bad = |option, kind| TokenOptError::BadKey { option, kind, alg };
        let (encoding, decoding) = match alg {
            HS256 | HS384 | HS512 => {
                let secret = private.ok_or(TokenOptError::MissingKey(
                    "priv-key (the HMAC secret) is required",
                ))?;
                (
                    Some(EncodingKey::from_secret(secret)),
                    DecodingKey::from_secret(secret),
                )
            }
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
                let from_public = public
                    .map(|p| DecodingKey::from_rsa_pem(p).map_err(|_| bad("pub-key", "RSA public")))
                    .transpose()?;
                match private {
                    Some(p) => {
                        let der = private_der(p).ok_or(bad("priv-key", "RSA private"))?;
                        let pair = ring::signature::RsaKeyPair::from_der(&der)
                            .or_else(|_| ring::signature::RsaKeyPair::from_pkcs8(&der))
                            .map_err(|_| bad("priv-key", "RSA private"))?;
                        let encoding = EncodingKey::from_rsa_pem(p)
                            .map_err(|_| bad("priv-key", "RSA private"))?;
                        (
                            Some(encoding),
                            DecodingKey::from_rsa_der(pair.public().as_ref()),
                        )
                    }
                    None => (
                        None,
                        from_public
                            .ok_or(TokenOptError::MissingKey("pub-key or priv-key is required"))?,
                    ),
                }
            }
            ES256 | ES384 => {
                let curve = if alg == ES256 {
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING
                } else {
                    &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING
                };
                let from_public = public
                    .map(|p| DecodingKey::from_ec_pem(p).map_err(|_| bad("pub-key", "EC public")))
                    .transpose()?;
                match private {
                    Some(p) => {
                        let kind = "EC private";
                        let der = ec_private_pkcs8(p, alg == ES256).ok_or(bad("priv-key", kind))?;
                        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
                            curve,
                            &der,
                            &ring::rand::SystemRandom::new(),
                        )
                        .map_err(|_| bad("priv-key", kind))?;
                        use ring::signature::KeyPair;
                        (
                            Some(EncodingKey::from_ec_der(&der)),
                            DecodingKey::from_ec_der(pair.public_key().as_ref()),
                        )
                    }
                    None => (
                        None,
                        from_public
                            .ok_or(TokenOptError::MissingKey("pub-key or priv-key is required"))?,
                    ),
                }
            }
            _ => return Err(TokenOptError::SignMethod(format!("{alg:?}"))),
        };
        let mut validation = Validation::new(alg);
        // Expiry and not-before are checked by `verify` against its `now`; etcd requires no
        // claim and ignores audiences.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        validation.leeway = 0;
        let tokens = JwtTokens {
            alg,
            ttl,
            encoding,
            decoding,
            validation,
        };
        if let (Some(_), Some(p)) = (&tokens.encoding, public) {
            // A pub-key given next to priv-key must be the same key pair.
            let probe = tokens
                .issue("", 0, Duration::ZERO)
                .map_err(|_| bad("priv-key", "signing"))?;
            let mut other = JwtTokens::from_pem(alg, None, Some(p), ttl)?;
            other.validation = tokens.validation.clone();
            if other.verify(&probe, Duration::ZERO).is_err() {
                return Err(TokenOptError::Mismatch);
            }
        }
        Ok(tokens)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn can_sign(&self) -> bool {
        self.encoding.is_some()
    }

    /// A token for `user` authenticated at auth `revision`, expiring `ttl` after `now` (time
    /// since the Unix epoch).
    pub fn issue(&self, user: &str, revision: u64, now: Duration) -> Result<String, AuthError> {
        let key = self.encoding.as_ref().ok_or(AuthError::VerifyOnlyKey)?;
        let claims = IssuedClaims {
            exp: (now + self.ttl).as_secs(),
            revision,
            username: user,
        };
        jsonwebtoken::encode(&Header::new(self.alg), &claims, key)
            .map_err(|_| AuthError::TokenGeneration)
    }

    /// The user and auth revision of a token signed with this key by this method and live at
    /// `now`; anything else is `invalid auth token`.
    pub fn verify(&self, token: &str, now: Duration) -> Result<(String, u64), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| AuthError::InvalidAuthToken)?;
        let c = data.claims;
        let now = now.as_secs();
        let live = c.exp.is_none_or(|exp| now <= exp)
            && c.nbf.is_none_or(|nbf| now >= nbf)
            && c.iat.is_none_or(|iat| now >= iat);
        if !live {
            return Err(AuthError::InvalidAuthToken);
        }
        Ok((c.username, c.revision))
    }
}

/// The DER of the first private key in PEM text (PKCS#1, PKCS#8 or SEC1 framing).
fn private_der(pem: &[u8]) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem)
        .ok()
        .map(|k| k.secret_der().to_vec())
}

/// An EC private key as PKCS#8 DER (what the signer takes): PKCS#8 PEM as is, a SEC1 `EC
/// PRIVATE KEY` (what `openssl ecparam -genkey` writes, and etcd accepts) wrapped in a PKCS#8
/// PrivateKeyInfo for the method's curve.
fn ec_private_pkcs8(pem: &[u8], p256: bool) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::PrivateKeyDer;
    match PrivateKeyDer::from_pem_slice(pem).ok()? {
        PrivateKeyDer::Pkcs8(k) => Some(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Sec1(k) => {
            // AlgorithmIdentifier { id-ecPublicKey, the curve's named-curve OID }.
            const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
            const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
            const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
            let curve = if p256 { P256 } else { P384 };
            let alg_id = der(0x30, &[EC_PUBLIC_KEY, curve].concat());
            let version = [0x02, 0x01, 0x00];
            let key = der(0x04, k.secret_sec1_der());
            Some(der(0x30, &[&version[..], &alg_id, &key].concat()))
        }
        _ => None,
    }
}

/// One DER element: tag, definite length, contents.
fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
    let n = contents.len();
    let mut out = vec![tag];
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcd_option_syntax() {
        assert_eq!(parse_auth_token("simple").unwrap(), TokenKind::Simple);
        assert_eq!(parse_auth_token("").unwrap(), TokenKind::Simple);
        let TokenKind::Jwt(o) =
            parse_auth_token("jwt,pub-key=a.pem,priv-key=b.pem,sign-method=RS256").unwrap()
        else {
            panic!("jwt expected")
        };
        assert_eq!(o.alg, Algorithm::RS256);
        assert_eq!(o.ttl, DEFAULT_JWT_TTL);
        assert_eq!(o.pub_key, Some(PathBuf::from("a.pem")));
        assert_eq!(o.priv_key, Some(PathBuf::from("b.pem")));
        let TokenKind::Jwt(o) = parse_auth_token("jwt,sign-method=ES384,ttl=90s,x=1").unwrap()
        else {
            panic!("jwt expected")
        };
        assert_eq!(o.ttl, Duration::from_secs(90));
        assert_eq!(o.unknown, vec!["x".to_string()]);
        for (bad, needle) in [
            ("jwt,sign-method", "not key=value"),
            ("jwt,sign-method=RS256,sign-method=RS256", "twice"),
            ("jwt,priv-key=a", "sign-method is required"),
            ("jwt,sign-method=XX256", "XX256"),
            ("jwt,sign-method=ES512", "ES512"),
            ("jwt,sign-method=RS256,ttl=abc", "ttl"),
            ("foo", "unknown token type"),
        ] {
            let e = parse_auth_token(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    fn now() -> Duration {
        Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn hmac_tokens_carry_user_revision_and_expire() {
        let t =
            JwtTokens::from_pem(Algorithm::HS256, Some(b"secret"), None, DEFAULT_JWT_TTL).unwrap();
        let tok = t.issue("alice", 7, now()).unwrap();
        assert_eq!(t.verify(&tok, now()).unwrap(), ("alice".into(), 7));
        let last = now() + DEFAULT_JWT_TTL;
        assert!(t.verify(&tok, last).is_ok());
        assert_eq!(
            t.verify(&tok, last + Duration::from_secs(1)),
            Err(AuthError::InvalidAuthToken)
        );
        // Another secret, another method, a tampered payload: all invalid.
        let other =
            JwtTokens::from_pem(Algorithm::HS256, Some(b"other"), None, DEFAULT_JWT_TTL).unwrap();
        assert_eq!(other.verify(&tok, now()), Err(AuthError::InvalidAuthToken));
        let hs512 =
            JwtTokens::from_pem(Algorithm::HS512, Some(b"secret"), None, DEFAULT_JWT_TTL).unwrap();
        assert_eq!(hs512.verify(&tok, now()), Err(AuthError::InvalidAuthToken));
        let mut parts: Vec<&str> = tok.split('.').collect();
        let forged = {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(br#"{"exp":9999999999,"revision":7,"username":"root"}"#)
        };
        parts[1] = &forged;
        assert_eq!(
            t.verify(&parts.join("."), now()),
            Err(AuthError::InvalidAuthToken)
        );
        assert_eq!(t.verify("garbage", now()), Err(AuthError::InvalidAuthToken));
    }

    #[test]
    fn ec_keys_sign_verify_and_pub_only_cannot_sign() {
        for (alg, rc) in [
            (Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
            (Algorithm::ES384, &rcgen::PKCS_ECDSA_P384_SHA384),
        ] {
            let pair = rcgen::KeyPair::generate_for(rc).unwrap();
            let (private, public) = (pair.serialize_pem(), pair.public_key_pem());
            let signer =
                JwtTokens::from_pem(alg, Some(private.as_bytes()), None, DEFAULT_JWT_TTL).unwrap();
            let both = JwtTokens::from_pem(
                alg,
                Some(private.as_bytes()),
                Some(public.as_bytes()),
                DEFAULT_JWT_TTL,
            )
            .unwrap();
            let verifier =
                JwtTokens::from_pem(alg, None, Some(public.as_bytes()), DEFAULT_JWT_TTL).unwrap();
            assert!(!verifier.can_sign());
            assert_eq!(verifier.issue("u", 1, now()), Err(AuthError::VerifyOnlyKey));
            let tok = signer.issue("u", 3, now()).unwrap();
            assert_eq!(verifier.verify(&tok, now()).unwrap(), ("u".into(), 3));
            assert_eq!(both.verify(&tok, now()).unwrap(), ("u".into(), 3));
            // A pub-key of another pair is refused at start.
            let stranger = rcgen::KeyPair::generate_for(rc).unwrap().public_key_pem();
            let e = JwtTokens::from_pem(
                alg,
                Some(private.as_bytes()),
                Some(stranger.as_bytes()),
                DEFAULT_JWT_TTL,
            )
            .unwrap_err();
            assert!(matches!(e, TokenOptError::Mismatch), "{e}");
        }
    }

    #[test]
    fn der_lengths() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der(0x30, &[0u8; 200]);
        assert_eq!(&long[..3], &[0x30, 0x81, 200]);
        let longer = der(0x30, &[0u8; 300]);
        assert_eq!(&longer[..4], &[0x30, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn keys_are_required_and_checked() {
        let e = JwtTokens::from_pem(Algorithm::RS256, None, None, DEFAULT_JWT_TTL).unwrap_err();
        assert!(e.to_string().contains("missing key data"), "{e}");
        let e = JwtTokens::from_pem(Algorithm::HS256, None, None, DEFAULT_JWT_TTL).unwrap_err();
        assert!(e.to_string().contains("priv-key"), "{e}");
        let e = JwtTokens::from_pem(Algorithm::RS256, Some(b"nope"), None, DEFAULT_JWT_TTL)
            .unwrap_err();
        assert!(e.to_string().contains("priv-key"), "{e}");
    }
}
