//! A request body that fails when its client stops sending. An upload that stalls for
//! longer than `server.request_body_idle_timeout` ends its request with 408, which drops
//! the spool file and any provider call already started, and lets hyper close the
//! connection (the body was not read to its end).

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// The client sent nothing while the request waited for its body.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no part of the request body for {}s", .0.as_secs_f64())]
pub struct BodyIdle(pub Duration);

pin_project! {
    /// Only time spent waiting for the client counts: while the reader is busy elsewhere
    /// (a provider slow to take the upload), the clock does not run.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        idle: Duration,
        waiting: bool,
        expired: bool,
    }
}

/// Wraps a request body so that it fails with [`BodyIdle`] after `idle` without data.
pub fn idle_timeout(body: Body, idle: Duration) -> Body {
    Body::new(IdleTimeout {
        inner: body,
        sleep: tokio::time::sleep(idle),
        idle,
        waiting: false,
        expired: false,
    })
}

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        if !*this.waiting {
            *this.waiting = true;
            this.sleep.as_mut().reset(Instant::now() + *this.idle);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => {
                    *this.expired = true;
                    Poll::Ready(Some(Err(Box::new(BodyIdle(*this.idle)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a body read failed because the client went idle. The error arrives wrapped
/// (in axum's error, in an `io::Error`), so the whole chain is searched.
pub fn is_idle(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err.is::<BodyIdle>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps; look at that one too.
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if is_idle(inner) {
                return true;
            }
        }
        next = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    const IDLE: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn a_stalled_body_fails_after_the_idle_time() {
        let stream = futures_util::stream::once(async { Ok::<_, std::io::Error>(&b"abc"[..]) })
            .chain(futures_util::stream::pending());
        let mut body = idle_timeout(Body::from_stream(stream), IDLE);
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "abc");
        let started = Instant::now();
        let err = body.frame().await.expect("an error").expect_err("idle");
        assert!(is_idle(&err), "{err}");
        assert!(started.elapsed() >= IDLE);
        assert!(body.frame().await.is_none(), "ends after the error");
    }

    #[tokio::test]
    async fn time_spent_away_from_the_body_does_not_count() {
        let stream =
            futures_util::stream::iter([Ok::<_, std::io::Error>(&b"a"[..]), Ok(&b"b"[..])]);
        let mut body = idle_timeout(Body::from_stream(stream), IDLE);
        body.frame().await.expect("frame").expect("data");
        // The reader is busy for longer than the idle time; the client is not to blame.
        tokio::time::sleep(IDLE * 3).await;
        body.frame().await.expect("frame").expect("data");
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn finds_the_idle_error_however_it_is_wrapped() {
        let idle = || BodyIdle(IDLE);
        assert!(is_idle(&axum::Error::new(idle())));
        assert!(is_idle(&std::io::Error::other(axum::Error::new(idle()))));
        let boxed: BoxError = Box::new(std::io::Error::other(axum::Error::new(idle())));
        assert!(is_idle(&*boxed));
        assert!(!is_idle(&std::io::Error::other("reset")));
    }
}
