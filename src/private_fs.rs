//! Files that hold personal data: every file leadsync creates (the state file, the
//! JSONL output and its successors after a rotation, an export written with
//! `--output`) is created readable by its owner only (0600), and every directory it
//! creates for one 0700, whatever the umask. A file that already exists keeps its
//! mode; a state file others can read gets a warning with the command that fixes it.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

/// Creates `dir` and any missing parent, each created one 0700.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Open options whose `create` makes a 0600 file.
pub fn options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Logs a warning when the group or others may read `path` (`what` says which file).
pub fn warn_if_shared(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "The {what} holds personal data and others on this machine can read it; run: chmod 600 {}",
                    path.display()
                );
            }
        }
    }
}
