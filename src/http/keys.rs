//! Verification keys: the configured secret or PEM key, and a JWKS document of keys chosen by
//! the token's `kid`. Every key's algorithm is pinned when the key is loaded (from
//! `jwt_algorithm`, or the JWK's required `alg`), never taken from the token. SIGHUP reloads
//! the files; a handshake reads the current set once (an `Arc` behind a read lock).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::auth::{AuthConfigError, AuthError};
use super::hmac_jwt::HmacKey;
use crate::config::{Config, JwtAlgorithm};

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read {key} {}: {source}", path.display())]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is empty (a secret file) or holds no key (a JWKS file).
    #[error("{key} {} holds no key", path.display())]
    Empty {
        /// The configuration key naming the file.
        key: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The JWKS document does not parse, or one of its keys is unusable.
    #[error("jwt_keys_file {}: {message}", path.display())]
    Jwks {
        /// The path.
        path: PathBuf,
        /// What is wrong, naming the key's `kid`.
        message: String,
    },
}

/// One verification key with its pinned algorithm.
struct KeyEntry {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
    /// For an HMAC key: the MAC keyed once (see [`super::hmac_jwt`]).
    mac: Option<HmacKey>,
}

/// How a token is verified: the key chosen for it, with its pinned validation.
pub(crate) enum Verifier<'a> {
    /// An HMAC key, keyed in advance.
    Hmac(&'a HmacKey, &'a Validation),
    /// An RSA or EC key, through `jsonwebtoken::decode`.
    Jwt(&'a DecodingKey, &'a Validation),
}

/// The keys in force: the configured one (`jwt_secret`, `jwt_secret_file` or
/// `jwt_public_key`) and those of `jwt_keys_file`, by `kid`.
pub struct KeySet {
    default: Option<KeyEntry>,
    by_kid: Vec<KeyEntry>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.by_kid.iter().filter_map(|e| e.kid.as_deref()).collect();
        f.debug_struct("KeySet").field("default", &self.default.is_some()).field("kids", &kids).finish()
    }
}

impl KeySet {
    /// Loads the keys the configuration names. `template` carries the claim checks (issuer,
    /// audience, leeway); each key gets a copy with its own algorithm.
    pub fn load(config: &Config, template: &Validation) -> Result<KeySet, AuthConfigError> {
        let pinned = |algorithm: Algorithm, kid: Option<String>, key: DecodingKey| {
            let mut validation = template.clone();
            validation.algorithms = vec![algorithm];
            let mac = key.try_get_as_bytes().ok().and_then(|secret| HmacKey::new(algorithm, secret));
            KeyEntry { kid, key, validation, mac }
        };
        let by_kid = match &config.jwt_keys_file {
            Some(path) => read_jwks(path)?
                .into_iter()
                .map(|(kid, algorithm, key)| pinned(algorithm, Some(kid), key))
                .collect(),
            None => Vec::new(),
        };
        let default = match default_key(config) {
            Ok((algorithm, key)) => Some(pinned(algorithm, None, key)),
            // With a JWKS file the single configured key is optional.
            Err(AuthConfigError::MissingSecret | AuthConfigError::MissingPublicKey) if !by_kid.is_empty() => {
                None
            }
            Err(e) => return Err(e),
        };
        Ok(KeySet { default, by_kid })
    }

    /// The key for a token whose header names `kid`, and its pinned validation: the key whose
    /// `kid` matches; else the configured key; else, when the JWKS holds exactly one key and
    /// the token names none, that key.
    pub(crate) fn select(&self, kid: Option<&str>) -> Result<Verifier<'_>, AuthError> {
        self.entry(kid).map(|e| match &e.mac {
            Some(mac) => Verifier::Hmac(mac, &e.validation),
            None => Verifier::Jwt(&e.key, &e.validation),
        })
    }

    fn entry(&self, kid: Option<&str>) -> Result<&KeyEntry, AuthError> {
        if let Some(kid) = kid
            && let Some(entry) = self.by_kid.iter().find(|e| e.kid.as_deref() == Some(kid))
        {
            return Ok(entry);
        }
        if let Some(entry) = &self.default {
            return Ok(entry);
        }
        match (kid, self.by_kid.as_slice()) {
            (None, [only]) => Ok(only),
            (None, _) => Err(AuthError::Invalid("token has no kid".into())),
            (Some(_), _) => Err(AuthError::Invalid("unknown kid".into())),
        }
    }

    /// Number of keys (configured one included).
    pub fn len(&self) -> usize {
        self.by_kid.len() + usize::from(self.default.is_some())
    }

    /// True when there is no key at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The current [`KeySet`], swapped whole by [`KeyStore::reload`].
pub struct KeyStore {
    current: RwLock<Arc<KeySet>>,
    config: Config,
    template: Validation,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").field("current", &*self.current()).finish()
    }
}

impl KeyStore {
    /// Loads the keys for the first time.
    pub fn new(config: &Config, template: Validation) -> Result<KeyStore, AuthConfigError> {
        let set = KeySet::load(config, &template)?;
        Ok(KeyStore { current: RwLock::new(Arc::new(set)), config: config.clone(), template })
    }

    /// The keys in force (one short read lock).
    pub fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads `jwt_secret_file`, `jwt_public_key` and `jwt_keys_file`. On error the keys in
    /// force stay. Returns the number of keys now in force.
    pub fn reload(&self) -> Result<usize, AuthConfigError> {
        let set = KeySet::load(&self.config, &self.template)?;
        let count = set.len();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(count)
    }
}

/// The single configured key: `jwt_secret` / `jwt_secret_file` for HS256, the PEM file of
/// `jwt_public_key` for RS256 / ES256.
fn default_key(config: &Config) -> Result<(Algorithm, DecodingKey), AuthConfigError> {
    Ok(match config.jwt_algorithm {
        JwtAlgorithm::Hs256 => {
            let secret = match (&config.jwt_secret, &config.jwt_secret_file) {
                (Some(secret), _) => secret.clone(),
                (None, Some(path)) => read_secret_file("jwt_secret_file", path)?,
                (None, None) => return Err(AuthConfigError::MissingSecret),
            };
            (Algorithm::HS256, DecodingKey::from_secret(secret.as_bytes()))
        }
        JwtAlgorithm::Rs256 => (
            Algorithm::RS256,
            DecodingKey::from_rsa_pem(&read_pem(config)?).map_err(AuthConfigError::BadKey)?,
        ),
        JwtAlgorithm::Es256 => {
            (Algorithm::ES256, DecodingKey::from_ec_pem(&read_pem(config)?).map_err(AuthConfigError::BadKey)?)
        }
    })
}

fn read_pem(config: &Config) -> Result<Vec<u8>, AuthConfigError> {
    let path = config.jwt_public_key.as_ref().ok_or(AuthConfigError::MissingPublicKey)?;
    std::fs::read(path)
        .map_err(|source| AuthConfigError::ReadKey { path: path.display().to_string(), source })
}

/// Reads a secret from a file (`jwt_secret_file`, `api_key_file`): the whole content without
/// its trailing line break, so `echo secret > file` works.
pub fn read_secret_file(key: &'static str, path: &Path) -> Result<String, AuthConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(KeyFileError::Empty { key, path: path.to_path_buf() }.into());
    }
    Ok(secret.to_string())
}

/// Reads a JWKS document: every key needs a `kid` and an `alg` whose family matches the key
/// type (`oct` for HS*, `RSA` for RS*/PS*, `EC` for ES*).
fn read_jwks(path: &Path) -> Result<Vec<(String, Algorithm, DecodingKey)>, AuthConfigError> {
    let bad = |message: String| KeyFileError::Jwks { path: path.to_path_buf(), message };
    let text = std::fs::read(path).map_err(|source| KeyFileError::Read {
        key: "jwt_keys_file",
        path: path.to_path_buf(),
        source,
    })?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("not a JWKS document ({{\"keys\":[…]}}): {e}")))?;
    if set.keys.is_empty() {
        return Err(KeyFileError::Empty { key: "jwt_keys_file", path: path.to_path_buf() }.into());
    }
    let mut keys = Vec::with_capacity(set.keys.len());
    for (index, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.common.key_id.clone().ok_or_else(|| bad(format!("key #{index} has no kid")))?;
        if keys.iter().any(|(k, _, _)| *k == kid) {
            return Err(bad(format!("kid {kid:?} appears twice")).into());
        }
        let alg = jwk.common.key_algorithm.ok_or_else(|| bad(format!("key {kid:?} has no alg")))?;
        let algorithm = Algorithm::try_from(alg)
            .map_err(|_| bad(format!("key {kid:?}: alg {alg} cannot verify tokens")))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("key {kid:?}: {e}")))?;
        if key.family() != algorithm.family() {
            return Err(bad(format!("key {kid:?}: alg {alg} does not match the key type")).into());
        }
        keys.push((kid, algorithm, key));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("customws-keys-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn jwks_config(text: &str, name: &str) -> Config {
        Config { jwt_keys_file: Some(write(name, text)), ..Config::default() }
    }

    #[test]
    fn jwks_needs_kid_alg_and_matching_type() {
        let template = Validation::new(Algorithm::HS256);
        let no_alg = jwks_config(r#"{"keys":[{"kty":"oct","kid":"a","k":"c2VjcmV0"}]}"#, "noalg");
        assert!(KeySet::load(&no_alg, &template).unwrap_err().to_string().contains("has no alg"));
        let no_kid = jwks_config(r#"{"keys":[{"kty":"oct","alg":"HS256","k":"c2VjcmV0"}]}"#, "nokid");
        assert!(KeySet::load(&no_kid, &template).unwrap_err().to_string().contains("has no kid"));
        let wrong =
            jwks_config(r#"{"keys":[{"kty":"oct","kid":"a","alg":"RS256","k":"c2VjcmV0"}]}"#, "wrong");
        assert!(KeySet::load(&wrong, &template).unwrap_err().to_string().contains("does not match"));
        let good = jwks_config(r#"{"keys":[{"kty":"oct","kid":"a","alg":"HS256","k":"c2VjcmV0"}]}"#, "good");
        assert_eq!(KeySet::load(&good, &template).unwrap().len(), 1);
    }

    #[test]
    fn secret_file_drops_the_trailing_newline() {
        let path = write("secret", "s3cret\n");
        assert_eq!(read_secret_file("jwt_secret_file", &path).unwrap(), "s3cret");
        let empty = write("empty", "\n");
        assert!(read_secret_file("jwt_secret_file", &empty).is_err());
    }
}
