//! Preparing a node's data directory, with the errors an operator needs on one line.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long [`open_sled`] waits for a database's lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens the sled database at `dir`, waiting up to [`LOCK_WAIT`] for its file lock: the handle
/// that held it last lets go only once sled's background flusher has stopped, a moment after it
/// is dropped (a reopen in the same process, or a restart while the old process still exits).
/// Held longer, the lock is someone else's and the error says so.
pub fn open_sled(dir: &Path) -> sled::Result<sled::Db> {
    open_sled_with_cache(dir, None)
}

/// [`open_sled`] with sled's page cache bounded to `cache_bytes` (sled's default, 1 GiB, when
/// `None`): the memory a node spends keeping pages it read or wrote.
pub fn open_sled_with_cache(dir: &Path, cache_bytes: Option<u64>) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let mut config = sled::Config::new().path(dir);
        if let Some(bytes) = cache_bytes {
            config = config.cache_capacity(bytes);
        }
        match config.open() {
            // sled 0.34 reports a held lock only as an `Other` I/O error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Makes sure `dir` can hold a node's data: created when missing (unless `require_volume`), a
/// directory, writable, and, with `require_volume` (set in the container image), a mount point of
/// its own, so that a container started without its volume fails instead of keeping its data in
/// a layer that vanishes with it.
pub fn prepare(dir: &Path, require_volume: bool) -> Result<(), String> {
    let shown = dir.display();
    if require_volume {
        if !dir.is_dir() {
            return Err(format!(
                "data directory {shown} does not exist: mount the node's volume there (or unset SHARDLINE_REQUIRE_VOLUME)"
            ));
        }
        if !is_mount_point(dir) {
            return Err(format!(
                "data directory {shown} is not a mounted volume: its data would be lost with the container; mount a volume there (or set SHARDLINE_REQUIRE_VOLUME=false)"
            ));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data directory {shown}: {e}"))?;
    let probe = dir.join(".shardline-write-check");
    std::fs::write(&probe, b"ok")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("data directory {shown} is not writable: {e}"))
}

/// `dir` is the root of a mount: listed in /proc/self/mountinfo, or on another device than its
/// parent.
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        // Field 5 is the mount point, with spaces and such escaped as octal.
        let listed = info.lines().any(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| unescape(m) == dir.to_string_lossy())
        });
        if listed {
            return true;
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(a), Some(Ok(b))) = (std::fs::metadata(&dir), dir.parent().map(std::fs::metadata))
        {
            return a.dev() != b.dev();
        }
    }
    false
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_checks_writability() {
        let tmp = tempfile_dir();
        let dir = tmp.join("a/b");
        prepare(&dir, false).unwrap();
        assert!(dir.is_dir());
        let file = tmp.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(prepare(&file, false)
            .unwrap_err()
            .starts_with("cannot create data directory"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_plain_directory_is_not_a_volume() {
        let tmp = tempfile_dir();
        let err = prepare(&tmp, true).unwrap_err();
        assert!(err.contains("is not a mounted volume"), "{err}");
        let err = prepare(&tmp.join("missing"), true).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        assert!(is_mount_point(Path::new("/")));
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_sled_database_reopens_right_after_it_is_dropped() {
        let tmp = tempfile_dir();
        for i in 0..20u8 {
            let db = open_sled(&tmp).unwrap();
            db.insert([i], &[i]).unwrap();
            db.flush().unwrap();
            drop(db);
        }
        let db = open_sled(&tmp).unwrap();
        assert_eq!(db.len(), 20);
        drop(db);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_sled_database_held_open_is_refused_after_the_wait() {
        let tmp = tempfile_dir();
        let held = open_sled(&tmp).unwrap();
        let started = Instant::now();
        let err = open_sled(&tmp).unwrap_err();
        assert!(
            started.elapsed() >= LOCK_WAIT,
            "gave up after {:?}",
            started.elapsed()
        );
        assert!(err.to_string().contains("lock"), "{err}");
        drop(held);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/data\040dir"), "/data dir");
        assert_eq!(unescape(r"/plain"), "/plain");
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "shardline-datadir-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
