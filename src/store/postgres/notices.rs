//! Notices on Postgres: `pg_notify` in the publishing transaction (so a change is announced
//! exactly when it commits, and never when it rolls back), and one `LISTEN` connection per
//! subscription, from a pool of its own so that it never takes one of the requests'.

use async_trait::async_trait;
use sqlx::postgres::PgListener;

use super::PostgresStore;
use crate::store::StoreResult;
use crate::store::notices::{CHANNEL, Notice, NoticeStore, Notices, NoticesLost};

/// Publishes `notice` on `conn`: inside a transaction, delivered when it commits.
pub(super) async fn publish(conn: &mut sqlx::PgConnection, notice: &Notice) -> StoreResult<()> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(notice.payload())
        .execute(conn)
        .await?;
    Ok(())
}

struct Listening(PgListener);

#[async_trait]
impl Notices for Listening {
    async fn next(&mut self) -> Result<Notice, NoticesLost> {
        loop {
            // `try_recv` rather than `recv`: a lost connection is reported instead of being
            // replaced silently, since what was published meanwhile is gone.
            match self.0.try_recv().await? {
                Some(received) => {
                    if let Some(notice) = Notice::parse(received.payload()) {
                        return Ok(notice);
                    }
                }
                None => return Err(NoticesLost::Disconnected),
            }
        }
    }
}

#[async_trait]
impl NoticeStore for PostgresStore {
    #[tracing::instrument(skip_all)]
    async fn subscribe(&self) -> StoreResult<Box<dyn Notices>> {
        let mut listener = PgListener::connect_with(&self.listen_pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Box::new(Listening(listener)))
    }

    #[tracing::instrument(skip_all)]
    async fn publish_reload(&self, from: &str) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        let from = from.to_owned();
        publish(&mut conn, &Notice::Reload { from }).await
    }
}
