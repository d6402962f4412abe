//! The backend-initiated channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): how the daemon tells
//! the frontend that the config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), after
//! `block_resize`. QEMU then re-reads the config (GET_CONFIG on the main channel) and, when
//! the capacity changed, raises a config interrupt in the guest.
//!
//! The `vhost` crate (0.18) parses SET_BACKEND_REQ_FD and hands the handler a `Backend`, but
//! that type can send only shared-object and shmem messages: its `VhostUserFrontendReqHandler`
//! implementation leaves `handle_config_change` at the trait's default (ENOSYS), and its
//! socket is private. So the connection thread peeks at each message before the crate reads
//! it; for SET_BACKEND_REQ_FD it peeks again with room for the descriptor, which gives this
//! process its own copy of the channel's socket (Linux installs the descriptors of a peeked
//! message too). The copy becomes the channel once the handler accepts the message.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// VHOST_USER_SET_BACKEND_REQ_FD.
const SET_BACKEND_REQ_FD: u32 = 21;
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: version 1, a reply, a reply wanted.
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// How long the frontend may take to acknowledge a config change.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a config-change notice did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// Sent (and acknowledged, with REPLY_ACK).
    Sent,
    /// The frontend did not negotiate BACKEND_REQ and CONFIG (or sent no channel).
    NoChannel,
}

/// One connection's backend channel.
#[derive(Default)]
pub(crate) struct BackendChannel {
    /// A descriptor peeked from a SET_BACKEND_REQ_FD the crate has not handled yet.
    pending: Mutex<Option<OwnedFd>>,
    /// The channel, once the handler accepted it.
    active: Mutex<Option<UnixStream>>,
    /// The protocol features the frontend acknowledged.
    protocol: AtomicU64,
    /// The virtio features the frontend acknowledged.
    features: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BackendChannel {
    /// Before the crate reads the next message from `conn`: if it is SET_BACKEND_REQ_FD, keep
    /// a copy of its descriptor. Blocks until a message (or the end of the connection) comes.
    pub(crate) fn peek(&self, conn: &UnixStream) {
        let mut hdr = [0u8; 12];
        let n = recv_peek(conn, &mut hdr, false)
            .map(|(n, _)| n)
            .unwrap_or(0);
        if n < hdr.len() {
            return;
        }
        let req = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        if req != SET_BACKEND_REQ_FD {
            return;
        }
        match recv_peek(conn, &mut hdr, true) {
            Ok((_, Some(fd))) => *lock(&self.pending) = Some(fd),
            Ok((_, None)) => log::debug!("SET_BACKEND_REQ_FD without a descriptor"),
            Err(e) => log::warn!("cannot take the backend channel's descriptor: {e}"),
        }
    }

    /// The handler accepted SET_BACKEND_REQ_FD: the peeked descriptor is the channel.
    pub(crate) fn accept(&self) {
        let Some(fd) = lock(&self.pending).take() else {
            log::warn!("the backend channel's descriptor was not seen: no config-change notices");
            return;
        };
        let sock = UnixStream::from(fd);
        // A frontend that never reads the channel must not block a resize for ever.
        if let Err(e) = sock
            .set_write_timeout(Some(ACK_TIMEOUT))
            .and_then(|()| sock.set_read_timeout(Some(ACK_TIMEOUT)))
        {
            log::warn!("the backend channel takes no timeouts ({e}): no config-change notices");
            return;
        }
        *lock(&self.active) = Some(sock);
    }

    /// The features the frontend acknowledged (protocol features, virtio features).
    pub(crate) fn set_protocol(&self, bits: u64) {
        self.protocol.store(bits, Ordering::Relaxed);
    }

    pub(crate) fn set_features(&self, bits: u64) {
        self.features.store(bits, Ordering::Relaxed);
    }

    /// Tell the frontend the config space changed. With REPLY_ACK, waits (bounded) for its
    /// acknowledgement, which QEMU sends after it has read the new config. The caller must
    /// not keep the connection's handler busy meanwhile: that read comes on the main channel.
    pub(crate) fn config_changed(&self) -> io::Result<Notice> {
        let p =
            VhostUserProtocolFeatures::from_bits_truncate(self.protocol.load(Ordering::Relaxed));
        let want = VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG;
        let mut g = lock(&self.active);
        let Some(sock) = g.as_mut().filter(|_| p.contains(want)) else {
            return Ok(Notice::NoChannel);
        };
        let protocol_on = self.features.load(Ordering::Relaxed)
            & vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            != 0;
        let ack = protocol_on && p.contains(VhostUserProtocolFeatures::REPLY_ACK);
        let r = Self::notify(sock, ack);
        if r.is_err() {
            // A reply that comes late would pass for the next notice's: the channel is out of
            // step, so it is dropped (the guest sees later sizes after a reconnect).
            *g = None;
        }
        r
    }

    /// Send the notice on `sock`; with `ack`, wait for the frontend's reply.
    fn notify(sock: &mut UnixStream, ack: bool) -> io::Result<Notice> {
        let flags = VERSION_1 | if ack { FLAG_NEED_REPLY } else { 0 };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&flags.to_le_bytes());
        sock.write_all(&msg)?;
        if !ack {
            return Ok(Notice::Sent);
        }
        let mut reply = [0u8; 20];
        sock.read_exact(&mut reply)?;
        let field =
            |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
        let value = u64::from_le_bytes(reply[12..20].try_into().unwrap_or([0xff; 8]));
        if field(0) != CONFIG_CHANGE_MSG || field(4) & FLAG_REPLY == 0 || field(8) != 8 {
            return Err(io::Error::other(format!(
                "unexpected reply to the config-change message: {reply:02x?}"
            )));
        }
        if value != 0 {
            return Err(io::Error::other(format!(
                "the frontend failed the config-change message ({value:#x})"
            )));
        }
        Ok(Notice::Sent)
    }
}

/// recv(2) with MSG_PEEK (and MSG_WAITALL) into `buf`; with `take_fd`, room for one
/// descriptor, which is returned (any further ones are closed).
fn recv_peek(
    conn: &UnixStream,
    buf: &mut [u8],
    take_fd: bool,
) -> io::Result<(usize, Option<OwnedFd>)> {
    // Room for a few descriptors: a frontend sends one here; more would be truncated.
    const MAX_FDS: usize = 4;
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32) };
    let mut cbuf = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if take_fd {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as usize;
    }
    let n = loop {
        // SAFETY: `msg` points at `iov` (which covers `buf`) and at `cbuf` of
        // `msg_controllen` bytes, all alive for the call; the kernel writes only inside them.
        let r = unsafe {
            libc::recvmsg(
                conn.as_raw_fd(),
                &mut msg,
                libc::MSG_PEEK | libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if !take_fd {
        return Ok((n, None));
    }
    let mut first = None;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR walk its control buffer
    // (`cbuf`, still alive) within `msg_controllen`, and CMSG_DATA points inside a header
    // they returned. Each SCM_RIGHTS descriptor was installed in this process for us.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if first.is_none() {
                        first = Some(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn send_with_fd(s: &UnixStream, data: &[u8], fd: &impl AsFd) {
        // SAFETY: CMSG_SPACE only computes a size from its argument.
        let space = unsafe { libc::CMSG_SPACE(4) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        };
        // SAFETY: test code: the buffers outlive the call; one SCM_RIGHTS descriptor.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(
                libc::CMSG_DATA(c).cast::<libc::c_int>(),
                fd.as_fd().as_raw_fd(),
            );
            assert_eq!(libc::sendmsg(s.as_raw_fd(), &msg, 0), data.len() as isize);
        }
    }

    fn header(req: u32, flags: u32, size: u32) -> Vec<u8> {
        [req, flags, size]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    #[test]
    fn a_peeked_channel_carries_config_change_messages() {
        let (front, back) = UnixStream::pair().unwrap();
        let (chan_front, chan_back) = UnixStream::pair().unwrap();
        let ch = BackendChannel::default();
        // Another message first: peeked, nothing kept, still there for the crate to read.
        front.write_all_ref(&header(1, 1, 0));
        ch.peek(&back);
        assert!(lock(&ch.pending).is_none());
        let mut h = [0u8; 12];
        (&back).read_exact(&mut h).unwrap();
        send_with_fd(&front, &header(SET_BACKEND_REQ_FD, 1, 0), &chan_back);
        drop(chan_back);
        ch.peek(&back);
        (&back).read_exact(&mut h).unwrap();
        assert_eq!(h[..], header(SET_BACKEND_REQ_FD, 1, 0)[..]);
        ch.accept();
        // Not negotiated: nothing sent.
        assert_eq!(ch.config_changed().unwrap(), Notice::NoChannel);
        let bits =
            (VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG).bits();
        ch.set_protocol(bits);
        assert_eq!(ch.config_changed().unwrap(), Notice::Sent);
        (&chan_front).read_exact(&mut h).unwrap();
        assert_eq!(h[..], header(CONFIG_CHANGE_MSG, VERSION_1, 0)[..]);
        // With REPLY_ACK: the reply is awaited and checked.
        ch.set_protocol(bits | VhostUserProtocolFeatures::REPLY_ACK.bits());
        ch.set_features(vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        let t = std::thread::spawn(move || {
            let mut h = [0u8; 12];
            (&chan_front).read_exact(&mut h).unwrap();
            let mut r = header(CONFIG_CHANGE_MSG, VERSION_1 | FLAG_REPLY, 8);
            r.extend(0u64.to_le_bytes());
            (&chan_front).write_all(&r).unwrap();
            h
        });
        assert_eq!(ch.config_changed().unwrap(), Notice::Sent);
        let h = t.join().unwrap();
        assert_eq!(
            h[..],
            header(CONFIG_CHANGE_MSG, VERSION_1 | FLAG_NEED_REPLY, 0)[..]
        );
    }

    trait WriteAllRef {
        fn write_all_ref(&self, b: &[u8]);
    }
    impl WriteAllRef for UnixStream {
        fn write_all_ref(&self, b: &[u8]) {
            let mut s = self;
            s.write_all(b).unwrap();
        }
    }
}
