//! The usage journal: its files (torn lines, the cursor, segments) and a row the database
//! refuses.

use std::path::{Path, PathBuf};

use chrono::DateTime;
use imagegate::usage::journal::{Journal, Position};
use imagegate::usage::{Outcome, UsageRow};
use serde_json::Value;

use crate::helpers::{StandIn, TestGateway, USAGE, image_response, test_config};

fn row(id: &str) -> UsageRow {
    UsageRow {
        request_id: id.into(),
        key_id: 1,
        key_name: "svc".into(),
        model: "gpt-image-1".into(),
        provider: "piapi".into(),
        upstream_model: "gpt-image-1".into(),
        endpoint: "generations".into(),
        status: 200,
        outcome: Outcome::Completed,
        streamed: false,
        n: Some(1),
        size: Some("1024x1024".into()),
        quality: None,
        images: 1,
        text_input_tokens: 19,
        image_input_tokens: 0,
        cached_text_input_tokens: 0,
        cached_image_input_tokens: 0,
        input_tokens: 19,
        output_tokens: 272,
        total_tokens: 291,
        cost_nanousd: 10_975_000,
        latency_ms: 12,
        // Fixed, so that every row's line has the same length.
        created_at: DateTime::from_timestamp(1_780_000_000, 123_456_000).expect("time"),
        raw_usage: Some(r#"{"input_tokens":19}"#.into()),
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

#[test]
fn rows_are_read_back_whole_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open(dir.path());
    let mut sent = Vec::new();
    for i in 0..5 {
        let r = row(&format!("r{i}"));
        journal.append(&r).expect("append");
        sent.push(r);
    }
    assert_eq!(journal.backlog(), 5);
    let batch = journal.read_batch(256).expect("read");
    assert_eq!(batch.rows, sent, "a row comes back as it went in");
    journal.commit(&batch).expect("commit");
    assert_eq!(journal.backlog(), 0);
    assert!(journal.read_batch(256).expect("read").is_empty());
}

#[test]
fn a_torn_last_line_is_skipped_on_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let journal = open(dir.path());
        for id in ids(0..3) {
            journal.append(&row(&id)).expect("append");
        }
    }
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
    journal.append(&row("r3")).expect("append");
    assert_eq!(drain(&journal, 256), ["r3"]);
}

#[test]
fn a_line_that_is_not_a_row_is_skipped_and_the_rest_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let journal = open(dir.path());
        journal.append(&row("r0")).expect("append");
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
        let journal = open(dir.path());
        for id in ids(0..5) {
            journal.append(&row(&id)).expect("append");
        }
        let batch = journal.read_batch(3).expect("read");
        assert_eq!(batch.rows.len(), 3);
        journal.commit(&batch).expect("commit");
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
    {
        let journal = open(dir.path());
        for id in ids(0..4) {
            journal.append(&row(&id)).expect("append");
        }
        let batch = journal.read_batch(2).expect("read");
        journal.commit(&batch).expect("commit");
    }
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
        journal.append(&row(&format!("r{i:02}"))).expect("append");
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
    journal.append(&row("r10")).expect("append");
    assert_eq!(drain(&journal, 256), ["r10"]);
    assert_eq!(segments(dir.path()).len(), 1);
}

#[test]
fn a_backlog_spanning_segments_is_counted_and_replayed_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    for run in 0..3 {
        let journal = open(dir.path());
        for i in 0..4 {
            journal
                .append(&row(&format!("run{run}-{i}")))
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
        crate::helpers::Db::Postgres,
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
