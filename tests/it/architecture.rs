//! The crate's shape: its top-level modules depend on each other one way only.

use std::path::Path;
use std::process::Command;

fn module_graph(src: &Path) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/module-graph");
    Command::new("python3")
        .arg(script)
        .arg(src)
        .output()
        .expect("python3 runs scripts/module-graph")
}

#[test]
fn the_module_graph_has_no_cycle() {
    let out = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a dependency cycle between top-level modules:\n{stdout}{stderr}"
    );
    assert!(stdout.contains("no cycle"), "{stdout}");
}

/// The check itself: a cycle through `crate::` paths (and `super::` reaching the root from a
/// nested file) is found and named; paths in comments and strings are not dependencies.
#[test]
fn the_module_graph_names_a_cycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::create_dir(src.join("b")).expect("mkdir");
    std::fs::write(src.join("a.rs"), "use crate::b::X;\n").expect("write");
    std::fs::write(
        src.join("b/mod.rs"),
        "//! see crate::c\npub fn f() { let _ = (\"crate::c\", br#\"{\"k\":\"crate::c\"}\"#, '\"'); }\n",
    )
    .expect("write");
    std::fs::write(src.join("b/x.rs"), "fn g() { super::super::a::h() }\n").expect("write");
    std::fs::write(src.join("c.rs"), "use crate::{a, b::{self, X}};\n").expect("write");
    let out = module_graph(src);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("cycle: a -> b -> a"), "{stderr}");
    assert!(stdout.contains("c -> a, b"), "{stdout}");
    assert!(
        !stdout.contains("b -> a, c"),
        "comments and strings count: {stdout}"
    );
}
