//! The HTTP server: one thread per worker, each with its own single-threaded runtime and
//! its own listening socket on the same port (`SO_REUSEPORT`), so that a request, its
//! provider call and the connections of both are handled by one thread without cross-thread
//! wake-ups (nginx's model); hyper's connection builder with bounded buffers; a graceful
//! drain. (axum::serve does not let the read buffer be set.)

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

/// The most a connection reads ahead of its handler. hyper's default (~400 KiB) would let
/// each upload in flight hold that much between the client's socket and the provider's.
const READ_BUFFER: usize = 64 * 1024;
/// Slow or idle clients cannot hold a connection open forever before sending headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Pending connections the kernel queues per listening socket.
const BACKLOG: i32 = 1024;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The serving thread this code runs on, from 0 (also 0 outside them). Provider clients are
/// kept per worker, so that a provider connection is used by the thread that opened it.
pub fn worker_index() -> usize {
    WORKER.with(Cell::get)
}

/// One listening socket per worker, all on the same address.
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    local: SocketAddr,
}

impl Listeners {
    /// Binds `workers` sockets (at least one) to `addr` with `SO_REUSEPORT`. Port 0 picks
    /// a free port for all of them.
    pub fn bind(addr: SocketAddr, workers: usize) -> io::Result<Listeners> {
        if addr.port() != 0 {
            // With SO_REUSEPORT a second process of the same user could share the port and
            // silently take half the connections: a port already in use is refused first.
            drop(socket(addr, false)?);
        }
        let first = socket(addr, true)?;
        let local = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..workers.max(1) {
            sockets.push(socket(local, true)?);
        }
        Ok(Listeners { sockets, local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

fn socket(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's own bind does: a restart need not wait for old connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if reuse_port {
        socket.listen(BACKLOG)?;
    }
    Ok(socket.into())
}

/// Serves `app` on one thread per listener until `shutdown` resolves (or a worker fails),
/// then drains every worker within `grace`. Each worker keeps running the `tasks` it
/// started (provider calls whose client left, usage of answers still being read) until
/// all tracked work has finished or `grace` has passed once more.
pub async fn serve_workers(
    listeners: Listeners,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    tasks: TaskTracker,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let abandon = CancellationToken::new();
    // Dropped (the caller gave up on this future): the workers stop too, at once.
    let _stop_workers = (stop.clone().drop_guard(), abandon.clone().drop_guard());
    let (served_tx, mut served) = mpsc::unbounded_channel::<io::Result<()>>();
    let mut threads = Vec::new();
    for (index, socket) in listeners.sockets.into_iter().enumerate() {
        let (app, stop, abandon, tasks, served_tx) = (
            app.clone(),
            stop.clone(),
            abandon.clone(),
            tasks.clone(),
            served_tx.clone(),
        );
        let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("imagegate-worker-{index}"))
            .spawn(move || {
                WORKER.with(|w| w.set(index));
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = served_tx.send(Err(err));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let result = match TcpListener::from_std(socket) {
                        Ok(listener) => serve(listener, app, stop.cancelled_owned(), grace).await,
                        Err(err) => Err(err),
                    };
                    let _ = served_tx.send(result);
                    // The tasks this thread started run only while it drives them.
                    tokio::select! {
                        () = tasks.wait() => {}
                        () = abandon.cancelled() => {}
                    }
                });
                drop(runtime);
                let _ = done_tx.send(());
            })?;
        threads.push(done);
    }
    drop(served_tx);
    let workers = threads.len();
    let mut failure = None;
    let mut stopped = 0;
    tokio::select! {
        () = shutdown => {}
        result = served.recv() => {
            stopped += 1;
            if let Some(Err(err)) = result {
                failure = Some(err);
            }
        }
    }
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections, finishing requests in flight"
    );
    stop.cancel();
    while stopped < workers {
        match served.recv().await {
            Some(result) => {
                stopped += 1;
                if let (Err(err), None) = (result, &failure) {
                    failure = Some(err);
                }
            }
            None => break,
        }
    }
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            tasks = tasks.len(),
            "tracked work still running after the grace"
        );
        abandon.cancel();
    }
    for done in threads {
        let _ = done.await;
    }
    match failure {
        Some(err) => Err(anyhow::anyhow!("a server worker failed: {err}")),
        None => Ok(()),
    }
}

/// One worker: serves `app` until `shutdown` resolves, then stops accepting and gives the
/// connections still open `grace` to finish their requests.
async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(READ_BUFFER)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait a moment, keep serving.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut app = app.clone();
            async move { app.call(request.map(axum::body::Body::new)).await }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        #[expect(
            clippy::disallowed_methods,
            reason = "connections are tracked by GracefulShutdown, which the drain below waits for"
        )]
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed; closing the connections still open");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_gets_a_socket_on_the_same_port() {
        let listeners = Listeners::bind("127.0.0.1:0".parse().expect("addr"), 3).expect("bind");
        assert_eq!(listeners.sockets.len(), 3);
        let port = listeners.local_addr().port();
        assert_ne!(port, 0);
        for socket in &listeners.sockets {
            assert_eq!(socket.local_addr().expect("addr").port(), port);
        }
    }

    #[test]
    fn a_port_in_use_is_refused_although_the_sockets_share_theirs() {
        let first = Listeners::bind("127.0.0.1:0".parse().expect("addr"), 2).expect("bind");
        let err = Listeners::bind(first.local_addr(), 2)
            .err()
            .expect("a second imagegate on the same port is refused");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let err = Listeners::bind(plain.local_addr().expect("addr"), 1)
            .err()
            .expect("a port another program listens on is refused");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
