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
