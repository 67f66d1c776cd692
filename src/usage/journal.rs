//! The usage journal: every usage row is appended to a file on local disk before it goes
//! anywhere else, so that a crash, a `kill -9` or a database outage loses none.
//!
//! What `server.journal_dir` holds:
//! - `segment-<20 digits>.jsonl`: one JSON object per line, each ending in `\n`: usage rows,
//!   and two kinds of marker. `{"intent":{..}}` is written before a provider call is sent
//!   (see [`Intent`]); the call's row, with the same request id, resolves it, and so does
//!   `{"cancel":"<request id>"}`, written when a call is abandoned before the provider could
//!   answer it. Only the newest segment is appended to; a new one is started at every start
//!   and when the current one passes its size limit.
//! - `cursor`: how far the rows have reached the database (a segment and a byte offset), and
//!   the intents read before it and not yet resolved, replaced atomically. Segments wholly
//!   before it are deleted: an intent outlives its segment in the cursor until resolved.
//! - `lock`: locked while a process uses the folder, so two never share one journal.
//! - `refused.jsonl`: rows the database refused (bad data, not a bad connection), set aside
//!   so that they do not hold up the rows behind them; kept for a person to look at.
//! - `probe`: briefly, while [`Journal::probe`] checks that a failed journal takes writes.
//!
//! At open, every intent without its row (in the segments, or carried in the cursor) is a
//! call the process died during: the provider may have finished and billed it. Each
//! becomes an `interrupted` row at the intent's worst-case cost, appended to the new
//! segment and shipped like any row (the database skips it if the call's row got there).
//!
//! An append is one `write()` into the page cache, made before the client sees the end of
//! its response: once it returns, the row survives the process being killed. Getting it onto
//! the disk is [`Journal::sync`]'s job, which the writer calls every few milliseconds.
//!
//! Files are read and written with blocking calls: appends are small and the rest runs on
//! the blocking pool.
//!
//! The shipper reads the journal back from the cursor on, but what this process appended
//! since it last read is also kept in memory as it was written ([`Recent`], bounded): where
//! the cursor meets such a line, the shipper takes it from there rather than reading the
//! file and parsing it again (that was a tenth of a request's cost). The file stays the
//! record: what is not kept in memory (after a restart, or past the bound) is read from it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::line;
use crate::private_fs;
use crate::usage::{Intent, UsageRow};

/// Past this size the next row starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".jsonl";
const CURSOR: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";
const LOCK: &str = "lock";
const REFUSED: &str = "refused.jsonl";
/// Written and removed by [`Journal::probe`].
const PROBE: &str = "probe";
/// What [`Journal::probe`] writes: a few rows' worth.
const PROBE_BYTES: usize = 16 * 1024;
/// How a marker line begins; rows begin otherwise (`{"request_id":`).
const INTENT_PREFIX: &[u8] = b"{\"intent\":";
const CANCEL_PREFIX: &[u8] = b"{\"cancel\":";
/// Lines [`Recent`] keeps at most: a few batches' worth. Past it (the database is slow or
/// down), lines are read back from the file.
const RECENT_LINES: usize = 2048;
/// How long [`Journal::open`] waits for the folder's lock: this many tries, this far apart.
const LOCK_TRIES: u32 = 40;
const LOCK_RETRY: Duration = Duration::from_millis(50);

/// Rows appended and not yet written to the database, summed over the journals open in this
/// process. The metrics recorder is process-wide, so the gauge is too; a server has one
/// journal, tests run several.
static PROCESS_BACKLOG: AtomicI64 = AtomicI64::new(0);

fn add_to_gauge(delta: i64) {
    let total = PROCESS_BACKLOG.fetch_add(delta, Ordering::Relaxed) + delta;
    metrics::gauge!("imagegate_usage_journal_backlog_rows").set(total as f64);
}

/// A place in the journal: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// Rows read from the cursor on, for the database; [`Journal::commit`] moves the cursor past
/// them once they are stored.
#[derive(Debug)]
pub struct Batch {
    pub rows: Vec<UsageRow>,
    /// Intents read: not rows, never stored; kept (in the cursor) until resolved.
    pub intents: Vec<Intent>,
    /// Request ids of the calls abandoned before the provider could answer.
    pub cancels: Vec<String>,
    /// Complete lines read, unreadable ones and markers included.
    pub lines: u64,
    /// Of those, markers (intents and cancels): not counted in the backlog.
    pub markers: u64,
    pub start: Position,
    pub end: Position,
}

/// A row [`Journal::append`] could not write, and why.
#[derive(Debug)]
pub struct Unwritten {
    pub error: io::Error,
    /// Boxed: it is the rare case, and the result stays small for the usual one.
    pub row: Box<UsageRow>,
}

/// One journal line.
enum Line {
    Row(Box<UsageRow>),
    Intent(Box<Intent>),
    Cancel(String),
}

/// How an intent's line reads (written by [`line::intent`]).
#[derive(Deserialize)]
struct IntentLine<T> {
    intent: T,
}

#[derive(Serialize, Deserialize)]
struct CancelLine<T> {
    cancel: T,
}

/// Lines appended by this process and not yet read by the shipper, each with where it was
/// written and its length in bytes, in the order they were written.
#[derive(Default)]
struct Recent {
    lines: VecDeque<(Position, u64, Line)>,
}

impl Recent {
    /// Moves into `batch` the lines kept from `at` on, as [`read_segment_lines`] would have
    /// read them from the file, up to `max_lines`; forgets those `at` has passed.
    fn take(&mut self, at: &mut Position, max_lines: usize, batch: &mut Batch) {
        while let Some((position, _, _)) = self.lines.front() {
            if *position < *at {
                self.lines.pop_front();
                continue;
            }
            if *position != *at || batch.lines >= max_lines as u64 {
                return;
            }
            let Some((_, len, line)) = self.lines.pop_front() else {
                return;
            };
            at.offset += len;
            batch.lines += 1;
            match line {
                Line::Row(row) => batch.rows.push(*row),
                Line::Intent(intent) => {
                    batch.markers += 1;
                    batch.intents.push(*intent);
                }
                Line::Cancel(id) => {
                    batch.markers += 1;
                    batch.cancels.push(id);
                }
            }
        }
    }
}

/// The request id of a row, read without the rest of it.
#[derive(Deserialize)]
struct RowId {
    request_id: String,
}

fn is_marker(line: &[u8]) -> bool {
    line.starts_with(INTENT_PREFIX) || line.starts_with(CANCEL_PREFIX)
}

fn parse_line(line: &[u8]) -> serde_json::Result<Line> {
    if line.starts_with(INTENT_PREFIX) {
        let parsed: IntentLine<Intent> = serde_json::from_slice(line)?;
        Ok(Line::Intent(Box::new(parsed.intent)))
    } else if line.starts_with(CANCEL_PREFIX) {
        let parsed: CancelLine<String> = serde_json::from_slice(line)?;
        Ok(Line::Cancel(parsed.cancel))
    } else {
        Ok(Line::Row(Box::new(serde_json::from_slice(line)?)))
    }
}

/// What the cursor file holds.
#[derive(Serialize, Deserialize)]
struct SavedCursor {
    #[serde(flatten)]
    at: Position,
    /// Intents before `at` whose rows have not been read yet (absent in older files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending: Vec<Intent>,
}

impl Batch {
    /// True when there was nothing to read: the cursor is at the end of the journal.
    pub fn is_empty(&self) -> bool {
        self.lines == 0 && self.start == self.end
    }
}

/// The segment rows are appended to.
struct Active {
    segment: u64,
    file: Arc<File>,
    /// Bytes of whole lines written; the shipper reads no further than this.
    len: u64,
    /// Written since the last fsync.
    dirty: bool,
    /// A failed write could not be undone; the next row starts a new segment.
    broken: bool,
}

pub struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    active: Mutex<Active>,
    /// The first byte not yet in the database. Only the shipper moves it.
    cursor: Mutex<Position>,
    /// Intents the cursor has passed whose rows it has not, by request id. Only the shipper
    /// changes it, in [`Journal::commit`].
    pending: Mutex<HashMap<String, Intent>>,
    backlog: AtomicU64,
    /// What was appended and not yet read, kept parsed (locked after `active`, never before).
    recent: Mutex<Recent>,
    /// Held (locked) for as long as the journal is open.
    _lock: File,
}

/// Reads the lines of segment `path` from `reader` into `batch`, moving `at` past each,
/// until the batch holds `max_lines` lines, the reader ends, or a torn last line is found
/// (skipped, and logged); a line that is not a row is counted and logged too.
fn read_segment_lines(
    reader: &mut impl BufRead,
    path: &Path,
    at: &mut Position,
    max_lines: usize,
    batch: &mut Batch,
) -> io::Result<()> {
    let mut line = Vec::new();
    while batch.lines < max_lines as u64 {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        at.offset += n as u64;
        if line.last() != Some(&b'\n') {
            tracing::warn!(
                segment = %path.display(),
                bytes = n,
                "skipping a torn last line in the usage journal (a write cut short by a crash)"
            );
            break;
        }
        batch.lines += 1;
        if is_marker(&line) {
            batch.markers += 1;
        }
        match parse_line(&line) {
            Ok(Line::Row(row)) => batch.rows.push(*row),
            Ok(Line::Intent(intent)) => batch.intents.push(*intent),
            Ok(Line::Cancel(id)) => batch.cancels.push(id),
            Err(err) => tracing::error!(
                %err,
                segment = %path.display(),
                line = %String::from_utf8_lossy(&line).trim_end(),
                "skipping a usage journal line that is not a usage row"
            ),
        }
    }
    Ok(())
}

/// The saved cursor's position and the intents it carries; nothing when there is no
/// cursor or it cannot be read.
fn load_cursor(dir: &Path) -> (Option<Position>, Vec<Intent>) {
    match read_cursor(dir) {
        Ok(Some(saved)) => (Some(saved.at), saved.pending),
        Ok(None) => (None, Vec::new()),
        Err(err) => {
            // Harmless for rows: those already stored are skipped when written again.
            // Intents carried in it are lost (those still in segments are not).
            tracing::warn!(%err, dir = %dir.display(), "usage journal cursor unreadable; replaying every segment");
            (None, Vec::new())
        }
    }
}

/// Where a journal opened over `segments` starts: the new segment it appends to (after
/// every segment on disk and the saved cursor's), and where reading resumes.
fn resume_points(segments: &[u64], saved: Option<Position>) -> (u64, Position) {
    let active_segment = segments
        .last()
        .map(|s| s + 1)
        .into_iter()
        .chain(saved.map(|c| c.segment + 1))
        .max()
        .unwrap_or(0);
    let cursor = match saved {
        Some(c) if segments.contains(&c.segment) => c,
        // Its segment is gone (fully shipped) or there was no cursor: the next segment.
        saved => Position {
            segment: segments
                .iter()
                .copied()
                .find(|&s| saved.is_none_or(|c| s > c.segment))
                .unwrap_or(active_segment),
            offset: 0,
        },
    };
    (active_segment, cursor)
}

/// Calls the last run died during: their intent is here (carried in the cursor or read
/// from a segment), their row nowhere. One per request id: of a call journaled again when
/// a later field raised its worst case, the intent with the highest.
fn interrupted_calls<'a>(pending: &'a [Intent], scan: &'a Scan) -> Vec<&'a Intent> {
    let mut interrupted: Vec<&Intent> = pending
        .iter()
        .chain(scan.intents.iter())
        .filter(|i| !scan.resolved.contains(&i.request_id))
        .collect();
    interrupted.sort_by(|a, b| {
        (a.request_id.cmp(&b.request_id)).then(b.worst_case_nanousd.cmp(&a.worst_case_nanousd))
    });
    interrupted.dedup_by(|a, b| a.request_id == b.request_id);
    interrupted
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and starts a new segment. Rows an earlier run
    /// left unshipped are counted in the backlog and read first.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<Journal> {
        private_fs::create_dir_all(dir)?;
        let lock_file = private_fs::open_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))?;
        take_lock(&lock_file, dir)?;

        let segments = list_segments(dir)?;
        let (saved, pending) = load_cursor(dir);
        let (active_segment, cursor) = resume_points(&segments, saved);
        // Left by a crash between saving the cursor and deleting what it had passed.
        for &segment in segments.iter().filter(|&&s| s < cursor.segment) {
            remove_segment(dir, segment);
        }
        let mut scan = Scan::default();
        for &segment in segments.iter().filter(|&&s| s >= cursor.segment) {
            let from = if segment == cursor.segment {
                cursor.offset
            } else {
                0
            };
            scan.read(&segment_path(dir, segment), from)?;
        }
        let backlog = scan.rows;
        let interrupted = interrupted_calls(&pending, &scan);

        let file = create_segment(dir, active_segment)?;
        add_to_gauge(i64::try_from(backlog).unwrap_or(i64::MAX));
        let journal = Journal {
            dir: dir.to_owned(),
            segment_bytes,
            active: Mutex::new(Active {
                segment: active_segment,
                file: Arc::new(file),
                len: 0,
                dirty: false,
                broken: false,
            }),
            cursor: Mutex::new(cursor),
            pending: Mutex::new(
                pending
                    .iter()
                    .map(|i| (i.request_id.clone(), i.clone()))
                    .collect(),
            ),
            backlog: AtomicU64::new(backlog),
            recent: Mutex::default(),
            _lock: lock_file,
        };
        journal.record_interrupted(&interrupted)?;
        Ok(journal)
    }

    /// Appends an interrupted row for each of `interrupted`, and syncs them.
    fn record_interrupted(&self, interrupted: &[&Intent]) -> io::Result<()> {
        if interrupted.is_empty() {
            return Ok(());
        }
        for intent in interrupted {
            self.append(intent.interrupted()).map_err(|u| u.error)?;
        }
        self.sync()?;
        tracing::warn!(
            calls = interrupted.len(),
            "provider calls cut off by the end of the last run: each is recorded as an interrupted row at its worst-case cost"
        );
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rows appended and not yet written to the database.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Where the next batch is read from.
    pub fn cursor(&self) -> Position {
        *lock(&self.cursor)
    }

    /// The segment rows are appended to.
    pub fn active_segment(&self) -> u64 {
        lock(&self.active).segment
    }

    /// Appends one row as one line, with a single `write()`. The row is kept for the
    /// shipper when there is room (see [`Recent`]), so it is taken, not copied; when the
    /// line could not be written it comes back with the error.
    pub fn append(&self, row: UsageRow) -> Result<(), Unwritten> {
        let line = line::row(&row);
        let mut row = Some(row);
        let written = self.write_line(&line, || {
            Line::Row(Box::new(row.take().expect("taken once")))
        });
        written.map_err(|error| Unwritten {
            error,
            row: Box::new(row.expect("not taken: the line was not written")),
        })
    }

    /// Appends an intent: written before the provider call is sent, like a row.
    pub fn append_intent(&self, intent: &Intent) -> io::Result<()> {
        let line = line::intent(intent);
        self.write_line(&line, || Line::Intent(Box::new(intent.clone())))
    }

    /// Resolves an intent whose call was abandoned before the provider could answer it.
    pub fn append_cancel(&self, request_id: &str) -> io::Result<()> {
        let mut line = serde_json::to_vec(&CancelLine { cancel: request_id })?;
        line.push(b'\n');
        self.write_line(&line, || Line::Cancel(request_id.to_owned()))
    }

    /// Intents read and not yet resolved by a row or a cancel.
    pub fn pending_intents(&self) -> usize {
        lock(&self.pending).len()
    }

    /// One line, one `write()`; rows (not markers) count in the backlog. `parsed` makes the
    /// line as the shipper would read it back, called only when [`Recent`] has room for it.
    fn write_line(&self, line: &[u8], parsed: impl FnOnce() -> Line) -> io::Result<()> {
        let mut active = lock(&self.active);
        if active.broken || (active.len > 0 && active.len + line.len() as u64 > self.segment_bytes)
        {
            self.rotate(&mut active)?;
        }
        if let Err(err) = (&*active.file).write_all(line) {
            // Half a line left behind would swallow the next row; cut it off.
            if active.file.set_len(active.len).is_err() {
                active.broken = true;
            }
            return Err(err);
        }
        let at = Position {
            segment: active.segment,
            offset: active.len,
        };
        active.len += line.len() as u64;
        active.dirty = true;
        {
            let mut recent = lock(&self.recent);
            if recent.lines.len() < RECENT_LINES {
                recent.lines.push_back((at, line.len() as u64, parsed()));
            }
        }
        if !is_marker(line) {
            // Counted under the lock, before the shipper can see the line, so never below zero.
            self.backlog.fetch_add(1, Ordering::Relaxed);
            add_to_gauge(1);
        }
        Ok(())
    }

    /// Closes the active segment and starts the next. The closed one is fsync'd first (here,
    /// under the lock: this happens once per segment, so one request pays for it).
    fn rotate(&self, active: &mut Active) -> io::Result<()> {
        if active.dirty {
            active.file.sync_data()?;
        }
        let segment = active.segment + 1;
        let file = create_segment(&self.dir, segment)?;
        *active = Active {
            segment,
            file: Arc::new(file),
            len: 0,
            dirty: false,
            broken: false,
        };
        Ok(())
    }

    /// Whether the journal can be written again after a failure: a few rows' worth of bytes
    /// are written to a scratch file in the folder, fsync'd and removed, then rows go to a
    /// new segment (the active one may end in a failed write's damage, or a failed fsync).
    pub fn probe(&self) -> io::Result<()> {
        let path = self.dir.join(PROBE);
        let written = private_fs::create_file(&path).and_then(|mut file| {
            file.write_all(&[b'\n'; PROBE_BYTES])?;
            file.sync_data()
        });
        let _ = fs::remove_file(&path);
        written?;
        let mut active = lock(&self.active);
        self.rotate(&mut active)
    }

    /// True when rows were appended since the last [`Journal::sync`].
    pub fn needs_sync(&self) -> bool {
        lock(&self.active).dirty
    }

    /// fsyncs the active segment if rows were appended since the last time. The fsync runs
    /// outside the lock, so appends do not wait for the disk.
    pub fn sync(&self) -> io::Result<()> {
        let file = {
            let mut active = lock(&self.active);
            if !active.dirty {
                return Ok(());
            }
            active.dirty = false;
            Arc::clone(&active.file)
        };
        let result = file.sync_data();
        if result.is_err() {
            let mut active = lock(&self.active);
            if Arc::ptr_eq(&active.file, &file) {
                active.dirty = true;
            }
        }
        result
    }

    /// Reads up to `max_lines` lines from the cursor on, crossing into later segments when a
    /// closed one is read to its end. A torn last line (a write cut by an OS crash) and a
    /// line that is not a row are skipped, and logged.
    pub fn read_batch(&self, max_lines: usize) -> io::Result<Batch> {
        let start = self.cursor();
        let mut batch = Batch {
            rows: Vec::new(),
            intents: Vec::new(),
            cancels: Vec::new(),
            lines: 0,
            markers: 0,
            start,
            end: start,
        };
        let mut at = start;
        loop {
            let (active_segment, committed) = {
                let active = lock(&self.active);
                (active.segment, active.len)
            };
            lock(&self.recent).take(&mut at, max_lines, &mut batch);
            let closed = at.segment < active_segment;
            if !closed && (at.offset >= committed || batch.lines >= max_lines as u64) {
                break;
            }
            let path = segment_path(&self.dir, at.segment);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(err) if closed && err.kind() == io::ErrorKind::NotFound => {
                    at = self.next_segment(at.segment, active_segment)?;
                    continue;
                }
                Err(err) => return Err(err),
            };
            // A closed segment no longer grows; the active one is read up to its last whole
            // line, as a write may be under way past it.
            let end = if closed {
                file.metadata()?.len()
            } else {
                committed
            };
            if at.offset < end {
                let mut file = file;
                file.seek(SeekFrom::Start(at.offset))?;
                let mut reader = BufReader::new(file).take(end - at.offset);
                read_segment_lines(&mut reader, &path, &mut at, max_lines, &mut batch)?;
            }
            if batch.lines >= max_lines as u64 || !closed || at.offset < end {
                break;
            }
            at = self.next_segment(at.segment, active_segment)?;
        }
        batch.end = at;
        Ok(batch)
    }

    /// The first segment after `segment`: the next file on disk, or the active segment.
    fn next_segment(&self, segment: u64, active_segment: u64) -> io::Result<Position> {
        let next = list_segments(&self.dir)?
            .into_iter()
            .find(|&s| s > segment)
            .unwrap_or(active_segment)
            .min(active_segment);
        Ok(Position {
            segment: next,
            offset: 0,
        })
    }

    /// Moves the cursor past `batch` (call once its rows are stored), saves it, and deletes
    /// the segments it has left behind. The cursor moves in memory even when saving it fails:
    /// the next start then replays from the last saved cursor, which stores nothing twice.
    pub fn commit(&self, batch: &Batch) -> io::Result<()> {
        {
            let mut cursor = lock(&self.cursor);
            debug_assert_eq!(*cursor, batch.start, "batches are committed in order");
            *cursor = batch.end;
        }
        let rows = batch.lines - batch.markers;
        self.backlog.fetch_sub(rows, Ordering::Relaxed);
        add_to_gauge(-i64::try_from(rows).unwrap_or(i64::MAX));
        // A call's row always follows its intent: an intent resolved within the batch is
        // never pending (nor copied), and the rest resolve intents of earlier batches.
        let pending: Vec<Intent> = {
            let resolved: HashSet<&str> = batch
                .rows
                .iter()
                .map(|r| r.request_id.as_str())
                .chain(batch.cancels.iter().map(String::as_str))
                .collect();
            let mut pending = lock(&self.pending);
            for intent in &batch.intents {
                if !resolved.contains(intent.request_id.as_str()) {
                    pending.insert(intent.request_id.clone(), intent.clone());
                }
            }
            for id in resolved {
                pending.remove(id);
            }
            pending.values().cloned().collect()
        };
        write_cursor(&self.dir, batch.end, pending)?;
        if batch.end.segment > batch.start.segment {
            for segment in list_segments(&self.dir)? {
                if segment < batch.end.segment {
                    remove_segment(&self.dir, segment);
                }
            }
        }
        Ok(())
    }
}

impl Journal {
    /// Keeps a row the database refused in `refused.jsonl` (fsync'd), out of the way of the
    /// rows behind it.
    pub fn set_aside(&self, row: &UsageRow) -> io::Result<()> {
        let mut line = serde_json::to_vec(row)?;
        line.push(b'\n');
        let mut file = private_fs::open_options()
            .create(true)
            .append(true)
            .open(self.dir.join(REFUSED))?;
        file.write_all(&line)?;
        file.sync_data()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        add_to_gauge(-i64::try_from(self.backlog()).unwrap_or(i64::MAX));
    }
}

/// Locks the journal folder with flock, which the kernel releases when the process ends,
/// however it ends. Waits a little for a holder that is still exiting (or for a child
/// process forked while the lock was held, until it execs).
fn take_lock(file: &File, dir: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) if tries < LOCK_TRIES => {
                tries += 1;
                std::thread::sleep(LOCK_RETRY);
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another imagegate process", dir.display()),
                ));
            }
            Err(err) => return Err(err.into()),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{segment:020}{SEGMENT_SUFFIX}"))
}

/// The segments on disk, oldest first.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|rest| rest.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse().ok())
        {
            segments.push(n);
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// A new, empty segment, its name made durable (fsync of the folder).
fn create_segment(dir: &Path, segment: u64) -> io::Result<File> {
    let file = private_fs::open_options()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, segment))?;
    sync_dir(dir)?;
    Ok(file)
}

fn remove_segment(dir: &Path, segment: u64) {
    let path = segment_path(dir, segment);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::warn!(%err, segment = %path.display(), "could not delete a shipped usage journal segment");
        }
    }
}

/// What [`Journal::open`] learns from the lines an earlier run left unshipped.
#[derive(Default)]
struct Scan {
    /// Whole lines that are not markers: the backlog.
    rows: u64,
    intents: Vec<Intent>,
    /// Request ids of the rows and cancels.
    resolved: HashSet<String>,
}

impl Scan {
    /// Reads the whole lines of `path` from byte `from` on. Only the request id of a row
    /// is parsed; a line that cannot be read is counted as a row (the shipper logs it).
    fn read(&mut self, path: &Path, from: u64) -> io::Result<()> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(from))?;
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
                return Ok(());
            }
            if line.starts_with(INTENT_PREFIX) {
                if let Ok(parsed) = serde_json::from_slice::<IntentLine<Intent>>(&line) {
                    self.intents.push(parsed.intent);
                }
            } else if line.starts_with(CANCEL_PREFIX) {
                if let Ok(parsed) = serde_json::from_slice::<CancelLine<String>>(&line) {
                    self.resolved.insert(parsed.cancel);
                }
            } else {
                self.rows += 1;
                if let Ok(row) = serde_json::from_slice::<RowId>(&line) {
                    self.resolved.insert(row.request_id);
                }
            }
        }
    }
}

fn read_cursor(dir: &Path) -> io::Result<Option<SavedCursor>> {
    match fs::read(dir.join(CURSOR)) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Replaces the cursor file atomically: write a temporary file, fsync it, rename it over the
/// old one, fsync the folder.
fn write_cursor(dir: &Path, at: Position, pending: Vec<Intent>) -> io::Result<()> {
    let tmp = dir.join(CURSOR_TMP);
    let mut file = private_fs::create_file(&tmp)?;
    file.write_all(&serde_json::to_vec(&SavedCursor { at, pending })?)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(CURSOR))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
