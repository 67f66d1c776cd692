//! The dashboard's session cookie: `v1.<expiry, unix seconds>.<hex HMAC-SHA256>`, the HMAC
//! keyed by the admin token over the expiry. It never holds the token; any replica with
//! the same token accepts it; changing the token ends every session; it lapses on its own
//! after [`LIFETIME`].

use chrono::Utc;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use http::header;
use sha2::Sha256;

use crate::config::Secret;

pub const COOKIE: &str = "imagegate_dashboard";
/// How long a login lasts.
pub const LIFETIME_SECS: i64 = 12 * 3600;

fn mac(token: &Secret, expires: i64) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(token.expose().as_bytes()).expect("HMAC takes any key");
    mac.update(format!("imagegate dashboard session v1 {expires}").as_bytes());
    mac
}

/// A new session's cookie value.
pub fn issue(token: &Secret) -> String {
    let expires = Utc::now().timestamp() + LIFETIME_SECS;
    let tag = hex::encode(mac(token, expires).finalize().into_bytes());
    format!("v1.{expires}.{tag}")
}

/// The `Set-Cookie` value of a session: readable by no script, sent only to the dashboard
/// and never from another site; over HTTPS only when the browser reached imagegate over
/// HTTPS (see [`over_https`]).
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

/// True when the request carries an unexpired session signed with today's admin token (an
/// empty token signs nothing: anyone could compute its tags).
pub fn valid(headers: &HeaderMap, token: Option<&Secret>) -> bool {
    let Some(token) = token.filter(|t| !t.expose().is_empty()) else {
        return false;
    };
    cookie_value(headers).is_some_and(|value| verify(token, value))
}

fn verify(token: &Secret, value: &str) -> bool {
    let mut parts = value.splitn(3, '.');
    let (Some("v1"), Some(expires), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(expires), Ok(tag)) = (expires.parse::<i64>(), hex::decode(tag)) else {
        return false;
    };
    // The tag is checked in constant time.
    expires > Utc::now().timestamp() && mac(token, expires).verify_slice(&tag).is_ok()
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
    fn a_session_is_valid_for_its_token_only_and_holds_no_token() {
        let token = Secret::new("admin-token-0123456789".into());
        let value = issue(&token);
        assert!(!value.contains(token.expose()));
        let cookie = format!("other=1; {COOKIE}={value}");
        assert!(valid(&headers(&cookie), Some(&token)));
        let other = Secret::new("another-token".into());
        assert!(!valid(&headers(&cookie), Some(&other)));
        assert!(!valid(&headers(&cookie), None));
        let empty = Secret::new(String::new());
        let tag = hex::encode(mac(&empty, i64::MAX).finalize().into_bytes());
        let signed_by_empty = format!("{COOKIE}=v1.{}.{tag}", i64::MAX);
        assert!(!valid(&headers(&signed_by_empty), Some(&empty)));
        // A tampered expiry breaks the tag.
        let (_, rest) = value.split_once('.').expect("v1.");
        let (expires, tag) = rest.split_once('.').expect("expiry.tag");
        let later = expires.parse::<i64>().expect("number") + 3600;
        let forged = format!("{COOKIE}=v1.{later}.{tag}");
        assert!(!valid(&headers(&forged), Some(&token)));
        // An expired session, even correctly signed, is refused.
        let past = Utc::now().timestamp() - 1;
        let tag = hex::encode(mac(&token, past).finalize().into_bytes());
        assert!(!valid(
            &headers(&format!("{COOKIE}=v1.{past}.{tag}")),
            Some(&token)
        ));
    }
}
