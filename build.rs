//! Records the git revision for `pgoutbox --version`.
//!
//! `PGOUTBOX_GIT_REVISION` in the build's environment wins (the Docker build
//! passes it as a build argument, since `.git` is not in the build context);
//! otherwise `git rev-parse` (with `-dirty` for uncommitted changes to
//! tracked files); otherwise `unknown` (a source tarball, a crate package).
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
}

fn main() {
    println!("cargo:rerun-if-env-changed=PGOUTBOX_GIT_REVISION");
    let given = std::env::var("PGOUTBOX_GIT_REVISION")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let revision = given.unwrap_or_else(|| match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.trim().is_empty());
            format!("{}{}", rev.trim(), if dirty { "-dirty" } else { "" })
        }
        None => "unknown".to_owned(),
    });
    println!("cargo:rustc-env=PGOUTBOX_GIT_REVISION={revision}");
    // Rebuilt when HEAD moves: a checkout changes .git/HEAD, a commit the
    // branch's ref (or packed-refs), and staging the index. Without .git
    // nothing is watched, and Cargo reruns this when any package file changes.
    // Only files that exist: a missing one would rerun this script (and
    // rebuild the crate) every time.
    let mut watched = vec![
        ".git/HEAD".to_owned(),
        ".git/index".to_owned(),
        ".git/packed-refs".to_owned(),
    ];
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(reference) = head.trim().strip_prefix("ref: ") {
            watched.push(format!(".git/{reference}"));
        }
    }
    for path in watched {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
