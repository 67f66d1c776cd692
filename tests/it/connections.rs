//! Connections end: a body that trickles in for too long, a connection that sends nothing
//! or part of an HTTP/2 preface, a cap on open connections, and many silent connections
//! that leave the server answering.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::binary;
use crate::support::forms::{Form, content_type};
use crate::support::raw::{
    assert_timed_out, assert_upload_broke_off, closes, connect, healthy, read_response, stall_after,
};
use crate::support::*;

/// A gateway on SQLite with the test configuration and these lines added to `[server]`, and
/// the stand-in it routes to (which answers with an image).
async fn start_with(lines: &str) -> (StandIn, TestGateway) {
    let provider = StandIn::json(200, &image_response(1, USAGE)).await;
    let config = test_config(&provider.base_url(), "").replacen(
        "[server]\n",
        &format!("[server]\n{lines}\n"),
        1,
    );
    let gw = TestGateway::start(Db::Sqlite, &config).await;
    (provider, gw)
}

#[tokio::test]
async fn a_body_that_keeps_trickling_past_the_total_deadline_gets_408() {
    let (provider, gw) =
        start_with("request_body_idle_timeout = \"400ms\"\nrequest_body_timeout = \"1500ms\"")
            .await;
    // Model first: the provider call has begun while the client trickles the image.
    let edit = Form::new()
        .text("model", b"gpt-image-1")
        .text("prompt", b"p")
        .large_image()
        .body();
    let json = br#"{"model":"gpt-image-1","prompt":"a fox in the snow, slowly"}"#.to_vec();
    for (what, path, ct, body, at_once) in [
        ("edit", "/v1/images/edits", content_type(), edit, 50_000),
        (
            "generation",
            "/v1/images/generations",
            "application/json".to_owned(),
            json,
            20,
        ),
    ] {
        let mut socket = stall_after(&gw, path, &ct, &body, at_once).await;
        let started = Instant::now();
        let (mut reader, mut writer) = socket.split();
        // A byte every 100 ms: never idle for 400 ms, never done within the test.
        let trickle = async {
            for byte in body[at_once..].chunks(1) {
                if writer.write_all(byte).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::future::pending::<()>().await;
        };
        let response = tokio::select! {
            response = read_response(&mut reader, Duration::from_secs(10)) => response,
            () = trickle => unreachable!("the trickle never ends"),
        };
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1500), "{what}: {took:?}");
        assert!(took < Duration::from_secs(5), "{what}: {took:?}");
        let error = assert_timed_out(&gw, &response, &mut reader, what).await;
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("took too long"),
            "{what}: {error}"
        );
    }
    // The provider call the edit had begun was ended: the stand-in saw its upload break off.
    assert_upload_broke_off(&provider).await;
    healthy(&gw).await;
    gw.shutdown().await;
}

/// Whether the server closes the connection between `after` and `within` from now.
async fn closes_between(socket: &mut TcpStream, after: Duration, within: Duration) -> Duration {
    let started = Instant::now();
    assert!(
        closes(socket, within).await,
        "the connection is closed within {within:?}"
    );
    let took = started.elapsed();
    assert!(took >= after, "closed after {took:?}, before {after:?}");
    took
}

#[tokio::test]
async fn a_connection_that_sends_nothing_or_part_of_a_preface_is_closed() {
    let (_provider, gw) = start_with("header_read_timeout = \"1s\"").await;
    let early = Duration::from_millis(900);
    let within = Duration::from_secs(4);
    // Nothing at all.
    let mut silent = connect(gw.addr).await;
    // Part of an HTTP/1 request head (hyper's own timer).
    let mut partial_h1 = connect(gw.addr).await;
    partial_h1
        .write_all(b"GET /healthz HTTP/1.1\r\nhost")
        .await
        .expect("write");
    // Part of the HTTP/2 preface: the protocol is not known yet.
    let mut partial_preface = connect(gw.addr).await;
    partial_preface
        .write_all(&H2_PREFACE[..16])
        .await
        .expect("write");
    // The whole preface and settings, then no stream.
    let mut no_stream = connect(gw.addr).await;
    no_stream.write_all(H2_PREFACE).await.expect("write");
    no_stream
        .write_all(&frame(4, 0, 0, &[]))
        .await
        .expect("write");
    let opened = Instant::now();
    for (what, socket) in [
        ("silent", &mut silent),
        ("partial HTTP/1 head", &mut partial_h1),
        ("partial HTTP/2 preface", &mut partial_preface),
        ("HTTP/2 without a stream", &mut no_stream),
    ] {
        assert!(
            closes(socket, within).await,
            "{what}: closed within {within:?}"
        );
        // All four were opened together, a second before they were closed.
        let took = opened.elapsed();
        assert!(took >= early, "{what}: closed after {took:?}");
    }
    // A connection that asks in time is served, and the server is up.
    let mut prompt = connect(gw.addr).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    prompt
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let response = read_response(&mut prompt, Duration::from_secs(2)).await;
    assert_eq!(response.status, 200, "{}", response.head);
    // Idle after its request: closed a second later too.
    closes_between(&mut prompt, early, within).await;
    let mut late = connect(gw.addr).await;
    closes_between(&mut late, early, within).await;
    healthy(&gw).await;
    gw.shutdown().await;
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The next HTTP/2 frame off `socket` (type, flags, stream, payload); `None` at its end.
async fn next_frame(socket: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    socket.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    socket.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const HEADERS: u8 = 1;
const END_STREAM: u8 = 1;
const ACK: u8 = 1;

#[tokio::test]
async fn http2_connections_are_pinged_and_closed_when_idle() {
    let (_provider, gw) =
        start_with("header_read_timeout = \"1500ms\"\nhttp2_keep_alive_interval = \"300ms\"").await;
    let mut socket = connect(gw.addr).await;
    socket.write_all(H2_PREFACE).await.expect("preface");
    socket
        .write_all(&frame(SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    // GET /healthz: :method GET, :scheme http (static table), :path as a literal.
    let mut block = vec![0x82, 0x86, 0x44, 8];
    block.extend_from_slice(b"/healthz");
    socket
        .write_all(&frame(HEADERS, END_STREAM | 4, 1, &block))
        .await
        .expect("headers");
    let started = Instant::now();
    let (mut status, mut answered, mut pings, mut goaway) = (None, None, 0, None);
    let read = async {
        while let Some((kind, flags, stream, payload)) = next_frame(&mut socket).await {
            match kind {
                SETTINGS if flags & ACK == 0 => socket
                    .write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .await
                    .expect("settings ack"),
                PING if flags & ACK == 0 => {
                    pings += 1;
                    socket
                        .write_all(&frame(PING, ACK, 0, &payload))
                        .await
                        .expect("ping ack");
                }
                GOAWAY => goaway = goaway.or(Some(started.elapsed())),
                _ if stream == 1 => {
                    if kind == HEADERS {
                        // :status 200 is entry 8 of the static table.
                        status = payload.first().copied();
                    }
                    if flags & END_STREAM != 0 {
                        answered = Some(started.elapsed());
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(8), read)
        .await
        .expect("the connection is closed in time");
    assert_eq!(status, Some(0x88), "GET /healthz answered 200");
    let answered = answered.expect("the answer ended");
    assert!(
        pings >= 2,
        "the server pinged while the connection was idle"
    );
    let goaway = goaway.expect("the server said goodbye");
    assert!(
        goaway >= answered + Duration::from_millis(1400),
        "GOAWAY after the idle time: {goaway:?}"
    );
    assert!(goaway < answered + Duration::from_secs(4), "{goaway:?}");
    healthy(&gw).await;
    gw.shutdown().await;
}

/// Sends GET /healthz on `socket` and reads its answer.
async fn get_health(socket: &mut TcpStream, within: Duration) -> u16 {
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    read_response(socket, within).await.status
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    // Four workers share the cap of four, however the kernel spreads the connections.
    let (_provider, gw) = start_with("max_connections = 4\nworkers = 4").await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut socket = connect(gw.addr).await;
        assert_eq!(get_health(&mut socket, Duration::from_secs(2)).await, 200);
        open.push(socket);
    }
    // The fifth is taken into the kernel's backlog, and waits there.
    let mut fifth = connect(gw.addr).await;
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(800), fifth.read(&mut byte)).await;
    assert!(early.is_err(), "the fifth connection is not served yet");
    // One of the four ends: the fifth is served.
    drop(open.pop());
    let response = read_response(&mut fifth, Duration::from_secs(2)).await;
    assert_eq!(response.status, 200, "{}", response.head);
    // The others were kept all along.
    for socket in &mut open {
        assert_eq!(get_health(socket, Duration::from_secs(2)).await, 200);
    }
    drop(open);
    drop(fifth);
    healthy(&gw).await;
    gw.shutdown().await;
}

/// Silent connections opened against the binary in the test below.
const SILENT: usize = 2_000;

#[tokio::test]
async fn two_thousand_silent_connections_leave_health_checks_answering() {
    // Both ends of every connection are in this process's files, the server's in the
    // binary's: this process needs room for the silent ones and some to spare.
    let (_, limit) = imagegate::server::raise_open_files_limit().expect("getrlimit");
    if limit.is_some_and(|limit| limit < (SILENT + 1_000) as u64) {
        eprintln!(
            "SKIPPED two_thousand_silent_connections_leave_health_checks_answering: the hard limit on open files ({limit:?}) is below {}",
            SILENT + 1_000
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = binary::write_config(dir.path(), &["gpt-image-1"]);
    let toml = std::fs::read_to_string(&config).expect("read config");
    let toml = toml.replacen("[server]\n", "[server]\nheader_read_timeout = \"3s\"\n", 1);
    std::fs::write(&config, toml).expect("write config");
    // Started as a service manager would leave it: a soft limit of 1024 open files (the
    // usual default), below the silent connections; the hard limit is this process's.
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -Sn 1024 && exec \"$@\"")
        .arg("sh")
        .arg(binary::BIN)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("CLI_TEST_PROVIDER_KEY", binary::SECRET)
        .env("RUST_LOG", "info")
        .env_remove("IMAGEGATE_CONFIG");
    let binary::Serving {
        mut child,
        addr,
        startup_log: log,
        ..
    } = binary::serve(command).await;
    let plain = strip_colours(&log);
    assert!(
        plain.contains("open files limit") && plain.contains("before=1024"),
        "the binary raised its limit: {plain}"
    );
    assert!(!plain.contains("after=1024"), "{plain}");
    let addr: std::net::SocketAddr = addr.parse().expect("address");
    let mut silent = Vec::with_capacity(SILENT);
    let opened = Instant::now();
    for _ in 0..SILENT {
        silent.push(connect(addr).await);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    for _ in 0..5 {
        let started = Instant::now();
        let response = client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .expect("/healthz answers while the silent connections are open");
        assert_eq!(response.status(), 200);
        // A correctness bound; the figure itself is measured by bench/connections.sh.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "/healthz took {took:?}");
    }
    // The silent connections were all accepted (none is still waiting in a backlog) and
    // are all closed after header_read_timeout.
    assert!(opened.elapsed() < Duration::from_secs(3), "opened in time");
    let closed = futures_util::future::join_all(
        silent
            .iter_mut()
            .map(|socket| closes(socket, Duration::from_secs(8))),
    )
    .await;
    let open = closed.iter().filter(|closed| !**closed).count();
    assert_eq!(open, 0, "silent connections still open");
    // A new connection: the client's kept-alive one was idle for longer than the timeout.
    let response = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .expect("/healthz");
    assert_eq!(response.status(), 200);
    child.kill().await.expect("stop imagegate");
}

/// `text` without its terminal colour codes.
fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}
