//! Preparing a node's data directory, with the errors an operator needs on one line.

use std::path::Path;

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
