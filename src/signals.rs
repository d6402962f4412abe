//! Threads that never take signals: a daemon takes SIGINT/SIGTERM/SIGHUP through a signalfd
//! on its main thread, which only works if no other thread leaves them unblocked.

/// Run `f` with every signal blocked in this thread, then restore the mask. A thread spawned in
/// `f` inherits the full mask.
pub fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigfillset initializes a set we own; pthread_sigmask only changes this thread's
    // signal mask, reading the set we pass and writing the old mask into `old`, which we own.
    let old = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    let r = f();
    // SAFETY: restores the mask saved above; reads only `old`.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    r
}
