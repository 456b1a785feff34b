//! Mount points, from /proc/self/mountinfo: the agent's open log and the tracker
//! watch every file system mounted below their root.

use std::path::{Path, PathBuf};

/// File systems that hold no files a version could replace or a tracker could
/// watch.
pub const PSEUDO_FILE_SYSTEMS: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "autofs",
    "fusectl",
    "configfs",
    "binfmt_misc",
    "hugetlbfs",
    "efivarfs",
    "nsfs",
    "rpc_pipefs",
];

/// The mount table, watched: /proc/self/mountinfo reports `POLLPRI` once the
/// table changed since the last poll.
pub struct MountTable {
    file: std::fs::File,
}

impl MountTable {
    pub fn open() -> std::io::Result<MountTable> {
        Ok(MountTable {
            file: std::fs::File::open("/proc/self/mountinfo")?,
        })
    }

    /// Whether a file system was mounted or unmounted since the last call (or
    /// since `open`), without waiting.
    pub fn changed(&mut self) -> bool {
        let mut poll = [rustix::event::PollFd::new(
            &self.file,
            rustix::event::PollFlags::PRI,
        )];
        // The poll itself acknowledges the change (the kernel remembers, per open
        // file, the last mount event it reported).
        rustix::event::poll(&mut poll, Some(&rustix::event::Timespec::default()))
            .is_ok_and(|ready| ready > 0)
    }
}

/// Mount points strictly below `root`.
pub fn mounts_below(root: &Path) -> Vec<PathBuf> {
    // Mount points are absolute, with symlinks resolved.
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    mount_points()
        .into_iter()
        .filter(|mount_point| *mount_point != root && mount_point.starts_with(&root))
        .collect()
}

/// Every mount point but those of pseudo file systems, from /proc/self/mountinfo
/// (fields: id, parent, major:minor, root, mount point, options, optional fields,
/// `-`, type).
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = PathBuf::from(unescape_mountinfo(fields.get(4)?));
            let separator = fields.iter().position(|field| *field == "-")?;
            let file_system = fields.get(separator + 1)?;
            (!PSEUDO_FILE_SYSTEMS.contains(file_system)).then_some(mount_point)
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && index + 3 < bytes.len() {
            if let Ok(value) = u8::from_str_radix(&field[index + 1..index + 4], 8) {
                out.push(value);
                index += 4;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn mounts_below_the_root_leave_out_pseudo_file_systems() {
        let below_root = mounts_below(Path::new("/"));
        assert!(
            !below_root.contains(&PathBuf::from("/proc")),
            "{below_root:?}"
        );
        assert!(!below_root.contains(&PathBuf::from("/")), "{below_root:?}");
        assert!(mounts_below(Path::new("/proc")).is_empty());
    }
}
