//! `imagegate healthcheck`: asks a running gateway's `GET /readyz` whether it is ready, for
//! a container's `HEALTHCHECK` (the image has no HTTP client of its own).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The `/readyz` address of a gateway listening on `listen`: an unspecified address
/// (`0.0.0.0`, `::`) is reached on the loopback of the same family.
pub fn readyz_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/readyz", SocketAddr::new(ip, listen.port()))
}

/// `--url` as given (a base URL such as `http://127.0.0.1:8080`), with `/readyz` appended
/// unless it already ends so.
pub fn given_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.ends_with("/readyz") {
        url.to_owned()
    } else {
        format!("{url}/readyz")
    }
}

/// Ok with the line to print when `/readyz` answers 200 within `timeout`; otherwise the
/// one line that says why not.
pub async fn check(url: &str, timeout: Duration) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|err| format!("cannot make an HTTP client: {err}"))?;
    let response = client.get(url).send().await.map_err(|err| {
        let reason = if err.is_timeout() {
            format!("no answer within {}", humantime::format_duration(timeout))
        } else {
            imagegate::error::root_cause(&err)
        };
        format!("not ready: {url}: {reason}")
    })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(format!("ready: {url} answered {status}"));
    }
    Err(format!("not ready: {url} answered {status}{}", why(&body)))
}

/// What `/readyz`'s body says is wrong: its checks (`checks.database`,
/// `checks.usage_journal`, ...) whose state is not `ok`, or the start of a body that is not
/// imagegate's.
fn why(body: &str) -> String {
    let checks = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|body| body.get("checks")?.as_object().cloned());
    let Some(checks) = checks else {
        let first = body.lines().next().unwrap_or("").trim();
        let first: String = first.chars().take(200).collect();
        return if first.is_empty() {
            String::new()
        } else {
            format!(": {first}")
        };
    };
    // States are text; the backlog (a number) and the providers' circuits (an object) are
    // figures that do not decide readiness.
    let failing: Vec<String> = checks
        .iter()
        .filter_map(|(name, value)| {
            let value = value.as_str()?;
            (value != "ok").then(|| format!("{name} {value}"))
        })
        .collect();
    if failing.is_empty() {
        String::new()
    } else {
        format!(": {}", failing.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_reached_on_the_loopback() {
        let url = |listen: &str| readyz_url(listen.parse().expect("address"));
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080/readyz");
        assert_eq!(url("[::]:8080"), "http://[::1]:8080/readyz");
        assert_eq!(url("10.0.0.5:9000"), "http://10.0.0.5:9000/readyz");
        assert_eq!(given_url("http://gw:8080/"), "http://gw:8080/readyz");
        assert_eq!(given_url("http://gw:8080/readyz"), "http://gw:8080/readyz");
    }

    #[test]
    fn the_reason_names_the_checks_that_fail() {
        // The body `/readyz` answers (routes::health::readyz) when the database is lost.
        let body = r#"{"status":"not_ready","shared_state":"degraded: ...","checks":{
            "database":"unavailable: connection refused","usage_journal":"ok",
            "usage_backlog":3,"providers":{"piapi":"closed"}}}"#;
        assert_eq!(why(body), ": database unavailable: connection refused");
        assert_eq!(why("Bad Gateway\nmore"), ": Bad Gateway");
        assert_eq!(why(""), "");
    }
}
