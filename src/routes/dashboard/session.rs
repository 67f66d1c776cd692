//! The dashboard's sessions: the cookie holds a random id (256 bits from the thread's
//! CSPRNG) and nothing else; the database holds a hash of it with its expiry (see the
//! migration `0009_dashboard_sessions`), so every replica knows a session, a logout ends it,
//! and it lapses [`LIFETIME_SECS`] after its login whatever the cookie claims.
//!
//! The hash is an HMAC-SHA256 of the id keyed by the admin token: the stored hashes are of
//! no use to whoever reads the database, and a new admin token ends every session.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http::HeaderMap;
use http::header;
use rand::Rng;
use sha2::Sha256;

use crate::config::Secret;

pub const COOKIE: &str = "imagegate_dashboard";
/// How long a login lasts at most.
pub const LIFETIME_SECS: i64 = 12 * 3600;
/// Random bytes in a session id (hex in the cookie).
const ID_BYTES: usize = 32;

/// A session as it is made at login.
pub struct NewSession {
    /// The cookie's value: the id, never stored.
    pub id: String,
    /// What the database keeps.
    pub hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A new session, starting `now`, for the admin token `token`.
pub fn issue(token: &Secret, now: DateTime<Utc>) -> NewSession {
    let id = hex::encode(rand::rng().random::<[u8; ID_BYTES]>());
    NewSession {
        hash: hash(token, &id),
        id,
        created_at: now,
        expires_at: now + chrono::Duration::seconds(LIFETIME_SECS),
    }
}

/// The stored form of a session id.
pub fn hash(token: &Secret, id: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(token.expose().as_bytes()).expect("HMAC takes any key");
    mac.update(b"imagegate dashboard session v2 ");
    mac.update(id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The hash to look a request's session up by: none without a session cookie of the right
/// shape, or without an admin token (an empty one would key nothing).
pub fn presented(headers: &HeaderMap, token: Option<&Secret>) -> Option<String> {
    let token = token.filter(|t| !t.expose().is_empty())?;
    let id = cookie_value(headers)?;
    let well_formed = id.len() == 2 * ID_BYTES && id.bytes().all(|b| b.is_ascii_hexdigit());
    well_formed.then(|| hash(token, id))
}

/// The `Set-Cookie` value of a session: readable by no script, sent only to the dashboard
/// and never from another site; over HTTPS only when the browser reached imagegate over
/// HTTPS (see [`over_https`]). Its `Max-Age` only spares the browser a dead cookie: the
/// server goes by the session's own expiry.
pub fn set_cookie(value: &str, headers: &HeaderMap) -> String {
    let secure = if over_https(headers) { "; Secure" } else { "" };
    format!(
        "{COOKIE}={value}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={LIFETIME_SECS}{secure}"
    )
}

/// The `Set-Cookie` value that ends a session.
pub fn clear_cookie(headers: &HeaderMap) -> String {
    let secure = if over_https(headers) { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

/// True when the TLS terminator in front of imagegate (which serves plain HTTP) says the
/// browser came over HTTPS: `X-Forwarded-Proto: https`, as proxies and load balancers
/// send it. A client that sends it itself only makes its own cookie stricter.
pub fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, cookie.parse().expect("header"));
        headers
    }

    #[test]
    fn a_session_id_is_random_holds_no_token_and_is_stored_keyed_by_the_token() {
        let token = Secret::new("admin-token-0123456789".into());
        let now = Utc::now();
        let (one, two) = (issue(&token, now), issue(&token, now));
        assert_ne!(one.id, two.id, "two logins at one instant differ");
        assert_eq!(one.id.len(), 64);
        assert!(!one.id.contains(token.expose()) && one.hash != one.id);
        assert_eq!(one.expires_at - one.created_at, chrono::Duration::hours(12));
        let cookie = format!("other=1; {COOKIE}={}", one.id);
        assert_eq!(
            presented(&headers(&cookie), Some(&token)).as_deref(),
            Some(one.hash.as_str())
        );
        let other = Secret::new("another-token-0123456789".into());
        assert_ne!(
            presented(&headers(&cookie), Some(&other)).as_deref(),
            Some(one.hash.as_str()),
            "a new admin token finds no session"
        );
        assert_eq!(presented(&headers(&cookie), None), None);
        let empty = Secret::new(String::new());
        assert_eq!(presented(&headers(&cookie), Some(&empty)), None);
        for junk in ["", "v1.99999999999.00", &"z".repeat(64), &one.id[..63]] {
            let cookie = format!("{COOKIE}={junk}");
            assert_eq!(presented(&headers(&cookie), Some(&token)), None, "{junk}");
        }
    }
}
