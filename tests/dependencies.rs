//! What a team's crate compiles when it tests with devicelab: one crypto library, aws-lc-rs,
//! which async-nats, russh and rustls share (the reference agent's own `ring` default is left
//! out, as devicelab links the agent without defaults). Reads `cargo tree` offline, for the
//! user's crate of this repository (`examples/downstream`, devicelab as a dev-dependency); no
//! VM.

use std::collections::BTreeSet;

/// The packages `acme-device-tests` compiles for its tests, as `name vX.Y.Z`.
fn packages_of_a_users_crate() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--manifest-path",
            manifest,
            "-p",
            "acme-device-tests",
            "-e",
            "normal,dev",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches(" (*)").to_owned())
        .collect()
}

#[test]
fn a_users_crate_compiles_one_crypto_library() {
    let packages = packages_of_a_users_crate();
    let crypto: Vec<&String> = packages
        .iter()
        .filter(|p| {
            ["ring ", "aws-lc-rs ", "openssl "]
                .iter()
                .any(|name| p.starts_with(name))
        })
        .collect();
    assert_eq!(crypto.len(), 1, "{crypto:?}");
    assert!(crypto[0].starts_with("aws-lc-rs "), "{crypto:?}");
}
