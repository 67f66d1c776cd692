//! A fresh, migrated database for each test: a new Postgres database or a new SQLite file.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use imagegate::store::{PostgresStore, SqliteStore, Store};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor};

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A server that drops packets would otherwise hang the test instead of failing it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A new database on the test server, migrated, and the URL that names it.
///
/// Panics when Postgres is not there: a suite that skips its database tests would pass
/// without testing what production runs on.
pub async fn fresh_postgres() -> (Arc<dyn Store>, String) {
    let admin_url = std::env::var("IMAGEGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
    let options = PgConnectOptions::from_str(&admin_url)
        .unwrap_or_else(|err| panic!("IMAGEGATE_TEST_DATABASE_URL is not a Postgres URL: {err}"));
    // Host and port only: the URL may carry a password.
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let mut admin = match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => panic!("{}", unreachable_message(&server, &err.to_string())),
        Err(_) => panic!("{}", unreachable_message(&server, "timed out")),
    };

    let database = format!("imagegate_test_{}", uuid::Uuid::now_v7().simple());
    admin
        .execute(format!(r#"create database "{database}""#).as_str())
        .await
        .unwrap_or_else(|err| panic!("creating test database {database} on {server}: {err}"));
    admin.close().await.expect("closing the admin connection");

    let url = with_database(&admin_url, &database);
    let store = PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|err| panic!("connecting to test database {database}: {err:#}"));
    store.migrate().await.expect("migrating the test database");
    (Arc::new(store), url)
}

fn unreachable_message(server: &str, err: &str) -> String {
    format!(
        "Postgres is not reachable at {server} ({err}): start it (`scripts/ensure-postgres` \
         does, and `scripts/test` runs it) or set IMAGEGATE_TEST_DATABASE_URL"
    )
}

/// The same URL naming another database: the path is the database, the query string stays.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// A new SQLite file, migrated, in a temporary directory that lives as long as the guard.
pub async fn fresh_sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let store = open_sqlite(&dir.path().join("imagegate.db")).await;
    (store, dir)
}

/// The SQLite database at `path` (created if missing), migrated: the one a spawned
/// imagegate writes, opened to read what it stored.
pub async fn open_sqlite(path: &std::path::Path) -> Arc<dyn Store> {
    let url = format!("sqlite:{}", path.display());
    let store = SqliteStore::connect(&url)
        .await
        .unwrap_or_else(|err| panic!("opening {url}: {err:#}"));
    store.migrate().await.expect("migrating the test database");
    Arc::new(store)
}

#[test]
fn with_database_replaces_only_the_path() {
    assert_eq!(
        with_database("postgres://u@h:5432/postgres", "t"),
        "postgres://u@h:5432/t"
    );
    assert_eq!(with_database("postgres://u@h", "t"), "postgres://u@h/t");
    assert_eq!(
        with_database("postgresql://u:p@h/db?sslmode=disable", "t"),
        "postgresql://u:p@h/t?sslmode=disable"
    );
}

/// Runs each listed `async fn(Arc<dyn Store>)` once per database, as
/// `<module>::postgres::<name>` and `<module>::sqlite::<name>`, each on a fresh database:
/// one suite per storage concern, the same bodies on both.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let (store, _url) = crate::support::db::fresh_postgres().await;
                    super::$test(store).await;
                }
            )*
        }

        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let (store, _dir) = crate::support::db::fresh_sqlite().await;
                    super::$test(store).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;
