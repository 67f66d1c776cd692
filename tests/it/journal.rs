//! The usage journal: its files (torn lines, the cursor, segments), a row the database
//! refuses, a Postgres outage in the middle of a stream of requests (a throwaway cluster
//! this test starts and stops itself, never the shared server), `kill -9` of the real binary
//! with requests in flight, and SIGTERM while the database is busy. Every request answered
//! must end up as exactly one usage row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::DateTime;
use imagegate::store::Store;
use imagegate::usage::journal::{Journal, Position};
use imagegate::usage::{Intent, Outcome, UsageRow};
use serde_json::Value;
use sqlx::Connection;

use crate::support::binary::{self, signal};
use crate::support::postgres::Cluster;
use crate::support::rows::usage_row;
use crate::support::{StandIn, TestGateway, USAGE, all_rows, image_response, test_config};

fn row(id: &str) -> UsageRow {
    UsageRow {
        key_name: "svc".into(),
        provider: "piapi".into(),
        quality: None,
        text_input_tokens: 19,
        input_tokens: 19,
        output_tokens: 272,
        total_tokens: 291,
        cost_nanousd: Some(10_975_000),
        latency_ms: 12,
        // Fixed, so that every row's line has the same length.
        created_at: DateTime::from_timestamp(1_780_000_000, 123_456_000).expect("time"),
        raw_usage: Some(r#"{"input_tokens":19}"#.into()),
        ..usage_row(id)
    }
}

fn open(dir: &Path) -> Journal {
    Journal::open(dir, imagegate::usage::journal::DEFAULT_SEGMENT_BYTES).expect("open journal")
}

/// The segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("journal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

/// Reads and commits everything, the way the shipper does, and returns the request ids.
fn drain(journal: &Journal, per_batch: usize) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let batch = journal.read_batch(per_batch).expect("read");
        if batch.is_empty() {
            return ids;
        }
        ids.extend(batch.rows.iter().map(|r| r.request_id.clone()));
        journal.commit(&batch).expect("commit");
    }
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("r{i}")).collect()
}

/// Opens the journal in `dir` and appends the rows `r0` up to `r{count - 1}`.
fn open_with_rows(dir: &Path, count: usize) -> Journal {
    let journal = open(dir);
    for id in ids(0..count) {
        journal.append(row(&id)).expect("append");
    }
    journal
}

/// Reads the next `count` rows, checks they are `count`, and commits them (shipped).
fn ship(journal: &Journal, count: usize) {
    let batch = journal.read_batch(count).expect("read");
    assert_eq!(batch.rows.len(), count);
    journal.commit(&batch).expect("commit");
}

#[test]
fn rows_are_read_back_whole_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open(dir.path());
    let mut sent = Vec::new();
    for i in 0..5 {
        let r = row(&format!("r{i}"));
        journal.append(r.clone()).expect("append");
        sent.push(r);
    }
    assert_eq!(journal.backlog(), 5);
    let batch = journal.read_batch(256).expect("read");
    assert_eq!(batch.rows, sent, "a row comes back as it went in");
    journal.commit(&batch).expect("commit");
    assert_eq!(journal.backlog(), 0);
    assert!(journal.read_batch(256).expect("read").is_empty());
}

fn intent(id: &str) -> Intent {
    let row = row(id);
    Intent {
        request_id: row.request_id,
        key_id: row.key_id,
        key_name: row.key_name,
        model: row.model,
        provider: row.provider,
        upstream_model: row.upstream_model,
        endpoint: row.endpoint,
        streamed: false,
        n: Some(1),
        size: None,
        quality: None,
        worst_case_nanousd: Some(250_000_000),
        attempt: 1,
        client_request_id: None,
        created_at: row.created_at,
    }
}

/// Interrupted rows read from the journal, by request id.
fn interrupted_ids(rows: &[UsageRow]) -> Vec<String> {
    let mut ids: Vec<String> = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Interrupted)
        .map(|r| r.request_id.clone())
        .collect();
    ids.sort();
    ids
}

#[test]
fn an_intent_without_its_row_becomes_one_interrupted_row_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let journal = open(dir.path());
        for id in ["i1", "i2", "i3", "i4"] {
            journal.append_intent(&intent(id)).expect("intent");
        }
        journal.append(row("i1")).expect("row");
        journal.append_cancel("i3").expect("cancel");
        assert_eq!(journal.backlog(), 1, "intents and cancels are not rows");
        // The shipper passes every line: i2 and i4 stay open, carried in the cursor (their
        // segment may be deleted now).
        let batch = journal.read_batch(256).expect("read");
        assert_eq!(batch.rows, vec![row("i1")], "an intent is never a row");
        journal.commit(&batch).expect("commit");
        assert_eq!(journal.pending_intents(), 2);
        journal.append_intent(&intent("i5")).expect("intent");
        journal.append(row("i4")).expect("row");
        // Dropped without shipping the rest: the process died here.
    }
    let journal = open(dir.path());
    let rows = drain_rows(&journal);
    assert_eq!(
        interrupted_ids(&rows),
        ["i2", "i5"],
        "one interrupted row per call without its row: {rows:#?}"
    );
    let cut = rows
        .iter()
        .find(|r| r.request_id == "i2")
        .expect("interrupted i2");
    assert_eq!(cut.cost_nanousd, Some(250_000_000), "the worst case");
    assert!(cut.cost_estimated);
    assert_eq!((cut.input_tokens, cut.output_tokens, cut.images), (0, 0, 0));
    assert_eq!(journal.pending_intents(), 0, "all resolved once shipped");
    drop(journal);

    // Nothing is recorded twice at the start after.
    let journal = open(dir.path());
    assert_eq!(journal.backlog(), 0);
    assert!(drain_rows(&journal).is_empty());
}

/// Reads and commits everything, the way the shipper does, and returns the rows.
fn drain_rows(journal: &Journal) -> Vec<UsageRow> {
    let mut rows = Vec::new();
    loop {
        let batch = journal.read_batch(256).expect("read");
        if batch.is_empty() {
            return rows;
        }
        rows.extend(batch.rows.iter().cloned());
        journal.commit(&batch).expect("commit");
    }
}

#[test]
fn a_torn_last_line_is_skipped_on_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open_with_rows(dir.path(), 3));
    // A crash cut the last write short: half a row, no newline.
    let segment = segments(dir.path())[0].clone();
    let half = serde_json::to_string(&row("torn")).expect("json");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .expect("segment");
    std::io::Write::write_all(&mut file, &half.as_bytes()[..half.len() / 2]).expect("write");
    drop(file);

    let journal = open(dir.path());
    assert_eq!(journal.backlog(), 3, "a torn line is not a row");
    assert_eq!(drain(&journal, 256), ids(0..3));
    assert_eq!(journal.backlog(), 0);
    assert!(!segment.exists(), "a shipped segment is deleted");
    // New rows go to the new segment and are not glued to the torn bytes.
    journal.append(row("r3")).expect("append");
    assert_eq!(drain(&journal, 256), ["r3"]);
}

#[test]
fn a_line_that_is_not_a_row_is_skipped_and_the_rest_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let journal = open(dir.path());
        journal.append(row("r0")).expect("append");
    }
    let segment = segments(dir.path())[0].clone();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .expect("segment");
    std::io::Write::write_all(&mut file, b"\0\0\0 not a row\n").expect("write");
    std::io::Write::write_all(
        &mut file,
        format!("{}\n", serde_json::to_string(&row("r1")).expect("json")).as_bytes(),
    )
    .expect("write");
    drop(file);
    let journal = open(dir.path());
    assert_eq!(journal.backlog(), 3, "three lines");
    assert_eq!(drain(&journal, 256), ["r0", "r1"]);
    assert_eq!(journal.backlog(), 0);
}

#[test]
fn the_cursor_survives_a_restart_and_uncommitted_rows_are_read_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let journal = open_with_rows(dir.path(), 5);
        ship(&journal, 3);
        // Read but never committed: the process died between the insert and the cursor.
        let batch = journal.read_batch(1).expect("read");
        assert_eq!(batch.rows[0].request_id, "r3");
    }
    let cursor: Position =
        serde_json::from_slice(&std::fs::read(dir.path().join("cursor")).expect("cursor file"))
            .expect("cursor json");
    assert_eq!(cursor.segment, 0);
    assert!(cursor.offset > 0);
    assert!(
        !dir.path().join("cursor.tmp").exists(),
        "replaced atomically"
    );

    let journal = open(dir.path());
    assert_eq!(journal.cursor(), cursor);
    assert_eq!(journal.backlog(), 2);
    assert_eq!(drain(&journal, 256), ["r3", "r4"]);
    drop(journal);
    let journal = open(dir.path());
    assert_eq!(journal.backlog(), 0);
    assert!(drain(&journal, 256).is_empty());
}

#[test]
fn an_unreadable_cursor_replays_every_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    ship(&open_with_rows(dir.path(), 4), 2);
    std::fs::write(dir.path().join("cursor"), "{\"segm").expect("write");
    // Rows already stored are skipped by the store, so replaying them is harmless.
    let journal = open(dir.path());
    assert_eq!(journal.backlog(), 4);
    assert_eq!(drain(&journal, 256), ids(0..4));
}

#[test]
fn segments_rotate_at_their_size_and_are_deleted_once_shipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let line = serde_json::to_vec(&row("r00")).expect("json").len() as u64 + 1;
    // Three rows a segment.
    let journal = Journal::open(dir.path(), 3 * line + line / 2).expect("open");
    let first = journal.active_segment();
    for i in 0..10 {
        journal.append(row(&format!("r{i:02}"))).expect("append");
    }
    let files = segments(dir.path());
    assert_eq!(files.len(), 4, "{files:?}");
    assert_eq!(journal.active_segment(), first + 3);
    for file in &files[..3] {
        assert_eq!(std::fs::metadata(file).expect("meta").len(), 3 * line);
    }
    let expected: Vec<String> = (0..10).map(|i| format!("r{i:02}")).collect();
    // Batches that end inside a segment and cross into the next.
    assert_eq!(drain(&journal, 2), expected);
    assert_eq!(journal.backlog(), 0);
    assert_eq!(
        segments(dir.path()),
        [files[3].clone()],
        "only the active one"
    );

    // A restart starts a new segment; the old (shipped) one goes at the next commit.
    drop(journal);
    let journal = Journal::open(dir.path(), 3 * line + line / 2).expect("open");
    assert_eq!(journal.active_segment(), first + 4);
    journal.append(row("r10")).expect("append");
    assert_eq!(drain(&journal, 256), ["r10"]);
    assert_eq!(segments(dir.path()).len(), 1);
}

/// What the shipper takes from memory (the lines this process appended) is what it would
/// have read back from the files: the same rows, intents and cancels in the same batches,
/// across segments, and past the bound of what memory keeps (the rest comes from the file).
#[test]
fn lines_kept_in_memory_read_back_as_the_files_do() {
    let live_dir = tempfile::tempdir().expect("tempdir");
    let segment_bytes = 64 * 1024;
    let live = Journal::open(live_dir.path(), segment_bytes).expect("open");
    // 2 lines a call, 3,000 calls: more than memory keeps, over a hundred segments.
    for i in 0..3000 {
        let id = format!("r{i}");
        live.append_intent(&intent(&id)).expect("intent");
        if i % 7 == 3 {
            live.append_cancel(&id).expect("cancel");
        } else {
            live.append(row(&id)).expect("append");
        }
    }
    // The same files, opened by a journal that has nothing in memory.
    let copy_dir = tempfile::tempdir().expect("tempdir");
    for file in segments(live_dir.path()) {
        std::fs::copy(&file, copy_dir.path().join(file.file_name().expect("name"))).expect("copy");
    }
    let replay = Journal::open(copy_dir.path(), segment_bytes).expect("open copy");
    let mut batches = 0;
    loop {
        let (from_memory, from_file) = (
            live.read_batch(256).expect("read live"),
            replay.read_batch(256).expect("read copy"),
        );
        assert_eq!(from_memory.rows, from_file.rows, "batch {batches}");
        assert_eq!(from_memory.intents, from_file.intents, "batch {batches}");
        assert_eq!(from_memory.cancels, from_file.cancels, "batch {batches}");
        assert_eq!(
            (from_memory.lines, from_memory.markers),
            (from_file.lines, from_file.markers),
            "batch {batches}"
        );
        if from_memory.is_empty() {
            assert!(from_file.is_empty());
            break;
        }
        live.commit(&from_memory).expect("commit");
        replay.commit(&from_file).expect("commit");
        batches += 1;
    }
    assert!(batches > 20, "{batches} batches");
    assert_eq!((live.backlog(), live.pending_intents()), (0, 0));
    assert_eq!((replay.backlog(), replay.pending_intents()), (0, 0));
}

#[test]
fn a_backlog_spanning_segments_is_counted_and_replayed_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    for run in 0..3 {
        let journal = open(dir.path());
        for i in 0..4 {
            journal
                .append(row(&format!("run{run}-{i}")))
                .expect("append");
        }
        assert_eq!(journal.backlog(), 4 * (run + 1));
    }
    let journal = open(dir.path());
    assert_eq!(journal.backlog(), 12);
    let got = drain(&journal, 5);
    assert_eq!(got.len(), 12);
    assert_eq!(got[0], "run0-0");
    assert_eq!(got[11], "run2-3");
    assert_eq!(segments(dir.path()).len(), 1);
}

#[test]
fn a_journal_folder_is_used_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open(dir.path());
    let err = Journal::open(dir.path(), 1024)
        .err()
        .expect("a second open fails");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(journal);
    open(dir.path());
}

async fn readyz(client: &reqwest::Client, base: &str) -> (u16, Value) {
    let response = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    let status = response.status().as_u16();
    (status, response.json().await.expect("readyz json"))
}

#[tokio::test]
async fn a_row_the_database_refuses_is_set_aside_and_the_rest_written() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gateway = TestGateway::start(
        crate::support::Db::Postgres,
        &test_config(&provider.base_url(), ""),
    )
    .await;
    let mut ids = Vec::new();
    // Postgres refuses a NUL character in text; the client chose this size.
    for size in ["1024x1024", "1024x1024\u{0}", "1024x1536"] {
        let body = serde_json::json!({"prompt": "a fox", "size": size}).to_string();
        let response = gateway.post_json("/v1/images/generations", &body).await;
        assert_eq!(response.status(), 200);
        ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .expect("id")
                .to_owned(),
        );
        response.bytes().await.expect("body");
    }
    let rows = gateway.usage_rows(2).await;
    let stored: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(stored, [ids[0].as_str(), ids[2].as_str()]);
    let refused =
        std::fs::read_to_string(gateway.journal_dir().join("refused.jsonl")).expect("refused");
    assert_eq!(refused.lines().count(), 1, "{refused}");
    let row: UsageRow = serde_json::from_str(refused.lines().next().expect("line")).expect("row");
    assert_eq!(row.request_id, ids[1]);
    let (_, body) = readyz(&gateway.client, &gateway.url("")).await;
    assert_eq!(body["checks"]["usage_backlog"], 0, "{body}");
    gateway.shutdown().await;
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

// ---------------------------------------------------------------------------------------
// Clients that keep sending.

/// What a client saw of one request.
#[derive(Debug, Clone)]
struct Sent {
    status: Option<u16>,
    request_id: Option<String>,
    /// A 200 whose whole body arrived (and is an image answer).
    complete: bool,
}

/// `workers` clients sending generations back to back until stopped (or, with
/// `stop_on_error`, until one fails to get an answer).
struct Traffic {
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(url: String, key: String, workers: usize, stop_on_error: bool) -> Traffic {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::new();
        let workers = (0..workers)
            .map(|_| {
                let (sent, stop, client, url, key) = (
                    Arc::clone(&sent),
                    Arc::clone(&stop),
                    client.clone(),
                    url.clone(),
                    key.clone(),
                );
                #[expect(clippy::disallowed_methods, reason = "joined by Traffic::finish")]
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let result = send_one(&client, &url, &key).await;
                        let failed = result.status.is_none();
                        sent.lock().expect("sent").push(result);
                        if failed && stop_on_error {
                            return;
                        }
                    }
                })
            })
            .collect();
        Traffic {
            sent,
            stop,
            workers,
        }
    }

    fn count(&self) -> usize {
        self.sent.lock().expect("sent").len()
    }

    async fn wait_for(&self, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count() < count {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} requests answered in {timeout:?}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.expect("client task");
        }
        Arc::try_unwrap(self.sent)
            .expect("workers done")
            .into_inner()
            .expect("sent")
    }
}

async fn send_one(client: &reqwest::Client, url: &str, key: &str) -> Sent {
    let response = match client
        .post(url)
        .bearer_auth(key)
        .json(&serde_json::json!({"prompt": "a lighthouse", "quality": "low"}))
        .send()
        .await
    {
        Ok(response) => response,
        Err(_) => {
            return Sent {
                status: None,
                request_id: None,
                complete: false,
            };
        }
    };
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await;
    let complete = status == 200
        && body.is_ok_and(|b| {
            serde_json::from_slice::<Value>(&b).is_ok_and(|v| v["data"][0]["b64_json"].is_string())
        });
    Sent {
        status: Some(status),
        request_id,
        complete,
    }
}

async fn backlog_metric(client: &reqwest::Client, base: &str) -> f64 {
    metric(client, base, "imagegate_usage_journal_backlog_rows").await
}

/// Polls `/readyz` until the usage backlog is zero and the database answers.
async fn wait_until_shipped(client: &reqwest::Client, base: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = readyz(client, base).await;
        if status == 200 && body["checks"]["usage_backlog"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "usage backlog not written within {timeout:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every usage row has its own request id, and every id in `answered` has one.
fn assert_one_row_each(rows: &[UsageRow], answered: &[String]) -> usize {
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for row in rows {
        *per_id.entry(row.request_id.as_str()).or_default() += 1;
    }
    let duplicates = per_id.values().filter(|&&n| n > 1).count();
    assert_eq!(duplicates, 0, "request ids with more than one row");
    let lost: Vec<&String> = answered
        .iter()
        .filter(|id| !per_id.contains_key(id.as_str()))
        .collect();
    assert!(lost.is_empty(), "answered requests without a row: {lost:?}");
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_outage_mid_stream_delays_usage_rows_and_loses_none() {
    let cluster = blocking(Cluster::start).await;
    let cluster = Arc::new(cluster);
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(20));
    // key_cache_ttl is 1 s: the outage outlasts it, so keys are served from the last answer.
    let gateway =
        TestGateway::start_on(&cluster.url(), &test_config(&provider.base_url(), "")).await;
    let base = gateway.url("");
    let client = reqwest::Client::new();
    let traffic = Traffic::start(
        gateway.url("/v1/images/generations"),
        gateway.key.clone(),
        4,
        false,
    );

    traffic.wait_for(30, Duration::from_secs(30)).await;
    let c = Arc::clone(&cluster);
    blocking(move || c.stop()).await;
    let at_stop = traffic.count();
    let stopped = Instant::now();
    // Past the key cache's TTL, and enough requests to show they are still served.
    traffic
        .wait_for(at_stop + 60, Duration::from_secs(60))
        .await;
    while stopped.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = traffic.count() - at_stop;
    let (status, body) = readyz(&client, &base).await;
    assert_eq!(status, 503, "{body}");
    assert_ne!(body["checks"]["database"], "ok", "{body}");
    let backlog = body["checks"]["usage_backlog"].as_u64().expect("backlog");
    // At most one request per client was answered after its row was stored and before the
    // stop took effect.
    assert!(
        backlog as usize + 4 >= during,
        "backlog {backlog} after {during} requests during the outage"
    );
    let on_disk: u64 = segments(&gateway.journal_dir())
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    assert!(on_disk > 0, "the backlog is in the journal on disk");
    let metric = backlog_metric(&client, &base).await;
    assert!(
        metric >= backlog as f64,
        "gauge {metric} below the backlog {backlog}"
    );

    let c = Arc::clone(&cluster);
    blocking(move || c.resume()).await;
    let at_resume = traffic.count();
    traffic
        .wait_for(at_resume + 30, Duration::from_secs(60))
        .await;
    let sent = traffic.finish().await;
    wait_until_shipped(&client, &base, Duration::from_secs(60)).await;

    let not_ok: Vec<&Sent> = sent.iter().filter(|s| !s.complete).collect();
    assert!(
        not_ok.is_empty(),
        "every request gets a whole 200: {not_ok:?}"
    );
    let answered: Vec<String> = sent
        .iter()
        .map(|s| s.request_id.clone().expect("x-request-id"))
        .collect();
    let rows = all_rows(&*gateway.store).await;
    let calls = provider.complete_requests().len();
    let duplicates = assert_one_row_each(&rows, &answered);
    assert_eq!(calls, sent.len(), "one provider call per request");
    assert_eq!(rows.len(), calls, "one row per provider call");
    let mut gauge = backlog_metric(&client, &base).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The gauge sums every journal open in this process (other tests run gateways too).
    while gauge != 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        gauge = backlog_metric(&client, &base).await;
    }
    assert_eq!(gauge, 0.0, "backlog gauge back to zero");
    eprintln!(
        "postgres outage: requests {} ({during} during the outage, backlog {backlog}), \
         provider calls {calls}, rows {}, duplicates {duplicates}, lost 0",
        sent.len(),
        rows.len()
    );
    gateway.shutdown().await;
    drop(cluster);
}

// ---------------------------------------------------------------------------------------
// The real binary: kill -9 mid-stream, and SIGTERM while the database is busy.

/// A config on a SQLite file in `dir`, gpt-image-1 on the built-in mock provider.
fn binary_config(dir: &Path, shutdown_grace: &str) -> PathBuf {
    let database_url = format!("sqlite:{}", dir.join("imagegate.db").display());
    binary::write_one_model_config(
        dir,
        &database_url,
        shutdown_grace,
        ("mock", "kind = \"mock\"\ndelay = \"30ms\""),
        "",
    )
}

/// `imagegate serve`, the address it listens on, and its log (when it has exited).
async fn spawn_serve(config: &Path) -> binary::Served {
    spawn_serve_with(config, &[]).await
}

/// [`spawn_serve`] with more environment variables.
async fn spawn_serve_with(config: &Path, env: &[(&str, &str)]) -> binary::Served {
    let mut command = binary::command(config);
    command
        .arg("serve")
        .env("RUST_LOG", "info")
        .env("IMAGEGATE_LOG_FORMAT", "json")
        .envs(env.iter().copied());
    binary::serve(command).await.into_parts()
}

/// Holds SQLite's write lock (readers go on): inserts wait, fail, and are retried.
async fn lock_writes(db: &Path) -> sqlx::SqliteConnection {
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{}", db.display()))
        .await
        .expect("open the database");
    sqlx::query("begin immediate")
        .execute(&mut conn)
        .await
        .expect("take the write lock");
    conn
}

async fn unlock_writes(mut conn: sqlx::SqliteConnection) {
    sqlx::query("rollback")
        .execute(&mut conn)
        .await
        .expect("release the write lock");
    conn.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_loses_no_row_of_a_response_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = binary_config(dir.path(), "10s");
    let key = binary::create_key(&config, "svc");
    let client = reqwest::Client::new();

    let (mut child, addr, _) = spawn_serve(&config).await;
    let base = format!("http://{addr}");
    let traffic = Traffic::start(
        format!("{base}/v1/images/generations"),
        key.clone(),
        16,
        true,
    );
    traffic.wait_for(100, Duration::from_secs(60)).await;

    // Rows pile up in the journal that only a restart can write.
    let locker = lock_writes(&dir.path().join("imagegate.db")).await;
    let at_lock = traffic.count();
    traffic
        .wait_for(at_lock + 100, Duration::from_secs(60))
        .await;
    let (_, body) = readyz(&client, &base).await;
    let backlog_before_kill = body["checks"]["usage_backlog"].as_u64().expect("backlog");
    assert!(backlog_before_kill > 0, "{body}");

    signal(&child, "-KILL");
    let status = child.wait().await.expect("wait");
    assert!(!status.success(), "killed");
    let sent = traffic.finish().await;
    unlock_writes(locker).await;

    let store = crate::support::db::open_sqlite(&dir.path().join("imagegate.db")).await;
    let rows_before_restart = all_rows(&*store).await.len();

    let (mut child, addr, _) = spawn_serve(&config).await;
    let base = format!("http://{addr}");
    wait_until_shipped(&client, &base, Duration::from_secs(60)).await;
    let status = binary::terminate(&mut child, Duration::from_secs(30)).await;
    assert!(status.success(), "SIGTERM exits 0");

    let answered: Vec<String> = sent
        .iter()
        .filter(|s| s.complete)
        .map(|s| s.request_id.clone().expect("x-request-id"))
        .collect();
    let cut = sent.len() - answered.len();
    let rows = all_rows(&*store).await;
    let duplicates = assert_one_row_each(&rows, &answered);
    assert!(
        rows_before_restart < answered.len(),
        "the restart wrote the journal's backlog ({rows_before_restart} rows before it)"
    );
    // Rows beyond the answered ones belong to requests the kill cut off after their row was
    // journaled (the body was on its way).
    let extra = rows.len() - answered.len();
    assert!(
        extra <= cut,
        "{extra} rows for requests not answered, but only {cut} were cut off"
    );
    eprintln!(
        "kill -9: requests {} (answered 200 {}, cut off by the kill {cut}), backlog at the kill {backlog_before_kill}, \
         rows before restart {rows_before_restart}, rows {}, duplicates {duplicates}, lost 0",
        sent.len(),
        answered.len(),
        rows.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_database_busy_leaves_the_backlog_for_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = binary_config(dir.path(), "1s");
    let key = binary::create_key(&config, "svc");
    let client = reqwest::Client::new();
    let db = dir.path().join("imagegate.db");

    let (mut child, addr, log) = spawn_serve(&config).await;
    let url = format!("http://{addr}/v1/images/generations");
    let locker = lock_writes(&db).await;
    let mut answered = Vec::new();
    for _ in 0..5 {
        let sent = send_one(&client, &url, &key).await;
        assert!(sent.complete, "{sent:?}");
        answered.push(sent.request_id.expect("x-request-id"));
    }
    let started = Instant::now();
    let status = binary::terminate(&mut child, Duration::from_secs(30)).await;
    assert!(status.success(), "SIGTERM exits 0");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gives up after the grace: {:?}",
        started.elapsed()
    );
    let log = log.await.expect("log");
    assert!(
        log.lines()
            .any(|l| l.contains("usage rows not yet in the database") && l.contains(r#""rows":5"#)),
        "{log}"
    );
    unlock_writes(locker).await;

    let (mut child, addr, _) = spawn_serve(&config).await;
    wait_until_shipped(&client, &format!("http://{addr}"), Duration::from_secs(30)).await;
    signal(&child, "-TERM");
    child.wait().await.expect("exits");
    let store = crate::support::db::open_sqlite(&db).await;
    let rows = all_rows(&*store).await;
    assert_one_row_each(&rows, &answered);
    assert_eq!(rows.len(), 5);
}

// ---------------------------------------------------------------------------------------
// A journal that cannot be written.

/// A config for the real binary on `database_url`, routing gpt-image-1 to `provider`.
fn standin_config(dir: &Path, database_url: &str, provider: &str) -> PathBuf {
    let provider_lines = format!("base_url = \"{provider}\"\napi_key_env = \"TEST_PIAPI_KEY\"");
    binary::write_one_model_config(dir, database_url, "5s", ("standin", &provider_lines), "")
}

/// Sets the soft file-size limit (RLIMIT_FSIZE) of a running process: writes that would
/// grow a file past it fail with EFBIG, as writes to a full disk fail with ENOSPC.
fn limit_file_size(child: &tokio::process::Child, bytes: &str) {
    let pid = child.id().expect("running").to_string();
    let status = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--fsize={bytes}:unlimited")])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success(), "prlimit --fsize={bytes}");
}

/// The value of the metric `name` on `base`'s /metrics page (0 when it is not there).
async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("metric value"))
}

/// `imagegate serve` on `database_url` (with a key made in `store`) in front of `provider`,
/// left with its file-size limit dropped to 0 while one call is in flight: no write can grow
/// a file (as on a full disk), and that call's row cannot be journaled at its end.
struct UnwritableJournal {
    config: PathBuf,
    child: tokio::process::Child,
    base: String,
    url: String,
    log: tokio::task::JoinHandle<String>,
    key: String,
    client: reqwest::Client,
    /// What the call in flight saw.
    in_flight: Sent,
}

async fn fill_the_disk_mid_call(
    dir: &Path,
    store: &dyn Store,
    database_url: &str,
    provider: &StandIn,
) -> UnwritableJournal {
    let issued = imagegate::auth::issue_key("svc");
    store.create_key(issued.new.clone()).await.expect("key");
    let key = issued.key;
    let config = standin_config(dir, database_url, &provider.base_url());
    let env = [("TEST_PIAPI_KEY", crate::support::PROVIDER_KEY)];
    let client = reqwest::Client::new();
    let (child, addr, log) = spawn_serve_with(&config, &env).await;
    let base = format!("http://{addr}");
    let url = format!("{base}/v1/images/generations");
    let in_flight = {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        #[expect(clippy::disallowed_methods, reason = "joined below")]
        tokio::spawn(async move { send_one(&client, &url, &key).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.requests().is_empty() {
        assert!(Instant::now() < deadline, "the call reaches the provider");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    limit_file_size(&child, "0");
    let a = in_flight.await.expect("join");
    UnwritableJournal {
        config,
        child,
        base,
        url,
        log,
        key,
        client,
        in_flight: a,
    }
}

/// The journal stops taking writes (a file-size limit of 0 on the process: every write
/// that grows a file fails, as on a full disk) while a call is in flight: its row goes
/// straight to the database, billable requests get 503 `usage_journal_unavailable`
/// without reaching the provider, `/readyz` says why, and lifting the limit brings it
/// all back without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_journal_stops_billable_requests_until_it_recovers() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("tempdir");
    // Postgres: a SQLite file would be under the same file-size limit as the journal.
    let (store, database_url) = crate::support::db::fresh_postgres().await;
    let UnwritableJournal {
        mut child,
        base,
        url,
        log,
        key,
        client,
        in_flight: a,
        ..
    } = fill_the_disk_mid_call(dir.path(), &*store, &database_url, &provider).await;
    assert!(a.complete, "the call in flight is answered: {a:?}");
    let a_id = a.request_id.expect("x-request-id");

    // Its row went straight to the database.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows = store.usage_for_request(&a_id).await.expect("rows");
        if !rows.is_empty() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        rows.len(),
        1,
        "the row the journal could not take is in the database"
    );
    assert_eq!(rows[0].outcome, Outcome::Completed);
    assert_eq!(
        metric(&client, &base, "imagegate_usage_rows_rescued_total").await,
        1.0
    );

    // Not ready, and says why.
    let (status, body) = readyz(&client, &base).await;
    assert_eq!(status, 503, "{body}");
    let why = body["checks"]["usage_journal"].as_str().expect("reason");
    assert!(why.starts_with("unavailable: "), "{body}");
    assert!(why.contains("too large"), "the OS error is named: {body}");
    assert_eq!(body["checks"]["database"], "ok", "{body}");

    // Billable requests are refused before any provider call; others are served.
    for _ in 0..3 {
        let response = client
            .post(&url)
            .bearer_auth(&key)
            .json(&serde_json::json!({"prompt": "refused"}))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 503);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "usage_journal_unavailable", "{body}");
        assert_eq!(body["error"]["type"], "server_error", "{body}");
    }
    let edit = client
        .post(format!("{base}/v1/images/edits"))
        .bearer_auth(&key)
        .header("content-type", "multipart/form-data; boundary=b")
        .body(
            "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n--b--\r\n",
        )
        .send()
        .await
        .expect("send");
    assert_eq!(edit.status(), 503);
    let models = client
        .get(format!("{base}/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("models");
    assert_eq!(models.status(), 200, "listing models bills nothing");
    assert_eq!(
        provider.requests().len(),
        1,
        "nothing refused reached the provider"
    );

    // The disk has room again: the probe notices, with no restart.
    limit_file_size(&child, "unlimited");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readyz(&client, &base).await;
        if status == 200 {
            assert_eq!(body["checks"]["usage_journal"], "ok", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "recovers: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    provider.set_delay(Duration::ZERO);
    let c = send_one(&client, &url, &key).await;
    assert!(c.complete, "{c:?}");
    let c_id = c.request_id.expect("x-request-id");
    wait_until_shipped(&client, &base, Duration::from_secs(10)).await;
    let status = binary::terminate(&mut child, Duration::from_secs(30)).await;
    assert!(status.success(), "SIGTERM exits 0");
    let log = log.await.expect("log");
    assert!(log.contains("usage journal unavailable"), "{log}");

    let rows = all_rows(&*store).await;
    let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(rows.len(), 2, "one row per provider call: {ids:?}");
    assert!(
        ids.contains(&a_id.as_str()) && ids.contains(&c_id.as_str()),
        "{ids:?}"
    );
}

/// The same, on SQLite: the database file is under the same file-size limit, so the row
/// the journal could not take cannot be written straight to the database either. It is
/// counted as lost and logged whole; its call's intent was journaled before the limit, so
/// the next start still records the call (as interrupted, at its worst case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_neither_the_journal_nor_the_database_takes_is_counted_logged_and_recovered() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    provider.set_delay(Duration::from_millis(1000));
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("imagegate.db");
    let database_url = format!("sqlite:{}", db.display());
    let store = crate::support::db::open_sqlite(&db).await;
    let UnwritableJournal {
        config,
        mut child,
        base,
        log,
        client,
        in_flight: a,
        ..
    } = fill_the_disk_mid_call(dir.path(), &*store, &database_url, &provider).await;
    let env = [("TEST_PIAPI_KEY", crate::support::PROVIDER_KEY)];
    assert!(a.complete, "{a:?}");
    let a_id = a.request_id.expect("x-request-id");
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(&client, &base, "imagegate_usage_rows_lost_total").await != 1.0 {
        assert!(Instant::now() < deadline, "the lost row is counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    limit_file_size(&child, "unlimited");
    signal(&child, "-TERM");
    child.wait().await.expect("exits");
    let log = log.await.expect("log");
    let lost = log
        .lines()
        .find(|l| l.contains("usage row lost"))
        .unwrap_or_else(|| panic!("a log line for the lost row:\n{log}"));
    let line: Value = serde_json::from_str(lost).expect("a JSON log line");
    let row: UsageRow =
        serde_json::from_str(line["row"].as_str().unwrap_or_else(|| panic!("{line}")))
            .expect("the whole row is in the log line");
    assert_eq!(row.request_id, a_id);
    assert_eq!(row.outcome, Outcome::Completed);
    assert_eq!(row.input_tokens, 1124);
    assert!(
        all_rows(&*store).await.is_empty(),
        "nothing reached the database"
    );

    // The call's intent is in the journal: the next start books it at its worst case.
    let (mut child, addr, _) = spawn_serve_with(&config, &env).await;
    wait_until_shipped(&client, &format!("http://{addr}"), Duration::from_secs(10)).await;
    signal(&child, "-TERM");
    child.wait().await.expect("exits");
    let rows = all_rows(&*store).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0].request_id, a_id);
    assert_eq!(rows[0].outcome, Outcome::Interrupted);
    assert!(rows[0].cost_estimated);
    assert!(
        rows[0].cost_nanousd >= row.cost_nanousd,
        "never under-counted"
    );
}

// ---------------------------------------------------------------------------------------
// Calls in flight at a kill -9.

/// `kill -9` with calls held at the provider: the next start records one `interrupted` row
/// per call cut off (no tokens, the worst-case cost, `cost_estimated`), and none for the
/// calls whose row was written; a third start adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_calls_in_flight_leaves_one_interrupted_row_per_call_cut() {
    const CUT: usize = 8;
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("imagegate.db");
    let database_url = format!("sqlite:{}", db.display());
    let store = crate::support::db::open_sqlite(&db).await;
    let issued = imagegate::auth::issue_key("svc");
    store.create_key(issued.new.clone()).await.expect("key");
    let key = issued.key;
    let config = standin_config(dir.path(), &database_url, &provider.base_url());
    let env = [("TEST_PIAPI_KEY", crate::support::PROVIDER_KEY)];
    let client = reqwest::Client::new();

    let (mut child, addr, _) = spawn_serve_with(&config, &env).await;
    let base = format!("http://{addr}");
    let url = format!("{base}/v1/images/generations");
    let mut completed = Vec::new();
    for _ in 0..3 {
        let sent = send_one(&client, &url, &key).await;
        assert!(sent.complete, "{sent:?}");
        completed.push(sent.request_id.expect("x-request-id"));
    }
    wait_until_shipped(&client, &base, Duration::from_secs(10)).await;

    // Calls the provider holds: it has them (and would bill them) when the kill comes.
    provider.set_delay(Duration::from_secs(600));
    let held: Vec<_> = (0..CUT)
        .map(|_| {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            #[expect(clippy::disallowed_methods, reason = "joined below")]
            tokio::spawn(async move { send_one(&client, &url, &key).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.requests().len() < 3 + CUT {
        assert!(Instant::now() < deadline, "the calls reach the provider");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, "-KILL");
    child.wait().await.expect("wait");
    for sent in held {
        assert!(!sent.await.expect("join").complete, "cut off");
    }
    assert_eq!(
        all_rows(&*store).await.len(),
        3,
        "no row for a call cut off yet"
    );

    for start in ["the start after the kill", "the start after that"] {
        let (mut child, addr, log) = spawn_serve_with(&config, &env).await;
        wait_until_shipped(&client, &format!("http://{addr}"), Duration::from_secs(10)).await;
        signal(&child, "-TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "{start}: SIGTERM exits 0");
        let rows = all_rows(&*store).await;
        assert_eq!(rows.len(), 3 + CUT, "{start}: one row per provider call");
        assert_one_row_each(&rows, &completed);
        let cut: Vec<&UsageRow> = rows
            .iter()
            .filter(|r| r.outcome == Outcome::Interrupted)
            .collect();
        assert_eq!(cut.len(), CUT, "{start}: one interrupted row per call cut");
        for row in &cut {
            assert!(!completed.contains(&row.request_id), "{start}: {row:?}");
            assert!(row.cost_estimated, "{row:?}");
            // The worst case of a 12-character prompt and one image at most 6240 tokens.
            assert_eq!(row.cost_nanousd, Some(12 * 5000 + 6240 * 40000), "{row:?}");
            assert_eq!(row.status, 0);
        }
        for row in rows.iter().filter(|r| completed.contains(&r.request_id)) {
            assert_eq!(row.outcome, Outcome::Completed);
            assert!(!row.cost_estimated);
        }
        if start == "the start after the kill" {
            let log = log.await.expect("log");
            assert!(log.contains("provider calls cut off"), "{log}");
        }
    }
    // The tokens of an interrupted row are unknown: null, not zero.
    let mut conn = sqlx::SqliteConnection::connect(&database_url)
        .await
        .expect("open the database");
    let nulls: i64 = sqlx::query_scalar(
        "select count(*) from usage where outcome = 'interrupted' and input_tokens is null \
         and output_tokens is null and total_tokens is null and cost_estimated",
    )
    .fetch_one(&mut conn)
    .await
    .expect("count");
    assert_eq!(nulls, CUT as i64);
}
