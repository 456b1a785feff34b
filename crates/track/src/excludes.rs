//! Which paths of a development tree are never tracked or shipped.
//!
//! Patterns are globs relative to the root (`*` stays within one component, `**`
//! crosses them). A pattern that matches a directory excludes everything below it.

use std::os::unix::ffi::OsStrExt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use vdsync_proto::RepoPath;

use crate::TrackError;

/// Kernel and runtime trees, caches and logs, vdsync's own state, and per-machine
/// identity that must never be copied from one machine to another.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "var/tmp",
    "var/cache",
    "var/log",
    "var/lib/vdsync",
    "etc/machine-id",
    "etc/hostname",
    "etc/ssh/ssh_host_*",
    "var/lib/cloud",
];

#[derive(Clone)]
pub struct Excludes {
    patterns: Vec<String>,
    set: GlobSet,
    /// Directories excluded by location rather than pattern (the state directory).
    prefixes: Vec<RepoPath>,
}

impl Excludes {
    /// Builds the exclude set from patterns (as given on the command line) and
    /// literal paths to leave out.
    pub fn new(patterns: &[String], prefixes: Vec<RepoPath>) -> Result<Excludes, TrackError> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            let trimmed = pattern.trim_start_matches('/').trim_end_matches('/');
            let glob = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|err| TrackError::BadExclude {
                    pattern: pattern.clone(),
                    message: err.kind().to_string(),
                })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|err| TrackError::BadExclude {
            pattern: patterns.join(" "),
            message: err.to_string(),
        })?;
        Ok(Excludes {
            patterns: patterns.to_vec(),
            set,
            prefixes,
        })
    }

    pub fn defaults() -> Vec<String> {
        DEFAULT_EXCLUDES.iter().map(|p| (*p).to_owned()).collect()
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// True if `path` itself is excluded. Callers walk top-down and do not descend
    /// into an excluded directory, so children need no separate check.
    pub fn is_excluded(&self, path: &RepoPath) -> bool {
        if self.prefixes.iter().any(|prefix| path.starts_with(prefix)) {
            return true;
        }
        let os = std::ffi::OsStr::from_bytes(path.as_bytes());
        self.set.is_match(os)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(patterns: &[&str], path: &str, excluded: bool) {
        let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
        let excludes = Excludes::new(&patterns, vec![]).unwrap();
        let path = RepoPath::parse_str(path).unwrap();
        assert_eq!(excludes.is_excluded(&path), excluded, "{path}");
    }

    #[test]
    fn defaults_and_globs() {
        let defaults: Vec<&str> = DEFAULT_EXCLUDES.to_vec();
        check(&defaults, "proc", true);
        check(&defaults, "etc/ssh/ssh_host_ed25519_key", true);
        check(&defaults, "etc/ssh/sshd_config", false);
        check(&defaults, "etc/hostname", true);
        check(&defaults, "etc/hostname.d", false);
        check(&defaults, "var/lib/vdsync", true);
        check(&defaults, "var/lib/dpkg", false);
        check(&["*.swp"], "a.swp", true);
        check(&["*.swp"], "dir/a.swp", false);
        check(&["**/*.swp"], "dir/a.swp", true);
        check(&["/build/"], "build", true);
    }

    #[test]
    fn bad_pattern_is_a_clear_error() {
        let err = Excludes::new(&["a[".to_owned()], vec![]).err().unwrap();
        assert!(
            err.to_string()
                .starts_with("invalid exclude pattern \"a[\""),
            "{err}"
        );
    }
}
