//! The usage dashboard: its login and sessions over plain HTTP (a session is a row every
//! replica sees, ended by logout and by its expiry in the database; failed logins are
//! throttled per client address), then the page in a real browser (Debian's Chromium, headless, driven through chromedriver): log in, read the
//! figures of known usage rows and compare them with `GET /admin/usage`, download the CSV,
//! sort, filter, log out; screenshots at 1280x800 go to target/dashboard-screenshots/.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{NaiveDate, Utc};
use fantoccini::{Client, ClientBuilder, Locator};
use imagegate::usage::Outcome;
use serde_json::{Value, json};

use crate::admin_usage::{admin_get, gateway_with_known_rows, known_rows};
use crate::on_both_databases;
use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const COOKIE: &str = "imagegate_dashboard";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub async fn login(gw: &TestGateway, token: &str) -> reqwest::Response {
    no_redirects()
        .post(gw.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .expect("send")
}

/// The `name=value` part of a login's `Set-Cookie`.
pub fn session_of(response: &reqwest::Response) -> String {
    let set = response.headers()["set-cookie"].to_str().expect("ascii");
    set.split(';').next().expect("pair").to_owned()
}

/// The status of `GET /dashboard` with `cookie` (`name=value`): 200, or 303 to the form.
async fn page_with(gw: &TestGateway, cookie: &str) -> u16 {
    no_redirects()
        .get(gw.url("/dashboard"))
        .header("cookie", cookie)
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

async fn logout(gw: &TestGateway, cookie: &str) -> reqwest::Response {
    no_redirects()
        .post(gw.url("/dashboard/logout"))
        .header("cookie", cookie)
        .send()
        .await
        .expect("send")
}

on_both_databases!(
    a_session_ends_at_logout_and_two_logins_are_two_sessions,
    a_session_past_its_expiry_in_the_database_is_refused_whatever_the_cookie_says,
);

async fn a_session_ends_at_logout_and_two_logins_are_two_sessions(db: Db) {
    let gw = TestGateway::start(db, &test_config(&dead_url(), "")).await;
    // Within the same second: the old signed cookies were equal then.
    let first = session_of(&login(&gw, ADMIN_TOKEN).await);
    let second = session_of(&login(&gw, ADMIN_TOKEN).await);
    assert_ne!(first, second, "each login is its own session");
    assert_eq!(page_with(&gw, &first).await, 200);
    assert_eq!(page_with(&gw, &second).await, 200);
    assert_eq!(logout(&gw, &first).await.status(), 303);
    assert_eq!(
        page_with(&gw, &first).await,
        303,
        "the cookie kept after logout is no session"
    );
    assert_eq!(
        page_with(&gw, &second).await,
        200,
        "the other login goes on"
    );
    // A cookie of the old stateless kind, correctly signed with the admin token and
    // claiming a far expiry, is no session either.
    let expires = 4_102_444_800_i64;
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(ADMIN_TOKEN.as_bytes())
        .expect("key");
    hmac::Mac::update(
        &mut mac,
        format!("imagegate dashboard session v1 {expires}").as_bytes(),
    );
    let tag = hex::encode(hmac::Mac::finalize(mac).into_bytes());
    let signed = format!("{COOKIE}=v1.{expires}.{tag}");
    assert_eq!(page_with(&gw, &signed).await, 303);
    gw.shutdown().await;
}

/// Runs `statement` on the database `url` names, directly.
async fn execute(db: Db, url: &str, statement: &str) {
    match db {
        Db::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.expect("connect");
            sqlx::query(statement).execute(&pool).await.expect("sql");
        }
        Db::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
            sqlx::query(statement).execute(&pool).await.expect("sql");
        }
    }
}

/// Seconds between each stored session's login and its expiry.
async fn stored_lifetimes(db: Db, url: &str) -> Vec<f64> {
    match db {
        Db::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.expect("connect");
            sqlx::query_scalar(
                "select extract(epoch from expires_at - created_at)::float8 \
                 from dashboard_sessions",
            )
            .fetch_all(&pool)
            .await
            .expect("sql")
        }
        Db::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
            sqlx::query_scalar(
                "select (julianday(expires_at) - julianday(created_at)) * 86400.0 \
                 from dashboard_sessions",
            )
            .fetch_all(&pool)
            .await
            .expect("sql")
        }
    }
}

async fn a_session_past_its_expiry_in_the_database_is_refused_whatever_the_cookie_says(db: Db) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = match db {
        Db::Postgres => crate::support::db::fresh_postgres().await.1,
        Db::Sqlite => format!("sqlite:{}", dir.path().join("sessions.db").display()),
    };
    let gw = TestGateway::start_on(&url, &test_config(&dead_url(), "")).await;
    let response = login(&gw, ADMIN_TOKEN).await;
    let set = response.headers()["set-cookie"].to_str().expect("ascii");
    assert!(set.contains("Max-Age=43200"), "{set}");
    let cookie = session_of(&response);
    assert_eq!(page_with(&gw, &cookie).await, 200);
    let lifetimes = stored_lifetimes(db, &url).await;
    assert_eq!(lifetimes.len(), 1, "one row per login");
    assert!(
        (lifetimes[0] - 12.0 * 3600.0).abs() < 1.0,
        "a session lasts 12 h from its login: {lifetimes:?}"
    );
    // The row says the session is over; the browser's cookie still has hours to go.
    execute(
        db,
        &url,
        "update dashboard_sessions set expires_at = '2000-01-01 00:00:00.000000'",
    )
    .await;
    assert_eq!(page_with(&gw, &cookie).await, 303);
    // The next login removes the expired row.
    let again = session_of(&login(&gw, ADMIN_TOKEN).await);
    assert_eq!(page_with(&gw, &again).await, 200);
    assert_eq!(
        stored_lifetimes(db, &url).await.len(),
        1,
        "the expired row is gone"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_session_made_on_one_replica_works_and_ends_on_another() {
    let (_, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&dead_url(), "");
    let one = TestGateway::start_on_as(&url, &config, "svc-one").await;
    let two = TestGateway::start_on_as(&url, &config, "svc-two").await;
    let cookie = session_of(&login(&one, ADMIN_TOKEN).await);
    assert_eq!(
        page_with(&two, &cookie).await,
        200,
        "logged in on one, seen on two"
    );
    assert_eq!(logout(&two, &cookie).await.status(), 303);
    assert_eq!(
        page_with(&one, &cookie).await,
        303,
        "logged out on two, ended on one"
    );
    one.shutdown().await;
    two.shutdown().await;
}

/// A client that never follows redirects, connecting from `local` (all of 127/8 is the
/// loopback on Linux, so 127.0.0.2 is another client address of the same machine).
fn client_from(local: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from(local))
        .build()
        .expect("client")
}

async fn login_from(client: &reqwest::Client, gw: &TestGateway, token: &str) -> reqwest::Response {
    client
        .post(gw.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn the_eleventh_failed_login_in_a_minute_gets_429_and_other_addresses_do_not() {
    let gw = TestGateway::start(Db::Sqlite, &test_config(&dead_url(), "")).await;
    let guesser = client_from([127, 0, 0, 1]);
    for attempt in 1..=10 {
        let response = login_from(&guesser, &gw, "wrong-token").await;
        assert_eq!(response.status(), 401, "failure {attempt}");
    }
    let response = login_from(&guesser, &gw, "wrong-token").await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(response.headers().get("set-cookie").is_none());
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/html")
    );
    let body = response.text().await.expect("text");
    assert!(
        body.contains("Too many failed logins") && body.contains("<form method=\"post\""),
        "the form again, with why: {body}"
    );
    // Even the right token: a throttled guess must not tell a right one apart.
    let response = login_from(&guesser, &gw, ADMIN_TOKEN).await;
    assert_eq!(response.status(), 429);
    // Another address is not held back, for a wrong token or a right one.
    let other = client_from([127, 0, 0, 2]);
    assert_eq!(login_from(&other, &gw, "wrong-token").await.status(), 401);
    assert_eq!(login_from(&other, &gw, ADMIN_TOKEN).await.status(), 303);
    gw.shutdown().await;
}

/// Behind a proxy named in `server.trusted_proxies`, each client is throttled by the address
/// the proxy forwards; a client that is not a trusted proxy cannot choose its address with
/// `X-Forwarded-For`.
#[tokio::test]
async fn behind_a_trusted_proxy_logins_are_throttled_per_forwarded_client() {
    let config = test_config(&dead_url(), "").replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    let proxy = client_from([127, 0, 0, 1]);
    let through = |forwarded: &'static str, token: &'static str| {
        proxy
            .post(gw.url("/dashboard/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-for", forwarded)
            .body(format!("token={token}"))
            .send()
    };
    for attempt in 1..=10 {
        let response = through("203.0.113.5", "wrong-token").await.expect("send");
        assert_eq!(response.status(), 401, "failure {attempt}");
    }
    let response = through("203.0.113.5", "wrong-token").await.expect("send");
    assert_eq!(
        response.status(),
        429,
        "the guesser behind the proxy is held back"
    );
    // Another client behind the same proxy is not.
    let response = through("203.0.113.6", ADMIN_TOKEN).await.expect("send");
    assert_eq!(response.status(), 303);
    // A peer that is no trusted proxy: its header is ignored, its own address counts.
    let direct = client_from([127, 0, 0, 2]);
    for _ in 1..=10 {
        let response = direct
            .post(gw.url("/dashboard/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-for", "203.0.113.6")
            .body("token=wrong-token")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 401);
    }
    let response = through("203.0.113.6", ADMIN_TOKEN).await.expect("send");
    assert_eq!(
        response.status(),
        303,
        "a spoofed header does not throttle the client it names"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn login_sets_an_http_only_session_cookie_and_the_pages_need_it() {
    let gw = gateway_with_known_rows(Db::Sqlite, Utc::now().date_naive()).await;
    let client = no_redirects();
    // No session: every page sends the browser to the form.
    for path in [
        "/dashboard",
        "/dashboard/usage.csv?group_by=key",
        "/dashboard/requests.csv",
    ] {
        let response = client.get(gw.url(path)).send().await.expect("send");
        assert_eq!(response.status(), 303, "{path}");
        assert_eq!(response.headers()["location"], "/dashboard/login");
    }
    // A wrong or empty token: the form again, 401, no cookie.
    for token in ["wrong-token", ""] {
        let response = login(&gw, token).await;
        assert_eq!(response.status(), 401);
        assert!(response.headers().get("set-cookie").is_none());
        let body = response.text().await.expect("text");
        assert!(body.contains("That is not the admin token."), "{body}");
        assert!(body.contains("<form method=\"post\" action=\"/dashboard/login\""));
    }
    let response = login(&gw, ADMIN_TOKEN).await;
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/dashboard");
    let set = response.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(
        !set.contains(ADMIN_TOKEN),
        "the cookie never holds the token: {set}"
    );
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    // Behind a TLS terminator that says so, the cookie is sent over HTTPS only.
    let over_tls = no_redirects()
        .post(gw.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body(format!("token={ADMIN_TOKEN}"))
        .send()
        .await
        .expect("send");
    assert_eq!(over_tls.status(), 303);
    let secure = over_tls.headers()["set-cookie"].to_str().expect("ascii");
    assert!(secure.ends_with("; Secure"), "{secure}");
    let cookie = session_of(&response);
    let page = client
        .get(gw.url("/dashboard"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let body = page.text().await.expect("text");
    // A key name is data, never markup.
    assert!(body.contains("&lt;b&gt;carol&lt;/b&gt;"), "{body}");
    assert!(!body.contains("<b>carol"), "{body}");
    assert!(
        !body.contains("<script>") && !body.contains(" style="),
        "no inline script or style"
    );
    // A forged session (right shape, wrong signature) is refused.
    let forged = format!("{COOKIE}=v1.99999999999.{}", "00".repeat(32));
    let response = client
        .get(gw.url("/dashboard"))
        .header("cookie", forged)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 303);
    // Log out: the cookie is cleared.
    let response = client
        .post(gw.url("/dashboard/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 303);
    assert!(
        response.headers()["set-cookie"]
            .to_str()
            .expect("ascii")
            .contains("Max-Age=0")
    );
    gw.shutdown().await;
}

/// chromedriver on a free port, ended with the test.
struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails (never skips) without Chromium: the dashboard would go untested.
async fn start_driver() -> Driver {
    for path in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: the dashboard's browser test needs Debian's Chromium and its \
             driver; install them with `sudo apt-get install chromium chromium-driver` \
             (scripts/test does)"
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let driver = Driver {
        child,
        url,
        _profile: tempfile::tempdir().expect("profile dir"),
    };
    for _ in 0..100 {
        if let Ok(response) = reqwest::get(format!("{}/status", driver.url)).await {
            if response.status().is_success() {
                return driver;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer on {} within 10 s", driver.url);
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--hide-scrollbars", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session through chromedriver")
}

fn screenshots_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// Width and height of a PNG, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    let word = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    (word(16), word(20))
}

/// The viewport at exactly 1280x800, whatever the window around it takes.
async fn viewport_1280x800(c: &Client) {
    c.set_window_size(1280, 800).await.expect("resize");
    let inner = c
        .execute("return [window.innerWidth, window.innerHeight];", vec![])
        .await
        .expect("viewport");
    let (w, h) = (inner[0].as_i64().expect("w"), inner[1].as_i64().expect("h"));
    let w = u32::try_from(2 * 1280 - w).expect("width");
    let h = u32::try_from(2 * 800 - h).expect("height");
    c.set_window_size(w, h).await.expect("resize");
}

async fn save_screenshot(c: &Client, name: &str) -> (u32, u32) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(screenshots_dir().join(name), &png).expect("write screenshot");
    png_size(&png)
}

/// Each row of a table that carries `attribute` (not the folded attempts): its id and its cells' text.
async fn table(c: &Client, id: &str, attribute: &str) -> Vec<(String, Vec<String>)> {
    let rows = c
        .find_all(Locator::Css(&format!("#{id} tbody tr[{attribute}]")))
        .await
        .expect("rows");
    let mut out = Vec::new();
    for row in rows {
        let name = row.attr(attribute).await.expect("attr").expect("id");
        let mut cells = Vec::new();
        for cell in row.find_all(Locator::Css("td")).await.expect("cells") {
            cells.push(cell.text().await.expect("text"));
        }
        out.push((name, cells));
    }
    out
}

/// What the models table must show for `/admin/usage`'s lines: the group, client requests
/// and failures (a failover's attempts apart), images, total tokens and the cost, as the
/// API gives them.
fn expected_table(report: &Value, group: &str) -> Vec<(String, Vec<String>)> {
    report["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|l| {
            let name = l[group].as_str().expect("name").to_owned();
            let cells = [
                name.clone(),
                l["requests"].to_string(),
                l["failed"].to_string(),
                l["images"].to_string(),
                l["total_tokens"].to_string(),
                cost_text(l),
            ];
            (name, cells.to_vec())
        })
        .collect()
}

/// What the keys table must show for `/admin/usage`'s lines of keys without a budget or
/// refusals: the key, requests, failed, refused (0), the cost, and no budget ("—").
fn expected_keys(report: &Value) -> Vec<(String, Vec<String>)> {
    report["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|l| {
            let name = l["key"].as_str().expect("name").to_owned();
            let cells = [
                name.clone(),
                l["requests"].to_string(),
                l["failed"].to_string(),
                "0".to_owned(),
                cost_text(l),
                "\u{2014}".to_owned(),
            ];
            (name, cells.to_vec())
        })
        .collect()
}

/// Nano-dollars as the page shows money: dollars and cents.
fn money(nanos: i64) -> String {
    imagegate::routes::dashboard::html::money(i128::from(nanos))
}

/// A group's cost as the page shows it, from `/admin/usage`'s line: "$0.04", "unpriced"
/// (a null cost), or "$0.04 + 3 unpriced".
fn cost_text(line: &Value) -> String {
    match (line["cost_nanousd"].as_i64(), line["unpriced"].as_i64()) {
        (None, _) => "unpriced".to_owned(),
        (Some(nanos), Some(n)) if n > 0 => format!("{} + {n} unpriced", money(nanos)),
        (Some(nanos), _) => money(nanos),
    }
}

async fn admin_report(gw: &TestGateway, query: &str) -> Value {
    admin_get(gw, &format!("/admin/usage?{query}"))
        .await
        .json()
        .await
        .expect("json")
}

/// The day chart's bars: day and cost, as the page carries them.
async fn chart_bars(c: &Client) -> Vec<(String, String)> {
    let mut bars = Vec::new();
    for bar in c
        .find_all(Locator::Css("#by-day g.bar"))
        .await
        .expect("bars")
    {
        let day = bar.attr("data-day").await.expect("attr").expect("day");
        let cost = bar
            .attr("data-cost-usd")
            .await
            .expect("attr")
            .expect("cost");
        bars.push((day, cost));
    }
    bars
}

async fn log_in(c: &Client, token: &str) {
    let form = c
        .form(Locator::Css("form.login-card"))
        .await
        .expect("login form");
    form.set(Locator::Id("token"), token)
        .await
        .expect("type the token");
    form.submit().await.expect("submit");
}

async fn path_of(c: &Client) -> String {
    c.current_url().await.expect("url").path().to_owned()
}

/// Waits (up to 10 s) for the browser to be on `path`: submitting a form returns before
/// the next page has loaded.
async fn wait_for_path(c: &Client, path: &str) {
    for _ in 0..100 {
        let ready = c.execute("return document.readyState;", vec![]).await;
        if path_of(c).await == path && ready.is_ok_and(|r| r == "complete") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the browser is on {}, not {path}", path_of(c).await);
}

#[tokio::test]
async fn dashboard_in_headless_chromium_shows_the_admin_usage_figures() {
    let today = Utc::now().date_naive();
    let gw = gateway_with_known_rows(Db::Sqlite, today).await;
    let driver = start_driver().await;
    let c = browser(&driver).await;
    viewport_1280x800(&c).await;

    // No session: the form. A wrong token: the form again, with the error.
    c.goto(&gw.url("/dashboard")).await.expect("open");
    assert_eq!(path_of(&c).await, "/dashboard/login");
    assert_eq!(save_screenshot(&c, "login.png").await, (1280, 800));
    log_in(&c, "not-the-token").await;
    let error = c.wait().for_element(Locator::Css(".error")).await;
    let error = error.expect("an error shown");
    assert_eq!(path_of(&c).await, "/dashboard/login");
    assert_eq!(
        error.text().await.expect("text"),
        "That is not the admin token."
    );
    save_screenshot(&c, "login-wrong-token.png").await;

    log_in(&c, ADMIN_TOKEN).await;
    wait_for_path(&c, "/dashboard").await;
    check_figures(&c, &gw, today).await;
    check_sorting(&c).await;
    check_csv(&c, &gw).await;
    check_no_external_request(&c, &gw).await;
    assert_eq!(save_screenshot(&c, "dashboard.png").await, (1280, 800));
    full_page_screenshot(&c).await;
    check_filter(&c, &gw).await;

    // Log out: the pages send the browser to the form again.
    let logout = c
        .find(Locator::Css("form[action='/dashboard/logout'] button"))
        .await;
    logout
        .expect("log-out button")
        .click()
        .await
        .expect("log out");
    wait_for_path(&c, "/dashboard/login").await;
    c.goto(&gw.url("/dashboard")).await.expect("open");
    assert_eq!(path_of(&c).await, "/dashboard/login");
    c.close().await.expect("close the browser");
    gw.shutdown().await;
}

/// The totals tables, the cards, the chart and the latest requests, against the API and
/// the known rows.
async fn check_figures(c: &Client, gw: &TestGateway, today: NaiveDate) {
    let since = (today - chrono::Duration::days(29)).to_string();
    let by_key = admin_report(gw, &format!("group_by=key&since={since}")).await;
    let by_model = admin_report(gw, &format!("group_by=model&since={since}")).await;
    let by_day = admin_report(gw, &format!("group_by=day&since={since}")).await;
    assert_eq!(by_key["data"].as_array().map(Vec::len), Some(3));
    assert_eq!(table(c, "keys", "data-group").await, expected_keys(&by_key));
    assert_eq!(
        table(c, "models", "data-group").await,
        expected_table(&by_model, "model")
    );
    // The key whose name is markup shows as text; nothing in the page is bold markup.
    let bold = c.execute("return document.querySelectorAll('main b').length;", vec![]);
    assert_eq!(bold.await.expect("count"), json!(0));

    let total = c.find(Locator::Id("total-cost")).await.expect("card");
    assert_eq!(total.text().await.expect("text"), "$1.81");
    let exact = total.find(Locator::Css("span")).await.expect("figure");
    assert_eq!(
        exact.attr("title").await.expect("attr").as_deref(),
        Some("$1.814567899 exactly")
    );
    let requests = c.find(Locator::Id("total-requests")).await.expect("card");
    assert_eq!(requests.text().await.expect("text"), "6");

    // One bar a day of the period, the days with usage at the API's figures.
    let bars = chart_bars(c).await;
    assert_eq!(bars.len(), 30);
    assert_eq!(bars[0].0, since);
    assert_eq!(bars[29].0, today.to_string());
    for (day, cost) in &bars {
        let line = by_day["data"]
            .as_array()
            .expect("list")
            .iter()
            .find(|l| l["day"] == day.as_str());
        // A day without usage costs nothing; one whose calls are all unpriced has no cost.
        let expected = line.map_or(Some("0.00"), |l| l["cost_usd"].as_str());
        let expected = expected.unwrap_or_default();
        assert_eq!(cost, expected, "{day}");
    }
    assert_eq!(bars.iter().filter(|(_, cost)| cost != "0.00").count(), 3);

    // The latest requests, newest first, as stored.
    let shown = table(c, "requests", "data-request-id").await;
    let mut rows = known_rows(today);
    rows.reverse();
    assert_eq!(shown.len(), rows.len());
    for ((id, cells), row) in shown.iter().zip(&rows) {
        assert_eq!(id, &row.request_id);
        // An interrupted call's status, tokens and latency are unknown: "—", never 0.
        let known = row.outcome != Outcome::Interrupted;
        let unknown = |value: String| if known { value } else { "\u{2014}".to_owned() };
        // A completed call shows its status alone, any other its outcome too.
        let status = match row.outcome {
            Outcome::Completed => row.status.to_string(),
            other => format!(
                "{} {}",
                unknown(row.status.to_string()),
                other.as_str().replace('_', " ")
            ),
        };
        let cost = row
            .cost_nanousd
            .map_or_else(|| "unpriced".to_owned(), money);
        let cost = if row.cost_estimated && row.cost_nanousd.is_some() {
            format!("{cost} est.")
        } else {
            cost
        };
        let expected = [
            row.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            row.request_id.clone(),
            row.key_name.clone(),
            row.model.clone(),
            row.provider.clone(),
            status,
            unknown(row.input_tokens.to_string()),
            unknown(row.output_tokens.to_string()),
            cost,
            unknown(format!("{} ms", row.latency_ms)),
        ];
        assert_eq!(cells, &expected.to_vec(), "{id}");
    }
}

/// Clicking a heading sorts its table, then again the other way.
async fn check_sorting(c: &Client) {
    let spend = c
        .find(Locator::Css("#keys thead th:nth-child(5)"))
        .await
        .expect("spend heading");
    let names = async || -> Vec<String> {
        table(c, "keys", "data-group")
            .await
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    spend.click().await.expect("sort");
    assert_eq!(names().await, ["<b>carol</b>", "bob", "alice"]);
    spend.click().await.expect("sort back");
    assert_eq!(names().await, ["alice", "bob", "<b>carol</b>"]);
    assert_eq!(
        spend.attr("aria-sort").await.expect("attr").as_deref(),
        Some("descending")
    );
}

/// Each CSV link, fetched with the browser's own session cookie, is `/admin/usage`'s CSV
/// (or, for the latest requests, `/admin/requests`') for the same filter.
async fn check_csv(c: &Client, gw: &TestGateway) {
    let cookie = c
        .get_named_cookie(COOKIE)
        .await
        .expect("the session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    let links = c.find_all(Locator::Css("a.csv")).await.expect("links");
    assert_eq!(links.len(), 4);
    for link in links {
        let href = link.attr("href").await.expect("attr").expect("href");
        let (path, query) = href.split_once('?').expect("a filter");
        let api = match path {
            "/dashboard/usage.csv" => format!("/admin/usage?format=csv&{query}"),
            "/dashboard/requests.csv" => format!("/admin/requests?format=csv&limit=50&{query}"),
            other => panic!("{other} is not a download"),
        };
        let download = reqwest::Client::new()
            .get(gw.url(&href))
            .header("cookie", format!("{COOKIE}={}", cookie.value()))
            .send()
            .await
            .expect("download");
        assert_eq!(download.status(), 200, "{href}");
        assert_eq!(
            download.headers()["content-type"],
            "text/csv; charset=utf-8"
        );
        let csv = download.text().await.expect("csv");
        let api = admin_get(gw, &api).await;
        assert_eq!(csv, api.text().await.expect("csv"), "{href}");
        assert!(csv.lines().count() > 1, "{csv}");
    }
}

/// Everything the page loaded came from imagegate, and nothing in it points elsewhere.
async fn check_no_external_request(c: &Client, gw: &TestGateway) {
    let origin = gw.url("/");
    let loaded = c
        .execute(
            "return performance.getEntriesByType('resource').map(e => e.name)\
             .concat([location.href]);",
            vec![],
        )
        .await
        .expect("resources");
    let loaded = loaded.as_array().expect("list").clone();
    assert!(
        loaded.len() >= 3,
        "the page, its stylesheet and its script: {loaded:?}"
    );
    for url in &loaded {
        assert!(
            url.as_str().expect("url").starts_with(&origin),
            "{url} is not imagegate's"
        );
    }
    let references = c
        .execute(
            "return Array.from(document.querySelectorAll('[src],[href],[action]'))\
             .map(e => e.getAttribute('src') || e.getAttribute('href') || e.getAttribute('action'));",
            vec![],
        )
        .await
        .expect("references");
    for reference in references.as_array().expect("list") {
        let reference = reference.as_str().expect("text");
        assert!(
            reference.starts_with('/') || reference.starts_with("data:"),
            "{reference} leaves the page's origin"
        );
    }
}

/// The whole page, however long, 1280 wide; then back to 1280x800.
async fn full_page_screenshot(c: &Client) {
    let height = c
        .execute("return document.documentElement.scrollHeight;", vec![])
        .await
        .expect("height")
        .as_u64()
        .expect("a number");
    c.set_window_size(1280, u32::try_from(height).expect("height") + 200)
        .await
        .expect("resize");
    save_screenshot(c, "dashboard-full.png").await;
    viewport_1280x800(c).await;
}

/// The filter form narrows the page to one key; its figures are the API's for that key.
async fn check_filter(c: &Client, gw: &TestGateway) {
    let form = c.form(Locator::Css("form.filters")).await.expect("filters");
    form.set_by_name("key", "alice").await.expect("key");
    form.submit().await.expect("apply");
    for _ in 0..100 {
        let url = c.current_url().await.expect("url");
        if url.query().unwrap_or_default().contains("key=alice") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_path(c, "/dashboard").await;
    let url = c.current_url().await.expect("url");
    assert!(
        url.query().unwrap_or_default().contains("key=alice"),
        "{url}"
    );
    let since = url
        .query_pairs()
        .find(|(n, _)| n == "since")
        .map(|(_, v)| v.into_owned())
        .expect("the period stays");
    let by_model = admin_report(gw, &format!("group_by=model&key=alice&since={since}")).await;
    assert_eq!(
        table(c, "models", "data-group").await,
        expected_table(&by_model, "model")
    );
    let shown: Vec<String> = table(c, "requests", "data-request-id")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(shown, ["r6", "r2", "r1"]);
    save_screenshot(c, "dashboard-filtered.png").await;
}

/// Two replicas on one Postgres, the second with another setting: the page shows both in
/// its replicas panel with the warning; once the second has stopped, one replica is left
/// and the panel is gone.
#[tokio::test]
async fn dashboard_in_headless_chromium_shows_two_replicas_and_warns_that_their_settings_differ() {
    let (_, url) = crate::support::db::fresh_postgres().await;
    let config = test_config(&dead_url(), "");
    let one = TestGateway::start_on_as(&url, &config, "svc-one").await;
    let other = config.replacen("shutdown_grace = \"5s\"", "shutdown_grace = \"6s\"", 1);
    assert_ne!(other, config);
    let two = TestGateway::start_on_as(&url, &other, "svc-two").await;
    // Each replica writes its row once it serves.
    let mut listing = Value::Null;
    for _ in 0..100 {
        listing = admin_get(&one, "/admin/replicas")
            .await
            .json()
            .await
            .expect("json");
        if listing["live"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listing["live"], 2, "{listing:#}");
    let ids: Vec<String> = listing["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_owned())
        .collect();

    let driver = start_driver().await;
    let c = browser(&driver).await;
    viewport_1280x800(&c).await;
    c.goto(&one.url("/dashboard")).await.expect("open");
    log_in(&c, ADMIN_TOKEN).await;
    wait_for_path(&c, "/dashboard").await;

    let panel = c.find(Locator::Id("replicas-panel")).await.expect("panel");
    let heading = panel.find(Locator::Css("h2")).await.expect("heading");
    assert_eq!(heading.text().await.expect("text"), "Replicas (2 live)");
    let warning = panel.find(Locator::Css(".warning")).await.expect("warning");
    let text = warning.text().await.expect("text");
    assert!(
        text.contains("live replicas run 2 different settings")
            && ids.iter().all(|id| text.contains(id.as_str())),
        "{text}"
    );
    assert_eq!(
        warning.attr("role").await.expect("attr").as_deref(),
        Some("alert")
    );
    assert!(warning.is_displayed().await.expect("displayed"));
    let color = c
        .execute(
            "return getComputedStyle(document.querySelector('#replicas-panel .warning')).backgroundColor;",
            vec![],
        )
        .await
        .expect("style");
    assert_ne!(color, json!("rgba(0, 0, 0, 0)"), "the warning stands out");
    let rows = table(&c, "replicas", "data-replica").await;
    let shown: Vec<&String> = rows.iter().map(|(id, _)| id).collect();
    assert_eq!(shown, ids.iter().collect::<Vec<_>>());
    for (id, cells) in &rows {
        assert_eq!(cells[1], "live", "{id}");
        assert_eq!(cells[2], env!("CARGO_PKG_VERSION"), "{id}");
        assert_eq!(cells[6], "0", "{id}");
    }
    let differing = c
        .find_all(Locator::Css("#replicas td.hash.differs"))
        .await
        .expect("cells");
    assert_eq!(differing.len(), 2, "both hashes marked");
    assert_eq!(save_screenshot(&c, "replicas.png").await, (1280, 800));

    // One replica left: nothing to compare, no panel. A clean stop deletes its row, but
    // gives the deletion 500 ms only (a busy database must not hold up the stop): a row
    // left behind turns stale 15 s after its last beat, and the panel goes then.
    two.shutdown().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    loop {
        c.refresh().await.expect("reload");
        wait_for_path(&c, "/dashboard").await;
        c.find(Locator::Id("by-key")).await.expect("the page");
        let panels = c
            .find_all(Locator::Id("replicas-panel"))
            .await
            .expect("query");
        if panels.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no replicas panel with one replica"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.close().await.expect("close the browser");
    one.shutdown().await;
}

/// Names of 40 characters, as a demo's dated names and real services' names are.
const LONG_BUDGETED: &str = "team-search-eu-west-1-production-svc-001";
const LONG_LIMITED: &str = "team-ads-eu-west-1-production-service-02";
const LONG_REVOKED: &str = "team-old-eu-west-1-retired-service-00003";

/// What a day of real use puts on the page: 40-character key names, a request that failed
/// over (the first provider answered 500, the second the image), refused requests (over a
/// key's rpm), a key with a budget, a revoked key, and more rows than one page holds. At
/// 1280x800 no panel scrolls sideways; money shows as dollars and cents; each request is
/// one row with its attempts folded under it; the pages, the key picker and an empty
/// period work. Screenshots: dashboard-ops*.png.
#[tokio::test]
async fn dashboard_in_headless_chromium_fits_long_names_folds_failovers_and_counts_refusals() {
    let failing = StandIn::json(
        500,
        r#"{"error":{"message":"down","type":"server_error","param":null,"code":null}}"#,
    )
    .await;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let extra = format!(
        r#"
[providers.flaky]
base_url = "{}"
api_key_env = "TEST_PIAPI_KEY"

[models."duo"]
routes = [{{ provider = "flaky", model = "gpt-image-1" }}, {{ provider = "piapi", model = "gpt-image-1" }}]

[pricing.flaky."gpt-image-1"]
per_image = 0.04
"#,
        failing.base_url()
    );
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), &extra)).await;
    let create = async |body: Value| -> String {
        let response = gw
            .client
            .post(gw.url("/admin/keys"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("create");
        assert_eq!(response.status(), 201);
        let created: Value = response.json().await.expect("json");
        created["key"].as_str().expect("key").to_owned()
    };
    let budgeted =
        create(json!({"name": LONG_BUDGETED, "budget_usd": 5, "budget_period": "day"})).await;
    let limited = create(json!({"name": LONG_LIMITED, "rpm": 1})).await;
    create(json!({"name": LONG_REVOKED})).await;
    let revoked = gw
        .client
        .delete(gw.url(&format!("/admin/keys/{LONG_REVOKED}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), 200);

    // Older calls of the test key: more than a page.
    let old: Vec<_> = (0..60)
        .map(|i| imagegate::usage::UsageRow {
            created_at: Utc::now() - chrono::Duration::hours(30 + i),
            ..crate::support::rows::usage_row(&format!("old-{i:02}"))
        })
        .collect();
    gw.store.insert_usage(&old).await.expect("older rows");

    let body = |model: &str| json!({"model": model, "prompt": "a lighthouse"}).to_string();
    let path = "/v1/images/generations";
    let duo = gw.post_json_as(&budgeted, path, &body("duo")).await;
    assert_eq!(duo.status(), 200);
    assert_eq!(duo.headers()["x-imagegate-attempts"], "2");
    let failed_over = duo.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    duo.bytes().await.expect("body");
    let plain = gw.post_json_as(&budgeted, path, &body("gpt-image-1")).await;
    assert_eq!(plain.status(), 200);
    let statuses = [
        gw.post_json_as(&limited, path, &body("gpt-image-1"))
            .await
            .status(),
        gw.post_json_as(&limited, path, &body("gpt-image-1"))
            .await
            .status(),
        gw.post_json_as(&limited, path, &body("gpt-image-1"))
            .await
            .status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [200, 429, 429]);
    gw.usage_rows(64).await;
    // The refusals reach the database within a flush.
    for _ in 0..100 {
        let shown: Value = admin_get(&gw, "/admin/refusals")
            .await
            .json()
            .await
            .expect("json");
        if shown["total"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let driver = start_driver().await;
    let c = browser(&driver).await;
    viewport_1280x800(&c).await;
    c.goto(&gw.url("/dashboard")).await.expect("open");
    log_in(&c, ADMIN_TOKEN).await;
    wait_for_path(&c, "/dashboard").await;
    assert_eq!(save_screenshot(&c, "dashboard-ops.png").await, (1280, 800));
    full_page_screenshot_named(&c, "dashboard-ops-full.png").await;
    assert_fits(&c).await;

    // Cards: client requests and failures, a failover's failed attempt apart; refusals.
    let card = async |id: &str| {
        let card = c.find(Locator::Id(id)).await.expect("card");
        card.text().await.expect("text")
    };
    assert_eq!(
        card("total-requests").await,
        "63",
        "60 old, 1 failed over, 1 plain, 1 let through of the limited key's 3"
    );
    assert_eq!(
        card("total-failed").await,
        "0",
        "the client of the failover got its image"
    );
    assert_eq!(card("total-refused").await, "2");
    let spend = card("total-cost").await;
    assert!(
        spend.starts_with('$') && spend.split('.').nth(1).is_some_and(|c| c.len() == 2),
        "dollars and cents: {spend}"
    );

    // By key: the long names whole in their tooltips, refusals, the budget, in the panel.
    let keys = table(&c, "keys", "data-group").await;
    let row = |name: &str| {
        keys.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} in {keys:?}"))
            .1
            .clone()
    };
    let limited_row = row(LONG_LIMITED);
    assert_eq!(
        (limited_row[1].as_str(), limited_row[3].as_str()),
        ("1", "2"),
        "{limited_row:?}"
    );
    let budget_row = row(LONG_BUDGETED);
    assert!(budget_row[5].ends_with(" of $5.00"), "{budget_row:?}");
    let name_cell = c
        .find(Locator::Css(&format!(
            "#keys tr[data-group='{LONG_BUDGETED}'] td"
        )))
        .await
        .expect("name cell");
    assert_eq!(
        name_cell.attr("title").await.expect("attr").as_deref(),
        Some(LONG_BUDGETED)
    );
    // The key picker marks the revoked key.
    let picker = c.find(Locator::Id("key-picker")).await.expect("picker");
    let options = picker.text().await.expect("options");
    assert!(
        options.contains(&format!("{LONG_REVOKED} (revoked)")),
        "{options}"
    );

    // The failover: one row (the answer), its failed attempt folded under it with its cause.
    let main = c
        .find(Locator::Css(&format!(
            "#requests tr[data-request-id='{failed_over}']"
        )))
        .await
        .expect("the request's row");
    let main_text = main.text().await.expect("text");
    assert!(
        main_text.contains("2 attempts") && main_text.contains("200"),
        "{main_text}"
    );
    let attempts = c
        .find_all(Locator::Css(&format!(
            "#requests tr.attempt[data-attempt-of='{failed_over}']"
        )))
        .await
        .expect("attempts");
    assert_eq!(attempts.len(), 1);
    let attempt = attempts[0].text().await.expect("text");
    assert!(
        attempt.contains("attempt 1") && attempt.contains("flaky") && attempt.contains("http_500"),
        "{attempt}"
    );

    // Pages: 50 provider calls a page, then the older ones; and back.
    let first_page: Vec<String> = table(&c, "requests", "data-request-id")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    c.find(Locator::Id("next-page"))
        .await
        .expect("next")
        .click()
        .await
        .expect("older");
    wait_for_cursor(&c).await;
    let second_page: Vec<String> = table(&c, "requests", "data-request-id")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(!second_page.is_empty());
    assert!(
        second_page.iter().all(|id| !first_page.contains(id)),
        "{second_page:?}"
    );
    assert!(
        second_page.contains(&"old-59".to_owned()),
        "the oldest row is on the last page"
    );
    assert!(
        c.find(Locator::Id("next-page")).await.is_err(),
        "the last page"
    );
    save_screenshot(&c, "dashboard-ops-page-2.png").await;
    c.find(Locator::Id("newest-page"))
        .await
        .expect("newest")
        .click()
        .await
        .expect("newest");
    wait_for_path(&c, "/dashboard").await;

    // The key picker filters the whole page.
    let form = c.form(Locator::Css("form.filters")).await.expect("filters");
    form.set_by_name("key", LONG_LIMITED).await.expect("pick");
    form.submit().await.expect("apply");
    for _ in 0..100 {
        if c.current_url()
            .await
            .expect("url")
            .query()
            .unwrap_or_default()
            .contains("key=team-ads")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_path(&c, "/dashboard").await;
    let names: Vec<String> = table(&c, "keys", "data-group")
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, [LONG_LIMITED]);
    assert_eq!(card("total-refused").await, "2");
    assert_eq!(card("total-requests").await, "1");
    assert_fits(&c).await;

    // An empty period: no bars' worth of spend, and an axis of dollars, not billionths.
    c.goto(&gw.url("/dashboard?since=2020-01-01&until=2020-01-07"))
        .await
        .expect("open");
    wait_for_path(&c, "/dashboard").await;
    let axis = c
        .execute("return Array.from(document.querySelectorAll('#by-day text.axis')).map(t => t.textContent);", vec![])
        .await
        .expect("axis");
    let labels: Vec<&str> = axis
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .filter(|t| t.starts_with('$'))
        .collect();
    assert_eq!(labels, ["$0", "$0.25", "$0.50", "$0.75", "$1.00"]);
    assert_eq!(card("total-requests").await, "0");
    let empty = c
        .find(Locator::Css("#latest .empty"))
        .await
        .expect("no requests");
    assert_eq!(
        empty.text().await.expect("text"),
        "No requests in this period."
    );
    assert_fits(&c).await;
    assert_eq!(
        save_screenshot(&c, "dashboard-ops-empty.png").await,
        (1280, 800)
    );
    c.close().await.expect("close the browser");
    gw.shutdown().await;
}

/// No panel or card is wider inside than it shows (nothing cut off, no sideways scroll),
/// and no table is wider than its panel.
async fn assert_fits(c: &Client) {
    let overflowing = c
        .execute(
            "return Array.from(document.querySelectorAll('.panel, .card, table, body'))\
             .filter(e => e.scrollWidth > e.clientWidth + 1 \
                || (e.tagName === 'TABLE' && e.getBoundingClientRect().right > \
                    e.closest('.panel').getBoundingClientRect().right))\
             .map(e => (e.id || e.className || e.tagName) + ': ' + e.scrollWidth + ' > ' + e.clientWidth);",
            vec![],
        )
        .await
        .expect("widths");
    assert_eq!(overflowing, json!([]), "overflowing at 1280 px");
}

/// Waits (up to 10 s) for the page of an older cursor to have loaded.
async fn wait_for_cursor(c: &Client) {
    for _ in 0..100 {
        let url = c.current_url().await.expect("url");
        let ready = c.execute("return document.readyState;", vec![]).await;
        if url.query().unwrap_or_default().contains("cursor=")
            && ready.is_ok_and(|r| r == "complete")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the older page did not load");
}

/// The whole page, however long, 1280 wide, under `name`; then back to 1280x800.
async fn full_page_screenshot_named(c: &Client, name: &str) {
    let height = c
        .execute("return document.documentElement.scrollHeight;", vec![])
        .await
        .expect("height")
        .as_u64()
        .expect("a number");
    c.set_window_size(1280, u32::try_from(height).expect("height") + 200)
        .await
        .expect("resize");
    save_screenshot(c, name).await;
    viewport_1280x800(c).await;
}
