//! A request body that fails when its client stops sending, and whose unread rest is read
//! and discarded after its handler is done with it.
//!
//! An upload that stalls for longer than `server.request_body_idle_timeout` ends its
//! request with 408, which drops the spool file and any provider call already started,
//! and lets hyper close the connection (the body was not read to its end).
//!
//! A request refused before its body was read (413 on a declared length, an upload over a
//! limit) would have its connection closed on unread bytes, which the kernel answers with
//! a reset that can overtake the answer: the client, still sending, sees "broken pipe"
//! instead of the 413. So what is left is read (within [`LINGER_BYTES`] and
//! [`LINGER_TIME`]) while the answer goes out, as nginx's "lingering close" does.

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
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

/// How much of a body its handler left unread is still read and discarded, and for how long.
pub const LINGER_BYTES: usize = 4 * 1024 * 1024;
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// Wraps a request body so that it fails with [`BodyIdle`] after `idle` without data, and
/// its rest is discarded if it is dropped unread.
pub fn idle_timeout(body: Body, idle: Duration) -> Body {
    Body::new(Linger {
        inner: Some(Body::new(IdleTimeout {
            inner: body,
            sleep: tokio::time::sleep(idle),
            idle,
            waiting: false,
            expired: false,
        })),
        ended: false,
    })
}

/// Discards the rest of a body dropped before its end (see the module's doc).
struct Linger {
    inner: Option<Body>,
    /// The body ended or failed: nothing is left to read.
    ended: bool,
}

impl http_body::Body for Linger {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Linger {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else {
            return;
        };
        if self.ended || body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Not tracked: a bounded drain that nothing waits for, and that shutdown may cut.
        runtime.spawn(async move {
            let mut left = LINGER_BYTES;
            let _ = tokio::time::timeout(LINGER_TIME, async {
                while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
                    let len = frame.data_ref().map_or(0, Bytes::len);
                    match left.checked_sub(len) {
                        Some(rest) => left = rest,
                        None => break,
                    }
                }
            })
            .await;
        });
    }
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
