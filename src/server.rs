//! The HTTP server: one thread per worker, each with its own single-threaded runtime and
//! its own listening socket on the same port (`SO_REUSEPORT`), so that a request, its
//! provider call and the connections of both are handled by one thread without cross-thread
//! wake-ups (nginx's model); hyper's connection builder with bounded buffers; a cap on open
//! connections shared by all workers; a watchdog that ends connections that wait too long
//! for a request; a graceful drain. (axum::serve does not let the read buffer be set.)

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use pin_project_lite::pin_project;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tower::Service;

use crate::config::ServerConfig;
use crate::held::Held;

/// The most a connection reads ahead of its handler. hyper's default (~400 KiB) would let
/// each upload in flight hold that much between the client's socket and the provider's.
const READ_BUFFER: usize = 64 * 1024;
/// How long an HTTP/2 peer has to answer a keep-alive ping (hyper's default).
const KEEP_ALIVE_ACK_TIMEOUT: Duration = Duration::from_secs(20);

/// Pending connections the kernel queues per listening socket.
const BACKLOG: i32 = 1024;

/// What the server allows a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a connection may wait for a request's headers, or sit with no request in
    /// flight, before it is closed.
    pub header_read_timeout: Duration,
    pub http2_keep_alive_interval: Duration,
    /// Connections open at once over all workers.
    pub max_connections: usize,
}

impl ConnectionLimits {
    pub fn from_config(server: &ServerConfig) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: server.header_read_timeout,
            http2_keep_alive_interval: server.http2_keep_alive_interval,
            max_connections: server.max_connections.get(),
        }
    }
}

/// Raises this process's limit on open files (`RLIMIT_NOFILE`) from its soft value to its
/// hard one: each connection is a file, and the usual soft limit (1024) would make accept
/// fail long before `server.max_connections`. Returns the soft limit before and after
/// (`None`: unlimited).
pub fn raise_open_files_limit() -> io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    // An unlimited hard limit cannot be the soft one (Linux caps it at fs.nr_open): left as is.
    let Some(hard) = limit.maximum else {
        return Ok((before, before));
    };
    if before.is_some_and(|soft| soft >= hard) {
        return Ok((before, before));
    }
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )?;
    Ok((before, Some(hard)))
}

/// Connections open at once on the metrics listener: scrapers, a few at most. A cap of its
/// own, so that a scrape still gets in while the client connections are at theirs.
const METRICS_CONNECTIONS: usize = 16;

/// One listening socket per worker, all on the same address; and the metrics listener
/// (`server.metrics_listen`), when there is one.
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    local: SocketAddr,
    metrics: Option<(std::net::TcpListener, SocketAddr)>,
}

impl Listeners {
    /// Binds `workers` sockets (at least one) to `addr` with `SO_REUSEPORT`. Port 0 picks
    /// a free port for all of them.
    pub fn bind(addr: SocketAddr, workers: usize) -> io::Result<Listeners> {
        if addr.port() != 0 {
            // With SO_REUSEPORT a second process of the same user could share the port and
            // silently take half the connections: a port already in use is refused first.
            drop(socket(addr, false, false)?);
        }
        let first = socket(addr, true, true)?;
        let local = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..workers.max(1) {
            sockets.push(socket(local, true, true)?);
        }
        Ok(Listeners {
            sockets,
            local,
            metrics: None,
        })
    }

    /// Adds the metrics listener on `addr` (`server.metrics_listen`; none: no listener of
    /// its own). One socket, without `SO_REUSEPORT`: nobody else may take half the scrapes.
    pub fn with_metrics(mut self, addr: Option<SocketAddr>) -> io::Result<Listeners> {
        if let Some(addr) = addr {
            let socket = socket(addr, false, true)?;
            let local = socket.local_addr()?;
            self.metrics = Some((socket, local));
        }
        Ok(self)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Where `/metrics` is served, when it has a listener of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, local)| *local)
    }
}

fn socket(addr: SocketAddr, reuse_port: bool, listen: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's own bind does: a restart need not wait for old connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if listen {
        socket.listen(BACKLOG)?;
    }
    Ok(socket.into())
}

/// Serves `app` on one thread per listener until `shutdown` resolves (or a worker fails),
/// then drains every worker within `grace`. Each worker keeps running the `tasks` it
/// started (provider calls whose client left, usage of answers still being read) until
/// all tracked work has finished or `grace` has passed once more. The metrics listener,
/// when there is one, serves `metrics` on a thread of its own, started, stopped and
/// drained with the others (a failure of its own stops the server like any worker's).
pub async fn serve_workers(
    listeners: Listeners,
    app: Router,
    metrics: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: ConnectionLimits,
    tasks: TaskTracker,
) -> anyhow::Result<()> {
    let (served_tx, mut served) = mpsc::unbounded_channel::<io::Result<()>>();
    let worker = WorkerContext {
        app,
        grace,
        limits,
        // One count for all workers: the cap holds however the kernel spreads connections.
        permits: Arc::new(Semaphore::new(
            limits.max_connections.min(Semaphore::MAX_PERMITS),
        )),
        tasks: tasks.clone(),
        stop: CancellationToken::new(),
        abandon: CancellationToken::new(),
        served: served_tx,
    };
    // Dropped (the caller gave up on this future): the workers stop too, at once.
    let _stop_workers = (
        worker.stop.clone().drop_guard(),
        worker.abandon.clone().drop_guard(),
    );
    let mut threads = Vec::new();
    let workers = listeners.sockets.len();
    for (index, socket) in listeners.sockets.into_iter().enumerate() {
        let name = format!("imagegate-worker-{index}");
        threads.push(spawn_worker(index, name, socket, worker.clone())?);
    }
    if let Some((socket, _)) = listeners.metrics {
        let scrapes = WorkerContext {
            app: metrics,
            permits: Arc::new(Semaphore::new(METRICS_CONNECTIONS)),
            ..worker.clone()
        };
        threads.push(spawn_worker(
            workers,
            "imagegate-metrics".into(),
            socket,
            scrapes,
        )?);
    }
    let WorkerContext {
        stop,
        abandon,
        served: served_tx,
        ..
    } = worker;
    drop(served_tx);
    let failure = stop_workers(shutdown, &mut served, threads.len(), &stop, grace).await;
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

/// What each worker thread is handed: a clone per worker, all sharing the same cap, tasks
/// and signals.
#[derive(Clone)]
struct WorkerContext {
    app: Router,
    grace: Duration,
    limits: ConnectionLimits,
    /// The connection cap shared by all workers.
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    /// Cancelled: stop accepting and drain the connections.
    stop: CancellationToken,
    /// Cancelled: stop waiting for the tracked tasks still running.
    abandon: CancellationToken,
    /// Where a worker reports how its serving ended.
    served: mpsc::UnboundedSender<io::Result<()>>,
}

/// Starts worker `index` on its own thread (called `name`) with its own single-threaded
/// runtime; the returned receiver resolves once that thread has dropped its runtime.
fn spawn_worker(
    index: usize,
    name: String,
    socket: std::net::TcpListener,
    worker: WorkerContext,
) -> io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name(name).spawn(move || {
        crate::worker::set_index(index);
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => {
                let _ = worker.served.send(Err(err));
                return;
            }
        };
        runtime.block_on(run_worker(socket, worker));
        drop(runtime);
        let _ = done_tx.send(());
    })?;
    Ok(done)
}

/// One worker thread's work: serves its socket until told to stop, reports how that
/// ended, then keeps driving the tracked tasks it started.
async fn run_worker(socket: std::net::TcpListener, worker: WorkerContext) {
    #[expect(
        deprecated,
        reason = "the safe constructor is deprecated for types that may close or swap their descriptor while registered (tokio#8587); std's listener owns its descriptor and keeps it until the AsyncFd drops it, and `unsafe` is forbidden here"
    )]
    let registered = AsyncFd::new(socket);
    let result = match registered {
        Ok(listener) => {
            let shutdown = worker.stop.cancelled_owned();
            serve(
                listener,
                worker.app,
                shutdown,
                worker.grace,
                worker.limits,
                worker.permits,
            )
            .await
        }
        Err(err) => Err(err),
    };
    let _ = worker.served.send(result);
    // The tasks this thread started run only while it drives them.
    tokio::select! {
        () = worker.tasks.wait() => {}
        () = worker.abandon.cancelled() => {}
    }
}

/// Waits for `shutdown` or for a worker to stop on its own, whichever comes first, then
/// tells every worker to stop and waits until all `workers` have reported. Returns the
/// first failure reported.
async fn stop_workers(
    shutdown: impl Future<Output = ()>,
    served: &mut mpsc::UnboundedReceiver<io::Result<()>>,
    workers: usize,
    stop: &CancellationToken,
    grace: Duration,
) -> Option<io::Error> {
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
    failure
}

/// One worker: serves `app` until `shutdown` resolves, then stops accepting and gives the
/// connections still open `grace` to finish their requests.
async fn serve(
    listener: AsyncFd<std::net::TcpListener>,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: ConnectionLimits,
    permits: Arc<Semaphore>,
) -> std::io::Result<()> {
    let builders = Arc::new(Builders::new(limits));
    let drain = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer, permit) = tokio::select! {
            accepted = accept(&listener, &permits) => match accepted {
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
        let accepted = Accepted {
            stream,
            peer,
            permit,
        };
        serve_connection(&builders, accepted, &app, limits, &drain, &connections);
    }
    drop(listener);
    drain.cancel();
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed; closing the connections still open");
    }
    Ok(())
}

/// HTTP/2's connection preface: what a client speaking HTTP/2 without TLS sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's connection builders: one for a connection whose first bytes already showed
/// HTTP/1, one that tells the protocol itself.
///
/// Why two: the second reads the first 24 bytes itself (to tell HTTP/1 from HTTP/2) and
/// hands them back to hyper as a first read of 24 bytes, after which hyper's read buffer
/// (8 KiB) has to grow to hold the rest of the request head and doubles to 16 KiB. Every
/// HTTP/1 connection kept 8 KiB more than it needs for as long as it was open (a call the
/// provider holds for a minute costs its client connection's buffers all that time). A peek
/// at the socket (which consumes nothing) tells HTTP/1 first, and hyper then reads the head
/// whole. Connections are served without HTTP/1 upgrades, which imagegate has no route for:
/// hyper-util's upgradeable connection tells the protocol itself whatever it is told.
struct Builders {
    http1: Builder<TokioExecutor>,
    any: Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: ConnectionLimits) -> Builders {
        let any = connection_builder(limits);
        Builders {
            http1: any.clone().http1_only(),
            any,
        }
    }
}

/// Whether the connection's first bytes are HTTP/1's, read without consuming them: false
/// when they are (or may yet be) HTTP/2's preface, or the connection ended or failed first,
/// all of which the builder that tells the protocol itself handles as before.
async fn speaks_http1(stream: &TcpStream) -> bool {
    let mut first = [0u8; H2_PREFACE.len()];
    match stream.peek(&mut first).await {
        Ok(n) if n > 0 => first[..n] != H2_PREFACE[..n],
        _ => false,
    }
}

/// hyper's connection builder with the server's buffers and timers.
fn connection_builder(limits: ConnectionLimits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(READ_BUFFER)
        .timer(TokioTimer::new())
        // hyper's own timer for a request head once the protocol is known, and between
        // requests on a kept-alive connection; the watchdog covers the rest.
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(KEEP_ALIVE_ACK_TIMEOUT);
    builder
}

/// A connection taken off a listening socket.
struct Accepted {
    stream: TcpStream,
    /// The client's address (the TCP peer: a proxy's, behind one).
    peer: SocketAddr,
    /// Its place under the connection cap, held until it ends.
    permit: OwnedSemaphorePermit,
}

/// Serves `app` on one accepted connection, under the watchdog, as a task on
/// `connections`; the connection holds its permit until it ends. Each request carries the
/// peer's address as axum's `ConnectInfo<SocketAddr>`.
fn serve_connection(
    builders: &Arc<Builders>,
    Accepted {
        stream,
        peer,
        permit,
    }: Accepted,
    app: &Router,
    limits: ConnectionLimits,
    drain: &CancellationToken,
    connections: &TaskTracker,
) {
    let _ = stream.set_nodelay(true);
    let accepted_at = Instant::now();
    let activity = Arc::new(Activity::new());
    let app = app.clone();
    let requests = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let in_flight = InFlight::new(&requests);
        let mut app = app.clone();
        request.extensions_mut().insert(ConnectInfo(peer));
        async move {
            let response = app.call(request.map(axum::body::Body::new)).await?;
            Ok::<_, std::convert::Infallible>(response.map(|inner| Held::new(inner, in_flight)))
        }
    });
    let builders = Arc::clone(builders);
    let drain = drain.clone();
    connections.spawn(async move {
        // Held while the connection lives: it counts against max_connections.
        let _permit = permit;
        // The first bytes, within the time the whole head has (the watchdog's deadline
        // below counts from the same instant), unless the server starts draining first.
        let deadline = accepted_at + limits.header_read_timeout;
        let http1 = tokio::select! {
            http1 = tokio::time::timeout_at(deadline, speaks_http1(&stream)) => match http1 {
                Ok(http1) => http1,
                Err(_) => {
                    tracing::debug!("connection sent no request in time; closed");
                    return;
                }
            },
            () = drain.cancelled() => return,
        };
        let builder = if http1 {
            &builders.http1
        } else {
            &builders.any
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = Watched {
            timer: tokio::time::sleep_until(deadline),
            connection,
            graceful_shutdown: |connection| connection.graceful_shutdown(),
            drain: drain.cancelled_owned(),
            activity,
            idle: limits.header_read_timeout,
            state: WatchState::Open,
        };
        if let Err(err) = connection.await {
            tracing::debug!(%err, "connection ended with an error");
        }
    });
}

/// Takes the next connection off the listening socket once one is waiting there and the
/// cap allows one more. While the cap is reached, new connections wait in the kernel's
/// backlog (they cost no file descriptor), and a worker holds no permit while its own
/// backlog is empty, so permits go only to connections that are there to take.
async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
    permits: &Arc<Semaphore>,
) -> io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let mut ready = listener.readable().await?;
        let Ok(permit) = Arc::clone(permits).acquire_owned().await else {
            return Err(io::Error::other("the connection cap was closed"));
        };
        match ready.try_io(|listener| listener.get_ref().accept()) {
            Ok(Ok((stream, peer))) => {
                stream.set_nonblocking(true)?;
                return Ok((TcpStream::from_std(stream)?, peer, permit));
            }
            Ok(Err(err)) => return Err(err),
            // The connection went away while it waited (or another poll took it).
            Err(_would_block) => continue,
        }
    }
}

/// What a connection's watchdog knows of its requests.
struct Activity {
    started: Instant,
    /// Requests in flight: from the service's call until its response body is dropped
    /// (sent, or abandoned).
    open: AtomicUsize,
    /// When the last request ended, in milliseconds after `started`.
    idle_since_ms: AtomicU64,
    /// A request has arrived: the connection spoke HTTP.
    served: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
        }
    }
}

/// One request in flight on its connection.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> InFlight {
        activity.served.store(true, Ordering::Relaxed);
        activity.open.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let ms = u64::try_from(activity.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.idle_since_ms.store(ms, Ordering::Release);
        activity.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchState {
    Open,
    /// Idle for too long after serving requests: closing gracefully (HTTP/2 sends GOAWAY),
    /// and dropped if that takes another `idle`.
    Closing,
    /// The server is shutting down: the drain's grace applies.
    Draining,
}

pin_project! {
    /// A connection with a watchdog. hyper ends neither a connection that sends nothing
    /// or part of the HTTP/2 preface (hyper-util reads the first 24 bytes to tell HTTP/1
    /// from HTTP/2 without a timer) nor an HTTP/2 connection that opens no stream, so:
    /// a connection with no request in flight for `idle` is closed: dropped when it never
    /// sent a request, shut down gracefully when it did.
    struct Watched<C> {
        #[pin]
        connection: C,
        graceful_shutdown: fn(Pin<&mut C>),
        #[pin]
        timer: Sleep,
        #[pin]
        drain: WaitForCancellationFutureOwned,
        activity: Arc<Activity>,
        idle: Duration,
        state: WatchState,
    }
}

impl<C, E> Future for Watched<C>
where
    C: Future<Output = Result<(), E>>,
{
    type Output = Result<(), E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if *this.state != WatchState::Draining && this.drain.as_mut().poll(cx).is_ready() {
            // Once is enough: a connection already closing goes on with it.
            if *this.state == WatchState::Open {
                (this.graceful_shutdown)(this.connection.as_mut());
            }
            *this.state = WatchState::Draining;
        }
        if let Poll::Ready(ended) = this.connection.as_mut().poll(cx) {
            return Poll::Ready(ended);
        }
        loop {
            match *this.state {
                WatchState::Draining => return Poll::Pending,
                WatchState::Closing => {
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    tracing::debug!("connection did not close after its idle shutdown");
                    return Poll::Ready(Ok(()));
                }
                WatchState::Open => {
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let activity = &**this.activity;
                    let now = Instant::now();
                    if activity.open.load(Ordering::Acquire) > 0 {
                        this.timer.as_mut().reset(now + *this.idle);
                        continue;
                    }
                    let idle_since = activity.started
                        + Duration::from_millis(activity.idle_since_ms.load(Ordering::Acquire));
                    let until = idle_since + *this.idle;
                    if now < until {
                        this.timer.as_mut().reset(until);
                        continue;
                    }
                    if !activity.served.load(Ordering::Relaxed) {
                        tracing::debug!("connection sent no request in time; closed");
                        return Poll::Ready(Ok(()));
                    }
                    (this.graceful_shutdown)(this.connection.as_mut());
                    *this.state = WatchState::Closing;
                    this.timer.as_mut().reset(now + *this.idle);
                    // The connection must be polled again to act on the shutdown.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        }
    }
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
