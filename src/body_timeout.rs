//! A request body that fails when its client stops sending or takes too long in all, and
//! whose unread rest is read and discarded after its handler is done with it.
//!
//! An upload that stalls for longer than `server.request_body_idle_timeout`, or that is
//! still arriving `server.request_body_timeout` after its request began (a client that
//! trickles a byte at a time is never idle), ends its request with 408, which drops the
//! spool file and any provider call already started, and lets hyper close the connection
//! (the body was not read to its end).
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

/// The client did not send the request body in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyTimeout {
    #[error("the client sent no part of the request body for {}s", .0.as_secs_f64())]
    Idle(Duration),
    #[error("the client took longer than {}s to send the request body", .0.as_secs_f64())]
    Total(Duration),
}

/// How long a body may wait for its client: between two reads, and in all.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeouts {
    pub idle: Duration,
    pub total: Duration,
}

pin_project! {
    /// For the idle time, only time spent waiting for the client counts: while the reader
    /// is busy elsewhere (a provider slow to take the upload), that clock does not run.
    /// The total time is the wall clock since the body was wrapped (its request's headers
    /// had arrived).
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        // One timer for both limits: whichever comes first.
        #[pin]
        sleep: Sleep,
        idle: Duration,
        total: Duration,
        deadline: Instant,
        waiting: bool,
        expired: bool,
    }
}

/// How much of a body its handler left unread is still read and discarded, and for how long.
pub const LINGER_BYTES: usize = 4 * 1024 * 1024;
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// Wraps a request body so that it fails with [`BodyTimeout`] after `idle` without data or
/// `total` after now, and its rest is discarded if it is dropped unread.
pub fn with_timeouts(body: Body, limits: BodyTimeouts) -> Body {
    let deadline = Instant::now() + limits.total;
    Body::new(Linger {
        inner: Some(Body::new(IdleTimeout {
            inner: body,
            sleep: tokio::time::sleep_until(deadline),
            idle: limits.idle,
            total: limits.total,
            deadline,
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
            let now = Instant::now();
            // Checked here too: a body whose bytes are always ready never waits.
            if now >= *this.deadline {
                *this.expired = true;
                return Poll::Ready(Some(Err(Box::new(BodyTimeout::Total(*this.total)))));
            }
            *this.waiting = true;
            let idle_until = now + *this.idle;
            this.sleep.as_mut().reset(idle_until.min(*this.deadline));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => {
                    *this.expired = true;
                    let err = if Instant::now() >= *this.deadline {
                        BodyTimeout::Total(*this.total)
                    } else {
                        BodyTimeout::Idle(*this.idle)
                    };
                    Poll::Ready(Some(Err(Box::new(err))))
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

/// Why a body read failed, when it was because the client was too slow (idle, or too long
/// in all). The error arrives wrapped (in axum's error, in an `io::Error`), so the whole
/// chain is searched.
pub fn timeout_in(err: &(dyn StdError + 'static)) -> Option<BodyTimeout> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(timeout) = err.downcast_ref::<BodyTimeout>() {
            return Some(*timeout);
        }
        // `io::Error::source` skips the error it wraps; look at that one too.
        if let Some(timeout) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| timeout_in(inner))
        {
            return Some(timeout);
        }
        next = err.source();
    }
    None
}

/// The body length a request declares (`Content-Length`), when it declares one that
/// parses: what a limit is checked against before the body is read.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    const IDLE: Duration = Duration::from_millis(100);
    const LONG: Duration = Duration::from_secs(60);

    fn idle_only(body: Body) -> Body {
        with_timeouts(
            body,
            BodyTimeouts {
                idle: IDLE,
                total: LONG,
            },
        )
    }

    #[tokio::test]
    async fn a_stalled_body_fails_after_the_idle_time() {
        let stream = futures_util::stream::once(async { Ok::<_, std::io::Error>(&b"abc"[..]) })
            .chain(futures_util::stream::pending());
        let mut body = idle_only(Body::from_stream(stream));
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "abc");
        let started = Instant::now();
        let err = body.frame().await.expect("an error").expect_err("idle");
        assert_eq!(timeout_in(&err), Some(BodyTimeout::Idle(IDLE)), "{err}");
        assert!(started.elapsed() >= IDLE);
        assert!(body.frame().await.is_none(), "ends after the error");
    }

    #[tokio::test]
    async fn time_spent_away_from_the_body_does_not_count() {
        let stream =
            futures_util::stream::iter([Ok::<_, std::io::Error>(&b"a"[..]), Ok(&b"b"[..])]);
        let mut body = idle_only(Body::from_stream(stream));
        body.frame().await.expect("frame").expect("data");
        // The reader is busy for longer than the idle time; the client is not to blame.
        tokio::time::sleep(IDLE * 3).await;
        body.frame().await.expect("frame").expect("data");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_that_never_stalls_still_fails_after_the_total_time() {
        let total = Duration::from_millis(300);
        // A byte every 20 ms: never idle for 100 ms, and data is sometimes ready at once.
        let stream = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((Ok::<_, std::io::Error>(&b"x"[..]), ()))
        });
        let limits = BodyTimeouts { idle: IDLE, total };
        let mut body = with_timeouts(Body::from_stream(stream), limits);
        let started = Instant::now();
        let err = loop {
            match body.frame().await.expect("frames until the deadline") {
                Ok(_) => {}
                Err(err) => break err,
            }
        };
        assert_eq!(timeout_in(&err), Some(BodyTimeout::Total(total)), "{err}");
        assert!(started.elapsed() >= total);
        assert!(started.elapsed() < total * 3);
        assert!(body.frame().await.is_none(), "ends after the error");

        // Data that is always ready is cut off too.
        let endless = futures_util::stream::repeat_with(|| Ok::<_, std::io::Error>(&b"x"[..]));
        let mut body = with_timeouts(
            Body::from_stream(endless),
            BodyTimeouts {
                idle: IDLE,
                total: Duration::from_millis(50),
            },
        );
        let err = loop {
            match body.frame().await.expect("frames until the deadline") {
                Ok(_) => tokio::task::yield_now().await,
                Err(err) => break err,
            }
        };
        assert!(timeout_in(&err).is_some(), "{err}");
    }

    #[test]
    fn finds_the_timeout_error_however_it_is_wrapped() {
        let idle = || BodyTimeout::Idle(IDLE);
        assert_eq!(timeout_in(&axum::Error::new(idle())), Some(idle()));
        assert_eq!(
            timeout_in(&std::io::Error::other(axum::Error::new(idle()))),
            Some(idle())
        );
        let boxed: BoxError = Box::new(std::io::Error::other(axum::Error::new(idle())));
        assert_eq!(timeout_in(&*boxed), Some(idle()));
        assert_eq!(timeout_in(&std::io::Error::other("reset")), None);
    }
}
