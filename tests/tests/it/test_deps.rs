//! scripts/test-deps.sh, which makes the README's test command self-sufficient on a fresh Debian
//! machine: run against a PATH of stubs that stand for machines with and without the packages,
//! root or not.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-deps.sh")
}

/// A directory of commands: real `ls` and `grep`, and a stub for each `(name, body)`.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new(stubs: &[(&str, &str)]) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::create_dir(dir.path().join("icd")).unwrap();
        for tool in ["ls", "grep", "cat"] {
            let real = ["/bin", "/usr/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap();
            std::os::unix::fs::symlink(real, dir.path().join("bin").join(tool)).unwrap();
        }
        for (name, body) in stubs {
            let path = dir.path().join("bin").join(name);
            std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Machine { dir }
    }

    fn run(&self, env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("/bin/bash");
        cmd.arg(script())
            .env_clear()
            .env("PATH", self.dir.path().join("bin"))
            .env("EDGEDIFF_VULKAN_ICD_DIR", self.dir.path().join("icd"))
            .env("LOG", self.dir.path().join("log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

const ALL: &str = "mesa-vulkan-drivers libvulkan1 default-jdk-headless maven python3-venv";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_user_without_root_gets_one_line_naming_the_missing_packages() {
    let m = Machine::new(&[("id", "echo 1000"), ("dpkg", "exit 1")]);
    let out = m.run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(ALL) && err.contains("sudo apt-get install -y"),
        "{err}"
    );
    // sudo that asks for a password counts as none.
    let m = Machine::new(&[("id", "echo 1000"), ("dpkg", "exit 1"), ("sudo", "exit 1")]);
    assert_eq!(m.run(&[]).status.code(), Some(1));
}

#[test]
fn root_installs_what_is_missing_and_says_so() {
    let m = Machine::new(&[
        ("id", "echo 0"),
        ("dpkg", "exit 1"),
        ("javac", "true"),
        ("apt-get", "echo \"apt-get $*\" >> \"$LOG\""),
    ]);
    let out = m.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("installing mesa-vulkan-drivers libvulkan1 maven python3-venv"),
        "{}",
        stderr(&out)
    );
    let log = m.log();
    assert!(log.contains("apt-get update"), "{log}");
    assert!(
        log.contains(
            "install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 maven python3-venv"
        ),
        "{log}"
    );
    assert!(!log.contains("default-jdk"), "{log}");
}

#[test]
fn passwordless_sudo_is_used_when_not_root() {
    let m = Machine::new(&[
        ("id", "echo 1000"),
        ("dpkg", "exit 1"),
        (
            "sudo",
            "[ \"$1\" = -n ] && shift; echo \"sudo $*\" >> \"$LOG\"; \"$@\"",
        ),
        ("apt-get", "true"),
    ]);
    let out = m.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(m.log().contains(&format!(
        "sudo apt-get install -y -qq --no-install-recommends {ALL}"
    )));
}

#[test]
fn a_complete_machine_installs_nothing_and_says_nothing() {
    let m = Machine::new(&[
        ("id", "echo 1000"),
        ("dpkg", "exit 0"),
        ("javac", "true"),
        ("mvn", "true"),
        ("apt-get", "echo \"apt-get $*\" >> \"$LOG\""),
    ]);
    let out = m.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_eq!(m.log(), "");
    // Dry run on a bare machine: names everything, installs nothing.
    let m = Machine::new(&[("id", "echo 0"), ("apt-get", "echo x >> \"$LOG\"")]);
    let out = m.run(&[("EDGEDIFF_DEPS_DRY_RUN", "1")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(ALL));
    assert_eq!(m.log(), "");
}
