//! The sysctl check script reads a profile, compares it with this host, and changes nothing.

use std::process::Command;

fn run(profile: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/sysctl/check.sh"))
        .arg(format!("{}/sysctl/{profile}", env!("CARGO_MANIFEST_DIR")))
        .args(extra)
        .output()
        .expect("bash runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn profile_keys(profile: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{}/sysctl/{profile}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split('=').next().unwrap().trim().to_string())
        .collect()
}

#[test]
fn reports_every_key_of_each_profile_read_only() {
    for profile in ["customws-server.conf", "loadgen-host.conf"] {
        let before = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap();
        let (code, out) = run(profile, &[]);
        assert!(code == 0 || code == 1, "{profile}: exit {code}\n{out}");
        for key in profile_keys(profile) {
            assert!(out.lines().any(|l| l.contains(&key)), "{profile}: no line for {key}\n{out}");
        }
        assert_eq!(code == 1, out.contains("DIFFERS"), "exit code must say whether anything differs");
        let after = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap();
        assert_eq!(before, after, "the check must not change the host");
    }
}

#[test]
fn rejects_bad_usage() {
    assert_eq!(run("customws-server.conf", &["--force"]).0, 2);
    assert_eq!(run("no-such-profile.conf", &[]).0, 2);
}

/// A fake `/proc/sys` (and `/proc/meminfo`) under a temp dir: `values` as (key, value).
fn fake_root(name: &str, values: &[(&str, &str)], mem_kib: u64) -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!("customws-sysctl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (key, value) in values {
        let path = root.join("sys").join(key.replace('.', "/"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("{value}\n")).unwrap();
    }
    std::fs::write(root.join("meminfo"), format!("MemTotal:       {mem_kib} kB\nMemFree: 1 kB\n")).unwrap();
    root
}

fn run_in(root: &std::path::Path, profile_text: &str, extra: &[&str]) -> (i32, String) {
    let profile = root.join("profile.conf");
    std::fs::write(&profile, profile_text).unwrap();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/sysctl/check.sh"))
        .arg(&profile)
        .args(extra)
        .env("SYSCTL_ROOT", root.join("sys"))
        .env("MEMINFO", root.join("meminfo"))
        .output()
        .expect("bash runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read(root: &std::path::Path, key: &str) -> String {
    std::fs::read_to_string(root.join("sys").join(key.replace('.', "/"))).unwrap().trim().to_string()
}

#[test]
fn limits_are_minimums_and_apply_never_lowers_them() {
    let profile = "fs.file-max = 2097152\nnet.core.somaxconn = 65535\nnet.netfilter.nf_conntrack_max = 2097152\n\
                   net.ipv4.tcp_fin_timeout = 30\n";
    // A host above every limit: fine as it is.
    let high = [
        ("fs.file-max", "9223372036854775807"),
        ("net.core.somaxconn", "131072"),
        ("net.netfilter.nf_conntrack_max", "4194304"),
        ("net.ipv4.tcp_fin_timeout", "30"),
    ];
    let root = fake_root("high", &high, 32 << 20);
    let (code, out) = run_in(&root, profile, &["--apply"]);
    assert_eq!(code, 0, "a host above the minimums matches:\n{out}");
    assert!(!out.contains("DIFFERS"), "{out}");
    for (key, value) in high {
        assert_eq!(read(&root, key), value, "--apply must not touch {key}");
    }

    // Below a minimum, and an exact key that differs: reported, and --apply raises them.
    let low = [
        ("fs.file-max", "9223372036854775807"),
        ("net.core.somaxconn", "4096"),
        ("net.netfilter.nf_conntrack_max", "262144"),
        ("net.ipv4.tcp_fin_timeout", "60"),
    ];
    let root = fake_root("low", &low, 32 << 20);
    let (code, out) = run_in(&root, profile, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DIFFERS net.core.somaxconn = 4096 (want at least 65535)"), "{out}");
    assert!(out.contains("DIFFERS net.ipv4.tcp_fin_timeout = 60 (want 30)"), "{out}");
    assert_eq!(read(&root, "net.core.somaxconn"), "4096", "read-only without --apply");
    let (code, out) = run_in(&root, profile, &["--apply"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(read(&root, "net.core.somaxconn"), "65535");
    assert_eq!(read(&root, "net.netfilter.nf_conntrack_max"), "2097152");
    assert_eq!(read(&root, "net.ipv4.tcp_fin_timeout"), "30");
    assert_eq!(read(&root, "fs.file-max"), "9223372036854775807", "never lowered");
    assert_eq!(run_in(&root, profile, &[]).0, 0, "after --apply the host matches");
}

#[test]
fn tcp_mem_is_computed_from_the_hosts_ram() {
    let profile = "net.ipv4.tcp_mem = 786432 1048576 1572864\n";
    // 8 GiB host: 2097152 pages → 3/32, 1/8, 3/16.
    let root = fake_root("mem8", &[("net.ipv4.tcp_mem", "92160 122880 184320")], 8 << 20);
    let (code, out) = run_in(&root, profile, &["--apply"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("want at least 196608 262144 393216"), "sized for 8 GiB, not 32:\n{out}");
    assert!(out.contains("computed from this host's MemTotal"), "{out}");
    assert_eq!(read(&root, "net.ipv4.tcp_mem"), "196608 262144 393216");
    // A host that already allows more keeps its values.
    let root = fake_root("memhigh", &[("net.ipv4.tcp_mem", "300000 400000 500000")], 8 << 20);
    let (code, out) = run_in(&root, profile, &["--apply"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(read(&root, "net.ipv4.tcp_mem"), "300000 400000 500000");
}
