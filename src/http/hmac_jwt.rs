//! HMAC-signed tokens (HS256, HS384, HS512) verified with a MAC keyed once, when the key is
//! loaded, instead of once per token.
//!
//! jsonwebtoken 11 builds its verifier from the raw secret for every token (its
//! `CryptoProvider::verifier_factory` is a plain `fn(&Algorithm, &DecodingKey)`, so no keyed
//! state can be kept there), and `decode` parses the header twice and the claims twice. Here
//! the token is split and its header decoded once (by [`Parts`], for every key kind: the
//! header names the key), the MAC is a clone of the keyed one (the HMAC key set-up is two
//! hash blocks per token saved), the comparison is constant-time (`Mac::verify_slice`), and the
//! claims are checked with the rules of jsonwebtoken's `validate`, which the crate does not
//! export: [`validate`] below mirrors jsonwebtoken 11.1's `validation.rs` (MIT), reading the
//! same [`Validation`] the key would have been checked with. The tests compare both paths on
//! the same tokens. RSA and EC keys still go through `jsonwebtoken::decode`.

use std::borrow::Cow;
use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use sha2::{Sha256, Sha384, Sha512};

/// A MAC keyed with one secret for one pinned algorithm; cloned for each token.
#[derive(Clone)]
pub(crate) enum HmacKey {
    /// HMAC-SHA-256.
    Hs256(Hmac<Sha256>),
    /// HMAC-SHA-384.
    Hs384(Hmac<Sha384>),
    /// HMAC-SHA-512.
    Hs512(Hmac<Sha512>),
}

impl HmacKey {
    /// The keyed MAC for `algorithm`; `None` for an algorithm that is not HMAC.
    pub(crate) fn new(algorithm: Algorithm, secret: &[u8]) -> Option<Self> {
        Some(match algorithm {
            Algorithm::HS256 => HmacKey::Hs256(Hmac::new_from_slice(secret).ok()?),
            Algorithm::HS384 => HmacKey::Hs384(Hmac::new_from_slice(secret).ok()?),
            Algorithm::HS512 => HmacKey::Hs512(Hmac::new_from_slice(secret).ok()?),
            _ => return None,
        })
    }

    /// Whether `signature` is the MAC of `message` (compared in constant time).
    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        fn check<M: Mac + Clone>(keyed: &M, message: &[u8], signature: &[u8]) -> bool {
            let mut mac = keyed.clone();
            mac.update(message);
            mac.verify_slice(signature).is_ok()
        }
        match self {
            HmacKey::Hs256(keyed) => check(keyed, message, signature),
            HmacKey::Hs384(keyed) => check(keyed, message, signature),
            HmacKey::Hs512(keyed) => check(keyed, message, signature),
        }
    }
}

/// A compact JWS split as jsonwebtoken splits it (at the last two dots), with its header
/// decoded.
pub(crate) struct Parts<'a> {
    /// `header.payload`: what the signature covers.
    message: &'a [u8],
    payload: &'a [u8],
    signature: &'a [u8],
    /// The decoded header.
    pub(crate) header: Header,
}

impl<'a> Parts<'a> {
    /// Splits `token` and decodes its header; errors as jsonwebtoken's `decode_header`.
    pub(crate) fn new(token: &'a str) -> Result<Self, Error> {
        let token = token.as_bytes();
        let (message, signature) = split_last_dot(token)?;
        let (header, payload) = split_last_dot(message)?;
        let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header)?)?;
        Ok(Parts { message, payload, signature, header })
    }

    /// Verifies the MAC and the claims; returns the claims, parsed and as the token's JSON
    /// text. Errors as `jsonwebtoken::decode` with an HMAC key and `validation`, in the same
    /// order.
    pub(crate) fn verify(&self, key: &HmacKey, validation: &Validation) -> Result<(Value, String), Error> {
        // jsonwebtoken builds its verifier for the header's algorithm with the key's secret;
        // our keys are each pinned to one algorithm, which the header must name.
        let pinned = key_algorithm(key);
        if !validation.algorithms.contains(&self.header.alg)
            || validation.algorithms.iter().any(|alg| alg.family() != pinned.family())
            || self.header.alg != pinned
        {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        let signature = URL_SAFE_NO_PAD.decode(self.signature)?;
        if !key.verifies(self.message, &signature) {
            return Err(ErrorKind::InvalidSignature.into());
        }
        let payload = URL_SAFE_NO_PAD.decode(self.payload)?;
        let claims: Value = serde_json::from_slice(&payload)?;
        validate(serde_json::from_slice(&payload)?, validation)?;
        // It parsed, so it is UTF-8 (serde_json checks every string; the rest is ASCII).
        let text = String::from_utf8(payload)?;
        Ok((claims, text))
    }
}

fn key_algorithm(key: &HmacKey) -> Algorithm {
    match key {
        HmacKey::Hs256(_) => Algorithm::HS256,
        HmacKey::Hs384(_) => Algorithm::HS384,
        HmacKey::Hs512(_) => Algorithm::HS512,
    }
}

/// `(before, after)` the last `.`, both required (jsonwebtoken's `rsplitn(2, '.')` + `expect_two!`).
fn split_last_dot(bytes: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let dot = memchr::memrchr(b'.', bytes).ok_or_else(|| Error::from(ErrorKind::InvalidToken))?;
    Ok((&bytes[..dot], &bytes[dot + 1..]))
}

// ----- claim checks: jsonwebtoken 11.1 `validation.rs`, mirrored --------------------------------

#[derive(Deserialize)]
struct ClaimsForValidation<'a> {
    #[serde(deserialize_with = "numeric_type", default)]
    exp: TryParse<u64>,
    #[serde(deserialize_with = "numeric_type", default)]
    nbf: TryParse<u64>,
    #[serde(borrow)]
    sub: TryParse<Cow<'a, str>>,
    #[serde(borrow)]
    iss: TryParse<OneOrMany<'a>>,
    #[serde(borrow)]
    aud: TryParse<OneOrMany<'a>>,
}

#[derive(Default, Debug)]
enum TryParse<T> {
    Parsed(T),
    FailedToParse,
    #[default]
    NotPresent,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TryParse<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(deserializer) {
            Ok(Some(value)) => TryParse::Parsed(value),
            Ok(None) => TryParse::NotPresent,
            Err(_) => TryParse::FailedToParse,
        })
    }
}

/// `iss` / `aud`: a string or a set of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<'a> {
    Single(#[serde(borrow)] Cow<'a, str>),
    Multiple(#[serde(borrow)] HashSet<BorrowedCow<'a>>),
}

#[derive(Deserialize, PartialEq, Eq, Hash)]
struct BorrowedCow<'a>(#[serde(borrow)] Cow<'a, str>);

impl OneOrMany<'_> {
    /// Whether the claim names one of `accepted`.
    fn meets(&self, accepted: &HashSet<String>) -> bool {
        match self {
            OneOrMany::Single(one) => accepted.contains(&**one),
            OneOrMany::Multiple(many) => many.iter().any(|one| accepted.contains(&*one.0)),
        }
    }
}

/// A NumericDate as jsonwebtoken reads it for validation: an unsigned integer, or a finite
/// non-negative float rounded; anything else is "failed to parse".
fn numeric_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<TryParse<u64>, D::Error> {
    struct NumericType;

    impl serde::de::Visitor<'_> for NumericType {
        type Value = TryParse<u64>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("A NumericType that can be reasonably coerced into a u64")
        }

        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Self::Value, E> {
            Ok(TryParse::Parsed(value))
        }

        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Self::Value, E> {
            if value.is_finite() && value >= 0.0 && value < (u64::MAX as f64) {
                Ok(TryParse::Parsed(value.round() as u64))
            } else {
                Err(serde::de::Error::custom("NumericType must be representable as a u64"))
            }
        }
    }

    Ok(deserializer.deserialize_any(NumericType).unwrap_or(TryParse::FailedToParse))
}

fn validate(claims: ClaimsForValidation, options: &Validation) -> Result<(), Error> {
    for required in &options.required_spec_claims {
        let present = match required.as_str() {
            "exp" => matches!(claims.exp, TryParse::Parsed(_)),
            "sub" => matches!(claims.sub, TryParse::Parsed(_)),
            "iss" => matches!(claims.iss, TryParse::Parsed(_)),
            "aud" => matches!(claims.aud, TryParse::Parsed(_)),
            "nbf" => matches!(claims.nbf, TryParse::Parsed(_)),
            _ => continue,
        };
        if !present {
            return Err(ErrorKind::MissingRequiredClaim(required.clone()).into());
        }
    }
    if options.validate_exp || options.validate_nbf {
        let now = jsonwebtoken::get_current_timestamp();
        if options.validate_exp && matches!(claims.exp, TryParse::FailedToParse) {
            return Err(ErrorKind::InvalidClaimFormat("exp".into()).into());
        }
        if options.validate_nbf && matches!(claims.nbf, TryParse::FailedToParse) {
            return Err(ErrorKind::InvalidClaimFormat("nbf".into()).into());
        }
        let reject_before = options.reject_tokens_expiring_in_less_than;
        if matches!(claims.exp, TryParse::Parsed(exp) if exp < reject_before) {
            return Err(ErrorKind::InvalidToken.into());
        }
        // (jsonwebtoken subtracts without saturating; a leeway beyond the epoch cannot occur.)
        if matches!(claims.exp, TryParse::Parsed(exp)
            if options.validate_exp && exp - reject_before < now.saturating_sub(options.leeway))
        {
            return Err(ErrorKind::ExpiredSignature.into());
        }
        if matches!(claims.nbf, TryParse::Parsed(nbf)
            if options.validate_nbf && nbf > now.saturating_add(options.leeway))
        {
            return Err(ErrorKind::ImmatureSignature.into());
        }
    }
    if let (TryParse::Parsed(sub), Some(correct)) = (&claims.sub, options.sub.as_deref())
        && sub != correct
    {
        return Err(ErrorKind::InvalidSubject.into());
    }
    if let (TryParse::Parsed(iss), Some(correct)) = (&claims.iss, options.iss.as_ref())
        && !iss.meets(correct)
    {
        return Err(ErrorKind::InvalidIssuer.into());
    }
    if !options.validate_aud {
        return Ok(());
    }
    match (&claims.aud, options.aud.as_ref()) {
        // A present audience must name us; with none configured, any audience is refused.
        (TryParse::Parsed(_), None) => Err(ErrorKind::InvalidAudience.into()),
        (TryParse::Parsed(aud), Some(correct)) if !aud.meets(correct) => {
            Err(ErrorKind::InvalidAudience.into())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, EncodingKey};
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign_with(header: &Header, claims: &Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn sign(claims: &Value) -> String {
        sign_with(&Header::new(Algorithm::HS256), claims, SECRET)
    }

    /// A token whose parts are given as raw JSON / bytes, signed with HS256 over exactly them.
    fn raw_token(header: &str, claims: &str) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.as_bytes()),
            URL_SAFE_NO_PAD.encode(claims.as_bytes())
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
        mac.update(message.as_bytes());
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    fn validations() -> Vec<Validation> {
        let mut base = Validation::new(Algorithm::HS256);
        base.validate_nbf = true;
        base.leeway = 0;
        base.iss = None;
        base.validate_aud = false;
        let mut with_leeway = base.clone();
        with_leeway.leeway = 30;
        let mut iss_aud = base.clone();
        iss_aud.set_issuer(&["issuer"]);
        iss_aud.required_spec_claims.insert("iss".into());
        iss_aud.set_audience(&["aud-1"]);
        iss_aud.validate_aud = true;
        iss_aud.required_spec_claims.insert("aud".into());
        let mut aud_unconfigured = base.clone();
        aud_unconfigured.validate_aud = true;
        vec![base, with_leeway, iss_aud, aud_unconfigured]
    }

    /// Ours and jsonwebtoken's answers for `token`, as the 401 reason or the claims.
    fn both(token: &str, validation: &Validation) -> (Result<Value, String>, Result<Value, String>) {
        let problem = |e: Error| crate::http::auth::jwt_problem(&e).to_string();
        let key = HmacKey::new(Algorithm::HS256, SECRET).unwrap();
        let ours = Parts::new(token)
            .and_then(|parts| parts.verify(&key, validation))
            .map(|(claims, text)| {
                assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), claims, "the text is the claims");
                claims
            })
            .map_err(problem);
        let theirs = jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(SECRET), validation)
            .map(|data| data.claims)
            .map_err(problem);
        (ours, theirs)
    }

    fn assert_same(token: &str, what: &str) -> Result<Value, String> {
        let mut first = None;
        for validation in validations() {
            let (ours, theirs) = both(token, &validation);
            assert_eq!(ours, theirs, "{what}: {token} with {validation:?}");
            first.get_or_insert(ours);
        }
        first.unwrap()
    }

    #[test]
    fn claims_are_judged_as_jsonwebtoken_judges_them() {
        let t = now();
        let cases = [
            ("valid", json!({"user_id": 1, "exp": t + 100})),
            ("exp boundary, now", json!({"user_id": 1, "exp": t})),
            ("expired 1 s", json!({"user_id": 1, "exp": t - 1})),
            ("expired within leeway", json!({"user_id": 1, "exp": t - 20})),
            ("expired beyond leeway", json!({"user_id": 1, "exp": t - 40})),
            ("fractional exp rounds", json!({"user_id": 1, "exp": (t as f64) - 0.4})),
            ("fractional exp, past", json!({"user_id": 1, "exp": (t as f64) - 0.6})),
            ("missing exp", json!({"user_id": 1})),
            ("string exp", json!({"user_id": 1, "exp": "soon"})),
            ("negative exp", json!({"user_id": 1, "exp": -5})),
            ("null exp", json!({"user_id": 1, "exp": null})),
            ("huge exp", json!({"user_id": 1, "exp": 1e300})),
            ("nbf now", json!({"user_id": 1, "exp": t + 100, "nbf": t})),
            ("nbf 1 s ahead", json!({"user_id": 1, "exp": t + 100, "nbf": t + 1})),
            ("nbf within leeway", json!({"user_id": 1, "exp": t + 100, "nbf": t + 20})),
            ("nbf beyond leeway", json!({"user_id": 1, "exp": t + 100, "nbf": t + 40})),
            ("bad nbf", json!({"user_id": 1, "exp": t + 100, "nbf": "x"})),
            ("issuer ok", json!({"user_id": 1, "exp": t + 100, "iss": "issuer", "aud": "aud-1"})),
            ("issuer wrong", json!({"user_id": 1, "exp": t + 100, "iss": "other", "aud": "aud-1"})),
            ("issuer list", json!({"user_id": 1, "exp": t + 100, "iss": ["x", "issuer"], "aud": ["aud-1"]})),
            ("issuer not a string", json!({"user_id": 1, "exp": t + 100, "iss": 5, "aud": "aud-1"})),
            ("audience wrong", json!({"user_id": 1, "exp": t + 100, "iss": "issuer", "aud": "aud-2"})),
            ("audience empty list", json!({"user_id": 1, "exp": t + 100, "aud": []})),
            ("sub", json!({"sub": "42", "exp": t + 100})),
            ("sub not a string", json!({"sub": 42, "exp": t + 100})),
        ];
        for (what, claims) in &cases {
            assert_same(&sign(claims), what).ok();
        }
        assert_eq!(assert_same(&sign(&cases[0].1), "valid"), Ok(cases[0].1.clone()));
        // Shapes only raw JSON can give.
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        for (what, claims) in [
            ("not an object", "[1,2]"),
            ("a number", "5"),
            ("duplicate exp", &format!(r#"{{"exp":{},"exp":{}}}"#, t + 100, t + 100) as &str),
            ("not JSON", "{user_id"),
            ("trailing garbage", &format!(r#"{{"exp":{}}} x"#, t + 100)),
            ("escaped issuer", &format!(r#"{{"exp":{},"iss":"iss\u0075er","aud":"aud-1"}}"#, t + 100)),
        ] {
            assert_same(&raw_token(header, claims), what).ok();
        }
    }

    #[test]
    fn the_header_and_signature_are_judged_as_jsonwebtoken_judges_them() {
        let claims = json!({"user_id": 1, "exp": now() + 100});
        let good = sign(&claims);
        assert_eq!(assert_same(&good, "good"), Ok(claims.clone()));
        let wrong_secret = sign_with(&Header::new(Algorithm::HS256), &claims, b"other");
        assert_eq!(assert_same(&wrong_secret, "wrong secret"), Err("bad signature".into()));
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let other = sign_with(&Header::new(alg), &claims, SECRET);
            assert_eq!(assert_same(&other, "other HMAC"), Err("wrong algorithm".into()));
        }
        let (head, rest) = good.split_once('.').unwrap();
        let (payload, signature) = rest.split_once('.').unwrap();
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let mut flipped = signature.as_bytes().to_vec();
        flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let cases: Vec<(&str, String)> = vec![
            ("alg none, no signature", format!("{}.{payload}.", b64(r#"{"alg":"none"}"#))),
            ("alg none, signature kept", format!("{}.{payload}.{signature}", b64(r#"{"alg":"none"}"#))),
            ("RS256 header", format!("{}.{payload}.{signature}", b64(r#"{"alg":"RS256"}"#))),
            ("HS512 header, HS256 MAC", format!("{}.{payload}.{signature}", b64(r#"{"alg":"HS512"}"#))),
            ("no alg", format!("{}.{payload}.{signature}", b64(r#"{"typ":"JWT"}"#))),
            ("header not JSON", format!("{}.{payload}.{signature}", b64("{alg"))),
            ("flipped signature", format!("{head}.{payload}.{flipped}")),
            ("truncated signature", format!("{head}.{payload}.{}", &signature[..20])),
            ("empty signature", format!("{head}.{payload}.")),
            ("signature not base64", format!("{head}.{payload}.{}!", &signature[1..])),
            ("padded signature", format!("{head}.{payload}.{signature}=")),
            ("payload not base64", format!("{head}.{}*.{signature}", &payload[1..])),
            ("header not base64", format!("*{}.{payload}.{signature}", &head[1..])),
            ("two parts", format!("{head}.{payload}")),
            ("one part", head.to_string()),
            ("four parts", format!("{head}.{payload}.{signature}.{signature}")),
            ("empty", String::new()),
            ("dots", "..".into()),
            ("signature over another payload", format!("{head}.{}.{signature}", b64(r#"{"user_id":2}"#))),
        ];
        for (what, token) in cases {
            let answer = assert_same(&token, what);
            assert!(answer.is_err(), "{what} must be refused");
        }
    }
}
