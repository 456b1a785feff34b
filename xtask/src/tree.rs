//! An independent comparison of two directory trees: names, file types, permission bits,
//! symlink targets and file contents.
//!
//! It deliberately does not use vdsync's own scanner, so a bug there cannot hide itself
//! in the check that the demo and the benchmark make after every apply. Owners and
//! timestamps are not compared: the tasks run as whoever invokes them and only care
//! that what the fleet runs is what the developer wrote.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Read in pieces this size, so a 1 GiB file never sits in memory.
const COMPARE_BUFFER_BYTES: usize = 1 << 20;

/// Describes the first way in which `actual_root` differs from `expected_root`, or
/// `None` when they are the same tree. The roots themselves are not compared, only
/// what is inside them.
pub fn first_difference(expected_root: &Path, actual_root: &Path) -> Result<Option<String>> {
    compare_directories(expected_root, actual_root, Path::new(""))
}

fn sorted_names(directory: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names = std::fs::read_dir(directory)
        .with_context(|| format!("cannot list {}", directory.display()))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot list {}", directory.display()))?;
    names.sort();
    Ok(names)
}

fn compare_directories(
    expected_root: &Path,
    actual_root: &Path,
    relative: &Path,
) -> Result<Option<String>> {
    let expected_names = sorted_names(&expected_root.join(relative))?;
    let actual_names = sorted_names(&actual_root.join(relative))?;
    if let Some(missing) = expected_names
        .iter()
        .find(|name| !actual_names.contains(name))
    {
        return Ok(Some(format!(
            "{} is missing",
            relative.join(missing).display()
        )));
    }
    if let Some(extra) = actual_names
        .iter()
        .find(|name| !expected_names.contains(name))
    {
        return Ok(Some(format!(
            "{} should not exist",
            relative.join(extra).display()
        )));
    }
    for name in &expected_names {
        let path = relative.join(name);
        if let Some(difference) = compare_entries(expected_root, actual_root, &path)? {
            return Ok(Some(difference));
        }
    }
    Ok(None)
}

fn kind_name(metadata: &Metadata) -> &'static str {
    let file_type = metadata.file_type();
    if file_type.is_symlink() {
        "a symlink"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

fn compare_entries(
    expected_root: &Path,
    actual_root: &Path,
    relative: &Path,
) -> Result<Option<String>> {
    let expected_path = expected_root.join(relative);
    let actual_path = actual_root.join(relative);
    let expected = std::fs::symlink_metadata(&expected_path)
        .with_context(|| format!("cannot inspect {}", expected_path.display()))?;
    let actual = std::fs::symlink_metadata(&actual_path)
        .with_context(|| format!("cannot inspect {}", actual_path.display()))?;
    let shown = relative.display();
    if kind_name(&expected) != kind_name(&actual) {
        return Ok(Some(format!(
            "{shown} is {} instead of {}",
            kind_name(&actual),
            kind_name(&expected)
        )));
    }
    if expected.file_type().is_symlink() {
        let expected_target = std::fs::read_link(&expected_path)?;
        let actual_target = std::fs::read_link(&actual_path)?;
        if expected_target != actual_target {
            return Ok(Some(format!(
                "{shown} points to {} instead of {}",
                actual_target.display(),
                expected_target.display()
            )));
        }
        return Ok(None);
    }
    let expected_mode = expected.permissions().mode() & 0o7777;
    let actual_mode = actual.permissions().mode() & 0o7777;
    if expected_mode != actual_mode {
        return Ok(Some(format!(
            "{shown} has mode {actual_mode:o} instead of {expected_mode:o}"
        )));
    }
    if expected.is_dir() {
        return compare_directories(expected_root, actual_root, relative);
    }
    if expected.is_file() {
        if expected.len() != actual.len() {
            return Ok(Some(format!(
                "{shown} has {} bytes instead of {}",
                actual.len(),
                expected.len()
            )));
        }
        if !same_contents(&expected_path, &actual_path)? {
            return Ok(Some(format!("{shown} has different contents")));
        }
    }
    Ok(None)
}

fn same_contents(expected_path: &Path, actual_path: &Path) -> Result<bool> {
    let open =
        |path: &Path| File::open(path).with_context(|| format!("cannot open {}", path.display()));
    let mut expected_file = open(expected_path)?;
    let mut actual_file = open(actual_path)?;
    let mut expected_buffer = vec![0; COMPARE_BUFFER_BYTES];
    let mut actual_buffer = vec![0; COMPARE_BUFFER_BYTES];
    loop {
        let expected_length = read_full(&mut expected_file, &mut expected_buffer)
            .with_context(|| format!("cannot read {}", expected_path.display()))?;
        let actual_length = read_full(&mut actual_file, &mut actual_buffer)
            .with_context(|| format!("cannot read {}", actual_path.display()))?;
        if expected_buffer[..expected_length] != actual_buffer[..actual_length] {
            return Ok(false);
        }
        if expected_length == 0 {
            return Ok(true);
        }
    }
}

/// Fills `buffer` as far as the file allows; a short count means the end of the file,
/// so two files are compared in the same-sized pieces whatever `read` returns.
fn read_full(file: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            count => filled += count,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::ScratchDirectory;

    #[test]
    fn finds_each_kind_of_difference() {
        let scratch = ScratchDirectory::create("unit-test-tree").unwrap();
        let expected = scratch.path().join("expected");
        let actual = scratch.path().join("actual");
        for root in [&expected, &actual] {
            std::fs::create_dir_all(root.join("etc/empty")).unwrap();
            std::fs::write(root.join("etc/motd"), b"hello").unwrap();
            std::os::unix::fs::symlink("motd", root.join("etc/link")).unwrap();
        }
        assert_eq!(first_difference(&expected, &actual).unwrap(), None);

        std::fs::write(actual.join("etc/motd"), b"hellO").unwrap();
        assert_eq!(
            first_difference(&expected, &actual).unwrap().as_deref(),
            Some("etc/motd has different contents")
        );
        std::fs::write(actual.join("etc/motd"), b"hello").unwrap();

        std::fs::set_permissions(
            actual.join("etc/motd"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(first_difference(&expected, &actual)
            .unwrap()
            .unwrap()
            .contains("mode 600"));
        std::fs::set_permissions(
            actual.join("etc/motd"),
            std::fs::Permissions::from_mode(
                std::fs::metadata(expected.join("etc/motd"))
                    .unwrap()
                    .permissions()
                    .mode(),
            ),
        )
        .unwrap();

        std::fs::remove_dir(actual.join("etc/empty")).unwrap();
        assert_eq!(
            first_difference(&expected, &actual).unwrap().as_deref(),
            Some("etc/empty is missing")
        );
        std::fs::create_dir(actual.join("etc/empty")).unwrap();
        std::fs::write(actual.join("etc/extra"), b"").unwrap();
        assert_eq!(
            first_difference(&expected, &actual).unwrap().as_deref(),
            Some("etc/extra should not exist")
        );
    }
}
