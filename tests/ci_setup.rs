//! The test command must work on a stock Debian, whose system Python refuses `pip install`
//! (PEP 668, "externally-managed-environment"): Python packages go into a virtual environment
//! that `.ci/setup` creates, and no script installs into the system interpreter.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A `python3` that behaves like Debian's: `-m pip install` outside a venv is refused.
fn debian_like_python(dir: &Path) {
    let real =
        String::from_utf8(Command::new("bash").args(["-c", "command -v python3"]).output().unwrap().stdout)
            .unwrap();
    let shim = dir.join("python3");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nif [ \"$1\" = -m ] && [ \"$2\" = pip ] && [ \"$3\" = install ]; then\n  \
             echo 'error: externally-managed-environment' >&2; exit 1\nfi\nexec {} \"$@\"\n",
            real.trim()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&shim).status().unwrap();
}

#[test]
fn setup_installs_python_tools_into_a_venv_when_system_pip_is_refused() {
    let tmp = std::env::temp_dir().join(format!("customws-ci-setup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("bin")).unwrap();
    debian_like_python(&tmp.join("bin"));
    let refused =
        Command::new(tmp.join("bin/python3")).args(["-m", "pip", "install", "kosoku"]).output().unwrap();
    assert!(!refused.status.success(), "the shim must refuse a system-wide pip install");

    let venv = tmp.join("venv");
    let path = format!("{}:{}", tmp.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .arg(format!("{ROOT}/.ci/setup"))
        .arg("python")
        .env("PATH", path)
        .env("CUSTOMWS_VENV", &venv)
        .output()
        .unwrap();
    let _cleanup = Cleanup(&tmp);
    assert!(
        out.status.success(),
        ".ci/setup failed with a Debian-like python3:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(venv.join("bin/kosoku").exists(), "kosoku must be installed into the venv");
    let import =
        Command::new(venv.join("bin/python")).args(["-c", "import prometheus_client"]).status().unwrap();
    assert!(import.success(), "prometheus_client must be importable from the venv");
}

#[test]
fn no_script_installs_into_the_system_python() {
    let mut scripts = vec![format!("{ROOT}/.ci/run"), format!("{ROOT}/tests/autobahn/run.sh")];
    scripts.extend(
        std::fs::read_dir(format!("{ROOT}/benches"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sh"))
            .map(|p| p.display().to_string()),
    );
    for script in scripts {
        let text = std::fs::read_to_string(&script).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            assert!(
                !(line.contains("python3 -m pip install")
                    || line.contains("pip3 install")
                    || line.contains(" pip install")),
                "{script} installs into the system Python: {line}"
            );
        }
    }
}

struct Cleanup<'a>(&'a Path);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}
