//! Key lookups against a database that stops answering: keys seen before keep being served
//! from the cache at once, a key never seen gets a quick 503, and a flood of unknown keys
//! evicts no known one. The outage is a proxy in front of the test Postgres that cuts its
//! connections and then swallows new ones silently (a partition: the worst case, where only
//! imagegate's own timeouts end a wait).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// A TCP proxy to the test Postgres that can be taken down and brought back.
struct DbProxy {
    addr: std::net::SocketAddr,
    down: Arc<AtomicBool>,
    /// Milliseconds each answer of the database is held back (a slow or distant database).
    lag_ms: Arc<AtomicU64>,
    /// Cancelled to cut the connections open now; replaced after each cut.
    cut: Arc<std::sync::Mutex<CancellationToken>>,
}

impl DbProxy {
    async fn start(upstream: String) -> DbProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let down = Arc::new(AtomicBool::new(false));
        let lag_ms = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (is_down, cuts, lag) = (Arc::clone(&down), Arc::clone(&cut), Arc::clone(&lag_ms));
        #[expect(
            clippy::disallowed_methods,
            reason = "the proxy lives until the test process ends"
        )]
        tokio::spawn(async move {
            let mut swallowed = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                if is_down.load(Ordering::SeqCst) {
                    // Accepted and never answered, as behind a partition.
                    swallowed.push(client);
                    continue;
                }
                let cut = cuts.lock().expect("cut lock").clone();
                let (upstream, lag) = (upstream.clone(), Arc::clone(&lag));
                #[expect(clippy::disallowed_methods, reason = "one task per proxied connection")]
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let answers = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_server.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            let lag = lag.load(Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(lag)).await;
                            to_client.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy(&mut from_client, &mut to_server) => {}
                        _ = answers => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        DbProxy {
            addr,
            down,
            lag_ms,
            cut,
        }
    }

    /// A fresh test database reached through a new proxy, and its URL through the proxy.
    async fn fresh() -> (DbProxy, String) {
        let url = crate::support::db::fresh_postgres().await.1;
        let options = PgConnectOptions::from_str(&url).expect("a Postgres URL");
        let server = format!("{}:{}", options.get_host(), options.get_port());
        let proxy = DbProxy::start(server.clone()).await;
        let proxied = url.replacen(&server, &proxy.addr.to_string(), 1);
        assert_ne!(proxied, url, "the test database URL names its port");
        (proxy, proxied)
    }

    /// Cuts every connection and swallows new ones from now on.
    fn take_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        let mut cut = self.cut.lock().expect("cut lock");
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn bring_back(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Holds each answer of the database back by `lag` from now on.
    fn set_lag(&self, lag: Duration) {
        let ms = u64::try_from(lag.as_millis()).expect("a short lag");
        self.lag_ms.store(ms, Ordering::SeqCst);
    }
}

const PROMPT: &str = r#"{"model":"gpt-image-1","prompt":"fox"}"#;

/// A generation with `key`: its status, its error body if any, and how long it took.
async fn generate(gw: &TestGateway, key: &str) -> (u16, serde_json::Value, Duration) {
    let started = Instant::now();
    let response = gw.post_json_as(key, "/v1/images/generations", PROMPT).await;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let mut body: serde_json::Value = response.json().await.unwrap_or_default();
    if let Some(retry_after) = retry_after {
        body["retry_after_header"] = retry_after.into();
    }
    (status, body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_key_is_served_at_once_after_its_ttl_while_the_database_is_down() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (proxy, url) = DbProxy::fresh().await;
    // key_cache_ttl is 1 s.
    let gw = TestGateway::start_on(&url, &test_config(&provider.base_url(), "")).await;
    assert_eq!(generate(&gw, &gw.key).await.0, 200);

    proxy.take_down();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut times = Vec::new();
    for _ in 0..6 {
        let (status, body, took) = generate(&gw, &gw.key).await;
        assert_eq!(status, 200, "{body}");
        times.push(took);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        times.iter().all(|t| *t < Duration::from_secs(1)),
        "every request past the TTL with the database down answers within 1 s: {times:?}"
    );

    // Back up: the rows written meanwhile reach the database, none lost.
    proxy.bring_back();
    gw.usage_rows(7).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_burst_of_a_new_key_shares_one_lookup_of_a_slow_database() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (proxy, url) = DbProxy::fresh().await;
    let gw = TestGateway::start_on(&url, &test_config(&provider.base_url(), "")).await;
    let new = imagegate::auth::issue_key("starting-service");
    gw.store
        .create_key(new.new.clone())
        .await
        .expect("create key");
    // Each lookup takes three round trips of at least 60 ms (the pool's check, then the
    // query's two), and a new key waits 500 ms at most: the 64 requests of a service
    // starting up pass only if they share their lookups (four at a time, one after the
    // other, would take 16 x 180 ms).
    proxy.set_lag(Duration::from_millis(60));
    let burst = (0..64).map(|_| {
        gw.client
            .get(gw.url("/v1/models"))
            .bearer_auth(&new.key)
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(burst)
        .await
        .into_iter()
        .map(|r| r.expect("imagegate answers").status().as_u16())
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 64, "{statuses:?}");
    proxy.set_lag(Duration::ZERO);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_never_seen_gets_503_quickly_while_the_database_is_down() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (proxy, url) = DbProxy::fresh().await;
    let gw = TestGateway::start_on(&url, &test_config(&provider.base_url(), "")).await;
    let unseen = imagegate::auth::issue_key("never-seen");
    gw.store
        .create_key(unseen.new.clone())
        .await
        .expect("create key");
    let unknown = imagegate::auth::issue_key("never-stored").key;

    proxy.take_down();
    for key in [&unseen.key, &unknown, &unseen.key] {
        let (status, body, took) = generate(&gw, key).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "key_lookup_unavailable", "{body}");
        assert_eq!(body["error"]["type"], "server_error", "{body}");
        assert_eq!(body["retry_after_header"], "1", "{body}");
        assert!(
            took < Duration::from_secs(1),
            "503 within 1 s, took {took:?}"
        );
    }
    assert!(provider.requests().is_empty(), "nothing was forwarded");

    // Back up: the stored key works, the other one is refused, and nothing was cached from
    // the outage.
    proxy.bring_back();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut status = 0;
    while Instant::now() < deadline {
        status = generate(&gw, &unseen.key).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status, 200,
        "the stored key works once the database is back"
    );
    let (status, body, _) = generate(&gw, &unknown).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    gw.usage_rows(1).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_keys_evicts_no_known_key() {
    // Above the 10,000 entries at which the cache used to be cleared whole.
    const FLOOD: usize = 12_000;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let (proxy, url) = DbProxy::fresh().await;
    let gw = TestGateway::start_on(&url, &test_config(&provider.base_url(), "")).await;
    assert_eq!(generate(&gw, &gw.key).await.0, 200);

    let started = Instant::now();
    let statuses: Vec<u16> = futures_util::stream::iter(0..FLOOD)
        .map(|_| {
            let (client, url) = (gw.client.clone(), gw.url("/v1/models"));
            async move {
                let key = imagegate::auth::issue_key("flood").key;
                client
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let refused = statuses.iter().filter(|s| **s == 401).count();
    eprintln!(
        "{FLOOD} unknown keys in {:?}: {refused} got 401, the rest {:?}",
        started.elapsed(),
        statuses.iter().filter(|s| **s != 401).fold(
            std::collections::BTreeMap::new(),
            |mut m, s| {
                *m.entry(*s).or_insert(0) += 1;
                m
            }
        )
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 401 | 503)),
        "unknown keys are refused"
    );

    proxy.take_down();
    for _ in 0..3 {
        let (status, body, took) = generate(&gw, &gw.key).await;
        assert_eq!(status, 200, "the known key is still cached: {body}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }
    proxy.bring_back();
    gw.usage_rows(4).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_under_steady_traffic_stops_within_the_ttl() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    // Keep the key in use, so that its entry is refreshed in the background, never expired.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(generate(&gw, &gw.key).await.0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.store.revoke_key("svc-test").await.expect("revoke"));
    let revoked = Instant::now();
    let mut last_ok = None;
    while revoked.elapsed() < Duration::from_millis(2500) {
        if generate(&gw, &gw.key).await.0 == 200 {
            last_ok = Some(revoked.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // key_cache_ttl is 1 s.
    assert!(
        last_ok.is_none_or(|t| t < Duration::from_secs(1)),
        "served {last_ok:?} after the revocation"
    );
    gw.shutdown().await;
}
