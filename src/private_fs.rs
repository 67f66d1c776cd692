//! Files and folders imagegate creates are its own: files 0600, folders 0700, whatever the
//! umask. They hold prompts, images, usage and key names (job records and results, kept
//! results, the journal, spooled uploads, the SQLite database), which other accounts on the
//! host have no business reading. Every place that creates one goes through here.
//!
//! A mode is set when a file or folder is created; one that already exists keeps its own
//! (an operator may have chosen it).

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// A file's mode: read and write for imagegate's own user only.
pub const FILE_MODE: u32 = 0o600;
/// A folder's mode: imagegate's own user only.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents, each 0700.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// [`create_dir_all`] on tokio's blocking pool.
pub async fn create_dir_all_async(dir: &Path) -> io::Result<()> {
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .await
}

/// Options that create a file 0600; the caller says how it is opened.
pub fn open_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// What `File::create` does (write, create, truncate), the file 0600 if it is new.
pub fn create_file(path: &Path) -> io::Result<std::fs::File> {
    open_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// [`create_file`] for tokio.
pub async fn create_file_async(path: &Path) -> io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
        .await
}

/// Creates an empty file at `path` 0600 unless there is one already: for a file another
/// library creates with the mode it finds (SQLite, whose -wal and -shm files then take the
/// database file's mode).
pub fn ensure_file(path: &Path) -> io::Result<()> {
    match open_options().write(true).create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn files_and_folders_are_created_for_their_owner_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let nested = root.path().join("a/b");
        create_dir_all(&nested).expect("dirs");
        assert_eq!(
            (mode(&root.path().join("a")), mode(&nested)),
            (0o700, 0o700)
        );
        let async_dir = root.path().join("c/d");
        create_dir_all_async(&async_dir).await.expect("dirs");
        assert_eq!(mode(&async_dir), 0o700);

        let file = nested.join("f");
        create_file(&file).expect("file");
        let async_file = nested.join("g");
        create_file_async(&async_file).await.expect("file");
        let ensured = nested.join("h");
        ensure_file(&ensured).expect("file");
        ensure_file(&ensured).expect("already there");
        for path in [&file, &async_file, &ensured] {
            assert_eq!(mode(path), 0o600, "{}", path.display());
        }
    }
}
