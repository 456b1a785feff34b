//! The process-events connector (cn_proc, netlink): fork, exec and exit of every
//! process, as they happen.
//!
//! The agent keeps its picture of which process holds which file up to date with
//! these events instead of rescanning /proc: a fork copies the parent's files, an
//! exec replaces them, an exit drops them. Only process-level events are reported;
//! threads are folded into their process (thread-group id), because files and
//! restarts belong to processes.
//!
//! This module only listens and parses. It is not a process table: what a process
//! has open is read from /proc (see [`crate::process`]).
//!
//! Limits worth knowing:
//! - Subscribing needs CAP_NET_ADMIN, and the kernel silently ignores subscriptions
//!   from outside the initial user and pid namespaces (no events ever arrive there).
//!   Pids are those of the initial pid namespace.
//! - Events are multicast into a socket buffer; when the reader falls behind, the
//!   kernel drops events and the next read fails with `ENOBUFS` (see [`is_overflow`]).
//!   The caller must then rebuild its picture from /proc. Netlink keeps dropping
//!   every event after an overflow until the socket has been read empty, so the
//!   failing read empties it before returning: events flow again from then on.
//!
//! Parsing is safe code over bytes ([`parse_messages`]); the `unsafe` is confined to
//! the socket calls `rustix` does not cover here (netlink addresses).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    Fork { parent: i32, child: i32 },
    Exec { pid: i32 },
    Exit { pid: i32 },
}

/// A subscription to process events. Needs CAP_NET_ADMIN.
pub struct ProcEvents {
    socket: OwnedFd,
    /// One datagram at a time: the connector sends one small message per datagram.
    buffer: Vec<u8>,
}

/// True if `err` (from [`ProcEvents::read`]) means the kernel dropped events because
/// the socket buffer was full. The subscription stays valid and later reads go on
/// delivering events, but the ones in between are gone: rescan /proc after the
/// failed read (not before: until that read, events were still being dropped).
pub fn is_overflow(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ENOBUFS)
}

/// Socket receive buffer asked for: room for thousands of events, so that a busy
/// moment (a build forking compilers) does not overflow while the agent is busy.
const RECEIVE_BUFFER_BYTES: libc::c_int = 4 << 20;

/// Datagrams read per call at most, so that a fork storm cannot keep one call
/// reading forever; the rest waits for the next call.
const MAX_DATAGRAMS_PER_READ: usize = 4096;

// Layout of what the kernel sends (linux/netlink.h, connector.h, cn_proc.h):
// struct nlmsghdr (16 bytes) | struct cn_msg (20 bytes) | struct proc_event.
const NLMSG_HEADER_LEN: usize = 16;
const CN_MSG_HEADER_LEN: usize = 20;
/// `struct proc_event`: what (u32), cpu (u32), timestamp_ns (u64), then the union.
const PROC_EVENT_DATA_OFFSET: usize = 16;

// `enum what` in struct proc_event.
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

// `enum proc_cn_mcast_op`.
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_CN_MCAST_IGNORE: u32 = 2;

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// The netlink address of the kernel (port 0), or of a group when `groups` is set.
fn netlink_address(groups: u32) -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is a plain C struct of integers; all zeroes is valid.
    let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    address.nl_pid = 0;
    address.nl_groups = groups;
    address
}

impl ProcEvents {
    pub fn subscribe() -> io::Result<ProcEvents> {
        Self::subscribe_with_receive_buffer(RECEIVE_BUFFER_BYTES)
    }

    fn subscribe_with_receive_buffer(receive_buffer: libc::c_int) -> io::Result<ProcEvents> {
        // SAFETY: socket takes three integers and returns a new descriptor or -1.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_CONNECTOR,
            )
        })?;
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        set_receive_buffer(socket.as_fd(), receive_buffer);
        // Port 0 in bind: the kernel picks a unique port, so several subscriptions
        // (in one process or many) do not collide.
        let address = netlink_address(libc::CN_IDX_PROC);
        // SAFETY: `address` is a valid sockaddr_nl and the length says so.
        check(unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::addr_of!(address).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        // The kernel handles a message to port 0 synchronously, inside sendto: once
        // it returns, events are being delivered to the socket.
        send_control(socket.as_fd(), PROC_CN_MCAST_LISTEN)?;
        Ok(ProcEvents {
            socket,
            buffer: vec![0u8; 8192],
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Waits up to `timeout` and returns what one read gives (possibly nothing).
    /// Thread events are folded into their process (tgid); events of other threads
    /// of a process are not reported. `Err` with `ENOBUFS` means events were lost.
    ///
    /// Reads every datagram queued (up to a bound) once the socket is readable.
    /// Recognise `ENOBUFS` with [`is_overflow`]. Before returning it, the read
    /// empties the socket, throwing away what was queued: the caller rescans /proc
    /// anyway, and netlink delivers nothing new until the queue has been empty once
    /// (it marks an overflowing socket congested and drops every later event, without
    /// another error, until a read finds the queue empty).
    pub fn read(&mut self, timeout: Duration) -> io::Result<Vec<ProcEvent>> {
        if !crate::wait_readable(self.socket.as_fd(), timeout)? {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        for _ in 0..MAX_DATAGRAMS_PER_READ {
            match self.receive() {
                Ok(Some(len)) => events.extend(parse_messages(&self.buffer[..len])),
                Ok(None) => {}
                Err(err) => match err.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => {}
                    Some(libc::ENOBUFS) => {
                        self.drain()?;
                        return Err(err);
                    }
                    _ => return Err(err),
                },
            }
        }
        Ok(events)
    }

    /// Reads and discards datagrams until the socket is empty. Ends: a congested
    /// socket takes no new events, so only what was queued at the overflow is read.
    fn drain(&mut self) -> io::Result<()> {
        loop {
            match self.receive() {
                Ok(_) => {}
                Err(err) => match err.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(()),
                    Some(libc::EINTR | libc::ENOBUFS) => {}
                    _ => return Err(err),
                },
            }
        }
    }

    /// Receives one datagram into the buffer: its length, or `None` if it did not
    /// come from the kernel (only a privileged process can send to this group, but
    /// checking costs nothing).
    fn receive(&mut self) -> io::Result<Option<usize>> {
        let mut source = netlink_address(0);
        let mut source_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: the buffer pointer and length describe our own Vec; `source` and
        // `source_len` are valid for writes of a sockaddr_nl.
        let received = unsafe {
            libc::recvfrom(
                self.socket.as_raw_fd(),
                self.buffer.as_mut_ptr().cast::<libc::c_void>(),
                self.buffer.len(),
                0,
                std::ptr::addr_of_mut!(source).cast::<libc::sockaddr>(),
                &mut source_len,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        if source.nl_pid != 0 {
            return Ok(None);
        }
        Ok(Some(received as usize))
    }
}

impl Drop for ProcEvents {
    fn drop(&mut self) {
        // The kernel counts listeners and keeps generating events while the count is
        // above zero; closing the socket does not lower it (cn_proc only frees its
        // per-socket filter then), so say goodbye. Nothing useful can be done if
        // this fails.
        let _ = send_control(self.socket.as_fd(), PROC_CN_MCAST_IGNORE);
    }
}

/// Asks for a bigger receive buffer: SO_RCVBUFFORCE goes beyond the system-wide
/// `rmem_max` (we hold CAP_NET_ADMIN anyway, or subscribing fails); SO_RCVBUF is the
/// fallback. Best effort: the default buffer works, it just overflows sooner.
fn set_receive_buffer(socket: BorrowedFd<'_>, bytes: libc::c_int) {
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: `bytes` is a c_int that outlives the call, and the length says so.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::addr_of!(bytes).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 {
            return;
        }
    }
}

/// Sends a `proc_cn_mcast_op` to the connector in the kernel.
fn send_control(socket: BorrowedFd<'_>, operation: u32) -> io::Result<()> {
    let message = control_message(operation);
    let kernel = netlink_address(0);
    // SAFETY: `message` and `kernel` are valid for reads of the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            message.as_ptr().cast::<libc::c_void>(),
            message.len(),
            0,
            std::ptr::addr_of!(kernel).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short send of a process-events subscription",
        ));
    }
    Ok(())
}

const CONTROL_MESSAGE_LEN: usize = NLMSG_HEADER_LEN + CN_MSG_HEADER_LEN + 4;

/// nlmsghdr + cn_msg addressed to the process connector + the 4-byte operation.
/// (The 8-byte `struct proc_input` with an event filter exists since Linux 6.6, but
/// older kernels ignore it without a word; the plain operation works everywhere.)
fn control_message(operation: u32) -> [u8; CONTROL_MESSAGE_LEN] {
    let mut message = [0u8; CONTROL_MESSAGE_LEN];
    let mut put = |at: usize, bytes: &[u8]| message[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &(CONTROL_MESSAGE_LEN as u32).to_ne_bytes()); // nlmsg_len
    put(4, &(libc::NLMSG_DONE as u16).to_ne_bytes()); // nlmsg_type
                                                      // nlmsg_flags, nlmsg_seq, nlmsg_pid: zero.
    let cn = NLMSG_HEADER_LEN;
    put(cn, &libc::CN_IDX_PROC.to_ne_bytes()); // id.idx
    put(cn + 4, &libc::CN_VAL_PROC.to_ne_bytes()); // id.val
                                                   // seq, ack: zero.
    put(cn + 16, &4u16.to_ne_bytes()); // len
                                       // flags: zero.
    put(cn + CN_MSG_HEADER_LEN, &operation.to_ne_bytes());
    message
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn i32_at(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the netlink messages in one datagram into process-level events. Messages
/// that are not process events, event kinds other than fork, exec and exit, thread
/// creations and exits of threads other than the leader are left out; so is anything
/// truncated or malformed (the kernel does not send such, and a partial event would
/// be worse than none).
pub fn parse_messages(buffer: &[u8]) -> Vec<ProcEvent> {
    let mut events = Vec::new();
    let mut offset = 0;
    while let Some(message_len) = u32_at(buffer, offset) {
        let message_len = message_len as usize;
        if message_len < NLMSG_HEADER_LEN || message_len > buffer.len() - offset {
            break;
        }
        let message_type = u16_at(buffer, offset + 4).unwrap_or(0);
        let is_control = [libc::NLMSG_NOOP, libc::NLMSG_ERROR, libc::NLMSG_OVERRUN]
            .iter()
            .any(|&control| i32::from(message_type) == control);
        if !is_control {
            let payload = &buffer[offset + NLMSG_HEADER_LEN..offset + message_len];
            if let Some(event) = parse_connector_message(payload) {
                events.push(event);
            }
        }
        // Messages are padded to 4 bytes (NLMSG_ALIGN).
        offset += message_len.next_multiple_of(4);
    }
    events
}

/// One `struct cn_msg` carrying a `struct proc_event`.
fn parse_connector_message(message: &[u8]) -> Option<ProcEvent> {
    let index = u32_at(message, 0)?;
    let value = u32_at(message, 4)?;
    if index != libc::CN_IDX_PROC || value != libc::CN_VAL_PROC {
        return None;
    }
    let data_len = usize::from(u16_at(message, 16)?);
    let data = message.get(CN_MSG_HEADER_LEN..CN_MSG_HEADER_LEN + data_len)?;
    parse_proc_event(data)
}

/// One `struct proc_event`; the union starts at [`PROC_EVENT_DATA_OFFSET`].
fn parse_proc_event(event: &[u8]) -> Option<ProcEvent> {
    let what = u32_at(event, 0)?;
    let field = |index: usize| i32_at(event, PROC_EVENT_DATA_OFFSET + 4 * index);
    match what {
        PROC_EVENT_FORK => {
            // parent_pid, parent_tgid, child_pid, child_tgid.
            let parent_tgid = field(1)?;
            let child_pid = field(2)?;
            let child_tgid = field(3)?;
            // A new thread has child_pid != child_tgid: not a new process.
            (child_pid == child_tgid).then_some(ProcEvent::Fork {
                parent: parent_tgid,
                child: child_tgid,
            })
        }
        PROC_EVENT_EXEC => {
            // process_pid, process_tgid. A non-leader thread that execs takes over
            // the leader's pid first, so the tgid is always the process.
            Some(ProcEvent::Exec { pid: field(1)? })
        }
        PROC_EVENT_EXIT => {
            // process_pid, process_tgid, ... Every thread's exit is reported; the
            // leader's stands for the process. (A leader that ends with
            // pthread_exit while other threads run makes this early; rare.)
            let pid = field(0)?;
            let tgid = field(1)?;
            (pid == tgid).then_some(ProcEvent::Exit { pid: tgid })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// One netlink message as the kernel sends it: nlmsghdr, cn_msg, proc_event with
    /// the given union fields (each an i32).
    fn message(what: u32, fields: &[i32]) -> Vec<u8> {
        let mut event = Vec::new();
        event.extend_from_slice(&what.to_ne_bytes());
        event.extend_from_slice(&3u32.to_ne_bytes()); // cpu
        event.extend_from_slice(&123_456_789u64.to_ne_bytes()); // timestamp_ns
        for field in fields {
            event.extend_from_slice(&field.to_ne_bytes());
        }
        event.resize(40, 0); // sizeof(struct proc_event)
        let mut connector = Vec::new();
        connector.extend_from_slice(&libc::CN_IDX_PROC.to_ne_bytes());
        connector.extend_from_slice(&libc::CN_VAL_PROC.to_ne_bytes());
        connector.extend_from_slice(&7u32.to_ne_bytes()); // seq
        connector.extend_from_slice(&0u32.to_ne_bytes()); // ack
        connector.extend_from_slice(&(event.len() as u16).to_ne_bytes());
        connector.extend_from_slice(&0u16.to_ne_bytes()); // flags
        connector.extend(event);
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HEADER_LEN + connector.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes()); // flags
        out.extend_from_slice(&7u32.to_ne_bytes()); // seq
        out.extend_from_slice(&0u32.to_ne_bytes()); // port
        out.extend(connector);
        out
    }

    fn check(messages: &[Vec<u8>], expected: &[ProcEvent]) {
        assert_eq!(parse_messages(&messages.concat()), expected);
    }

    #[test]
    fn keeps_process_events_and_folds_threads() {
        check(
            &[
                // fork of a process from its leader and from another thread
                message(PROC_EVENT_FORK, &[100, 100, 200, 200]),
                message(PROC_EVENT_FORK, &[101, 100, 201, 201]),
                // a new thread: not a process
                message(PROC_EVENT_FORK, &[100, 100, 202, 100]),
                message(PROC_EVENT_EXEC, &[200, 200]),
                // a thread exits, then the leader
                message(PROC_EVENT_EXIT, &[101, 100, 0, 17, 1, 1]),
                message(PROC_EVENT_EXIT, &[100, 100, 0, 17, 1, 1]),
            ],
            &[
                ProcEvent::Fork {
                    parent: 100,
                    child: 200,
                },
                ProcEvent::Fork {
                    parent: 100,
                    child: 201,
                },
                ProcEvent::Exec { pid: 200 },
                ProcEvent::Exit { pid: 100 },
            ],
        );
    }

    #[test]
    fn ignores_other_kinds_and_other_connectors() {
        let mut other_connector = message(PROC_EVENT_EXEC, &[5, 5]);
        other_connector[NLMSG_HEADER_LEN..NLMSG_HEADER_LEN + 4]
            .copy_from_slice(&7u32.to_ne_bytes());
        let mut control = message(PROC_EVENT_EXEC, &[6, 6]);
        control[4..6].copy_from_slice(&(libc::NLMSG_NOOP as u16).to_ne_bytes());
        check(
            &[
                message(0, &[0]),                    // the ack of a subscription
                message(0x4, &[5, 5, 1000, 1000]),   // uid change
                message(0x200, &[5, 5, 0x6c6c6568]), // comm change
                message(0x4000_0000, &[5, 5, 1, 1]), // coredump
                other_connector,
                control,
                message(PROC_EVENT_EXEC, &[9, 9]),
            ],
            &[ProcEvent::Exec { pid: 9 }],
        );
    }

    #[test]
    fn stops_at_truncation() {
        let whole = message(PROC_EVENT_EXEC, &[9, 9]);
        let mut buffer = whole.clone();
        buffer.extend_from_slice(&whole[..whole.len() - 10]);
        assert_eq!(parse_messages(&buffer), [ProcEvent::Exec { pid: 9 }]);
        // A cn_msg claiming more data than the message holds.
        let mut lying = message(PROC_EVENT_EXEC, &[9, 9]);
        let len_at = NLMSG_HEADER_LEN + 16;
        lying[len_at..len_at + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(parse_messages(&lying), []);
        // A netlink length below the header would never advance.
        let mut zero = whole;
        zero[0..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse_messages(&zero), []);
        assert_eq!(parse_messages(&[1, 2, 3]), []);
    }

    #[test]
    fn the_subscription_message_is_laid_out_like_the_kernel_expects() {
        let message = control_message(PROC_CN_MCAST_LISTEN);
        assert_eq!(u32_at(&message, 0), Some(40));
        assert_eq!(u32_at(&message, 16), Some(libc::CN_IDX_PROC));
        assert_eq!(u32_at(&message, 20), Some(libc::CN_VAL_PROC));
        assert_eq!(u16_at(&message, 32), Some(4));
        assert_eq!(u32_at(&message, 36), Some(1));
    }

    /// Spawns /bin/true and reads until its fork (by us), exec and exit have all
    /// arrived, failing after 5 s. Returns everything read, in order.
    fn run_true_and_wait(subscription: &mut ProcEvents) -> (i32, Vec<ProcEvent>) {
        let mut child = std::process::Command::new("/bin/true")
            .spawn()
            .expect("spawn /bin/true");
        let pid = child.id() as i32;
        child.wait().expect("wait for /bin/true");
        let wanted = [
            ProcEvent::Fork {
                parent: std::process::id() as i32,
                child: pid,
            },
            ProcEvent::Exec { pid },
            ProcEvent::Exit { pid },
        ];
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !wanted.iter().all(|event| seen.contains(event)) {
            assert!(
                Instant::now() < deadline,
                "within 5 s, expected {wanted:?} among the events read; of those, got {:?}",
                seen.iter()
                    .filter(|event| wanted.contains(event))
                    .collect::<Vec<_>>()
            );
            seen.extend(subscription.read(Duration::from_millis(100)).expect("read"));
        }
        (pid, seen)
    }

    /// The real kernel: spawning /bin/true shows up as fork, exec and exit of the
    /// child's pid, in that order, the fork with us as parent.
    #[test]
    fn the_kernel_reports_fork_exec_and_exit_of_a_child() {
        let mut subscription = ProcEvents::subscribe().expect("subscribe (needs root)");
        let (pid, seen) = run_true_and_wait(&mut subscription);
        let position = |wanted: ProcEvent| seen.iter().position(|event| *event == wanted);
        let fork = position(ProcEvent::Fork {
            parent: std::process::id() as i32,
            child: pid,
        });
        assert!(fork < position(ProcEvent::Exec { pid }), "fork before exec");
        assert!(
            position(ProcEvent::Exec { pid }) < position(ProcEvent::Exit { pid }),
            "exec before exit"
        );
    }

    /// The real kernel: a subscriber that does not read loses events; the loss
    /// surfaces as an error `is_overflow` recognises, not as silence, and events
    /// flow again right after that error. (Netlink drops every event after an
    /// overflow until the queue has been read empty; without the drain in `read`, the
    /// run of /bin/true after the error would go unseen.)
    #[test]
    fn a_full_socket_buffer_is_reported_as_overflow_and_then_recovers() {
        // 64 KiB holds about 150 events (each datagram is charged its whole socket
        // buffer, some 400 bytes); 200 runs of /bin/true make 600.
        let mut subscription =
            ProcEvents::subscribe_with_receive_buffer(64 << 10).expect("subscribe (needs root)");
        for _ in 0..200 {
            std::process::Command::new("/bin/true")
                .status()
                .expect("run /bin/true");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(
                Instant::now() < deadline,
                "no ENOBUFS within 5 s after 600 unread events"
            );
            match subscription.read(Duration::from_millis(100)) {
                Ok(_) => continue,
                Err(err) if is_overflow(&err) => break,
                Err(err) => panic!("unexpected error: {err}"),
            }
        }
        run_true_and_wait(&mut subscription);
    }
}
