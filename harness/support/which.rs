//! Finding programs: on PATH, or as configured (a path as it is, a bare name through PATH).

use std::path::{Path, PathBuf};

/// `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A configured program: a path as it is, a bare name through PATH.
pub fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        program.is_file().then(|| program.to_owned())
    } else {
        which(&program.to_string_lossy())
    }
}
