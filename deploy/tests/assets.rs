//! Every deployment script parses, is executable, and documents itself.

use std::path::Path;
use std::process::Command;

fn scripts() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["local", "docker", "k8s", "../scripts"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("script dir") {
            let p = entry.expect("entry").path();
            if p.extension().is_some_and(|e| e == "sh") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn scripts_parse_and_start_with_a_description() {
    let all = scripts();
    assert!(all.iter().any(|p| p.ends_with("local/up.sh")));
    assert!(all.iter().any(|p| p.ends_with("local/down.sh")));
    assert!(all.iter().any(|p| p.ends_with("docker/build.sh")));
    assert!(all.iter().any(|p| p.ends_with("k8s/validate.sh")));
    for p in all {
        let st = Command::new("bash")
            .arg("-n")
            .arg(&p)
            .status()
            .expect("bash");
        assert!(st.success(), "{} does not parse", p.display());
        let text = std::fs::read_to_string(&p).expect("read");
        if !p.ends_with("common.sh") {
            assert!(
                text.starts_with("#!/usr/bin/env bash\n#"),
                "{} lacks a shebang and a comment",
                p.display()
            );
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
                assert!(mode & 0o111 != 0, "{} is not executable", p.display());
            }
        }
    }
}

/// The compose file names the services the issue and the README promise, with the simulator as
/// the default Kinesis and MySQL published on loopback only.
#[test]
fn compose_file_has_three_aggregators_three_leaves_and_the_simulator() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml"))
            .expect("docker-compose.yml");
    for service in [
        "aggregator-1:",
        "aggregator-2:",
        "aggregator-3:",
        "leaf-1:",
        "leaf-2:",
        "leaf-3:",
        "kinesis:",
    ] {
        assert!(
            text.contains(&format!("\n  {service}\n")),
            "service {service} missing"
        );
    }
    assert!(text.contains("kinesis-sim"));
    for line in text
        .lines()
        .filter(|l| l.trim_start().starts_with("ports:"))
    {
        assert!(
            line.contains("\"127.0.0.1:"),
            "published beyond loopback: {line}"
        );
    }
}
