//! Every open and exec of a file on chosen file systems, with the pid that did it:
//! fanotify FAN_OPEN | FAN_OPEN_EXEC in descriptor mode. (Being written.)

use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::Duration;

use crate::process::FileId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenEvent {
    pub pid: i32,
    pub file: FileId,
    /// Opened for execution (FAN_OPEN_EXEC).
    pub exec: bool,
}

/// What one read returned.
#[derive(Debug, Default)]
pub struct OpenBatch {
    pub events: Vec<OpenEvent>,
    /// The kernel's queue overflowed: opens were lost.
    pub overflowed: bool,
}

pub struct OpenEvents {}

impl OpenEvents {
    /// One group marking the whole file system of each path (FAN_MARK_FILESYSTEM).
    pub fn watch_filesystems(paths: &[&Path]) -> io::Result<OpenEvents> {
        todo!("{paths:?}")
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        todo!()
    }

    /// Waits up to `timeout`; opens by the calling process itself are left out.
    pub fn read(&mut self, timeout: Duration) -> io::Result<OpenBatch> {
        todo!("{timeout:?}")
    }
}
