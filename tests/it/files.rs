//! What imagegate writes to disk is for its own user only: every file 0600 (never group or
//! other readable), every folder 0700.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::jobs::{accepted, wait_finished};
use crate::support::forms::Form;
use crate::support::*;

/// Every file and folder under `root` (not `root` itself, nor the paths in `skip`), with
/// its permission bits.
fn walk(root: &Path, skip: &[PathBuf]) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("read folder") {
            let path = entry.expect("entry").path();
            if skip.contains(&path) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // removed meanwhile (a spool file, a temporary file)
            };
            if meta.is_dir() {
                folders.push(path.clone());
            }
            found.push((path, meta.permissions().mode() & 0o777));
        }
    }
    found.sort();
    found
}

/// The paths of `found` whose mode lets another user in: a file anyone but its owner may
/// read or write, a folder anyone but its owner may enter or list.
fn open_to_others(found: &[(PathBuf, u32)]) -> Vec<String> {
    found
        .iter()
        .filter(|(_, mode)| mode & 0o077 != 0)
        .map(|(path, mode)| format!("{} {mode:o}", path.display()))
        .collect()
}

fn names(found: &[(PathBuf, u32)], root: &Path) -> Vec<String> {
    found
        .iter()
        .map(|(path, _)| {
            let name = path.strip_prefix(root).expect("under root").display();
            name.to_string()
        })
        .collect()
}

/// After a run that spooled an upload, kept a result for retries, ran a job, journalled
/// usage and wrote it to SQLite, nothing imagegate made is open to other users.
#[tokio::test]
async fn files_and_folders_imagegate_writes_are_its_users_only() {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let gw = TestGateway::start(Db::Sqlite, &test_config(&provider.base_url(), "")).await;
    let root = gw
        .config_path
        .parent()
        .expect("the test's folder")
        .to_owned();
    // The test wrote its configuration; imagegate wrote everything else.
    let skip = [gw.config_path.clone()];

    // A client that leaves while the provider works: the result is kept for its retry.
    provider.set_delay(Duration::from_millis(800));
    let left = gw
        .client
        .post(gw.url("/v1/images/generations"))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .header("idempotency-key", "order-1")
        .body(r#"{"model":"gpt-image-1","prompt":"fox"}"#)
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(left.is_err(), "the client left");
    let results = root.join("results/kept");
    for _ in 0..100 {
        if std::fs::read_dir(&results).is_ok_and(|mut r| r.next().is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An edit job, looked at while the provider works on it: its upload is spooled.
    provider.set_delay(Duration::from_millis(1500));
    let form = Form::edit("gpt-image-1", "add a hat");
    let job = gw
        .client
        .post(gw.url("/v1/images/edits"))
        .bearer_auth(&gw.key)
        .header("content-type", form.content_type())
        .header("prefer", "respond-async")
        .body(form.body())
        .send()
        .await
        .expect("send");
    let (id, _) = accepted(job).await;
    assert!(provider.wait_for_requests(2).await, "the job was sent");
    assert!(gw.spool_files() > 0, "the job's upload is spooled");
    let during = walk(&root, &skip);
    assert_eq!(open_to_others(&during), Vec::<String>::new());

    let (job, _) = wait_finished(&gw.client, &gw.url(""), &gw.key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    gw.usage_rows(2).await;
    let after = walk(&root, &skip);
    let seen = names(&after, &root);
    for expected in [
        "imagegate.db".to_owned(),
        "imagegate.db-wal".to_owned(),
        "imagegate.db-shm".to_owned(),
        "journal".to_owned(),
        "spool".to_owned(),
        "results/kept".to_owned(),
        format!("results/jobs/{id}"),
    ] {
        assert!(seen.contains(&expected), "{expected} in {seen:#?}");
    }
    let journal_files = seen.iter().filter(|n| n.starts_with("journal/")).count();
    let kept_results = seen
        .iter()
        .filter(|n| n.starts_with("results/kept/"))
        .count();
    assert!(journal_files > 0 && kept_results > 0, "{seen:#?}");
    assert_eq!(open_to_others(&after), Vec::<String>::new());
    gw.shutdown().await;
}
