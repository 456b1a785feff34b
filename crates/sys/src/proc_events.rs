//! The process-events connector (cn_proc, netlink): fork, exec and exit of every
//! process, as they happen. (Being written: see the signatures.)

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    Fork { parent: i32, child: i32 },
    Exec { pid: i32 },
    Exit { pid: i32 },
}

/// A subscription to process events. Needs CAP_NET_ADMIN.
pub struct ProcEvents {}

impl ProcEvents {
    pub fn subscribe() -> io::Result<ProcEvents> {
        todo!()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        todo!()
    }

    /// Waits up to `timeout` and returns what one read gives (possibly nothing).
    /// Thread events are folded into their process (tgid); events of other threads
    /// of a process are not reported. `Err` with `ENOBUFS` means events were lost.
    pub fn read(&mut self, timeout: Duration) -> io::Result<Vec<ProcEvent>> {
        todo!("{timeout:?}")
    }
}
