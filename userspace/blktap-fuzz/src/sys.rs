//! Raw system calls, with every argument passed at full width, answering the value or the errno.
//!
//! They take plain integers on purpose: the fuzzer hands the kernel addresses and numbers that
//! Rust types could not hold (unmapped or kernel addresses, out-of-range commands).

use std::ffi::CString;

/// A system call's answer: its value, or the errno.
pub type SysResult = Result<i64, i32>;

fn check(ret: libc::c_long) -> SysResult {
    if ret < 0 {
        Err(nix::errno::Errno::last_raw())
    } else {
        Ok(ret)
    }
}

/// `ioctl(fd, cmd, arg)`; the kernel truncates `cmd` to 32 bits.
pub fn ioctl(fd: i32, cmd: u64, arg: u64) -> SysResult {
    // SAFETY: the kernel validates every argument; a bad address answers EFAULT. The only memory
    // the kernel may write is what `arg` points at, which the callers own or want refused.
    check(unsafe { libc::syscall(libc::SYS_ioctl, fd, cmd, arg) })
}

/// `open(path, flags)`.
pub fn open(path: &str, flags: i32) -> SysResult {
    let path = CString::new(path).map_err(|_| libc::EINVAL)?;
    // SAFETY: `path` is a valid C string.
    check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) }.into())
}

/// `close(fd)`.
pub fn close(fd: i32) -> SysResult {
    // SAFETY: the caller owns `fd` and forgets it.
    check(unsafe { libc::close(fd) }.into())
}

/// `mmap(addr, len, prot, flags, fd, offset)`: the address, or the errno.
pub fn mmap(addr: u64, len: u64, prot: i32, flags: i32, fd: i32, offset: u64) -> SysResult {
    // SAFETY: new mappings land where the kernel chooses, or (MAP_FIXED) inside a reservation
    // the caller owns; no Rust reference points into either.
    check(unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) })
}

/// `munmap(addr, len)`.
pub fn munmap(addr: u64, len: u64) -> SysResult {
    // SAFETY: the caller only unmaps mappings it made (or ranges holding none of its data).
    check(unsafe { libc::syscall(libc::SYS_munmap, addr, len) })
}

/// `mprotect(addr, len, prot)`.
pub fn mprotect(addr: u64, len: u64, prot: i32) -> SysResult {
    // SAFETY: as `munmap`; the caller tracks the protection it asked for.
    check(unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) })
}

/// `mremap(old, old_len, new_len, flags, new_addr)`: the new address, or the errno.
pub fn mremap(old: u64, old_len: u64, new_len: u64, flags: i32, new_addr: u64) -> SysResult {
    // SAFETY: as `mmap`: targets are inside reservations the caller owns.
    check(unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) })
}

/// `poll` on one descriptor with a zero timeout: the returned events.
pub fn poll_now(fd: i32, events: i16) -> SysResult {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = check(unsafe { libc::poll(&mut pfd, 1, 0) }.into())?;
    Ok(if r == 0 { 0 } else { i64::from(pfd.revents) })
}

/// `mknod(path, mode, dev)` for a character (`block` false) or block node, mode 0600.
pub fn mknod(path: &str, block: bool, major: u32, minor: u32) -> SysResult {
    let path = CString::new(path).map_err(|_| libc::EINVAL)?;
    let kind = if block { libc::S_IFBLK } else { libc::S_IFCHR };
    // SAFETY: `path` is a valid C string.
    check(unsafe { libc::mknod(path.as_ptr(), kind | 0o600, libc::makedev(major, minor)) }.into())
}

/// The errno's name, e.g. `EINVAL`, or `OK` for 0.
pub fn errno_name(code: i32) -> String {
    if code == 0 {
        "OK".into()
    } else {
        format!("{:?}", nix::errno::Errno::from_raw(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_errnos() {
        assert_eq!(close(-1), Err(libc::EBADF));
        assert_eq!(ioctl(-1, 1, 0), Err(libc::EBADF));
        assert_eq!(errno_name(libc::ENOTTY), "ENOTTY");
        assert_eq!(errno_name(0), "OK");
        let page = mmap(
            0,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .unwrap();
        assert_eq!(munmap(page as u64, 4096), Ok(0));
        assert_eq!(
            mmap(
                0,
                0,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0
            ),
            Err(libc::EINVAL)
        );
        assert_eq!(poll_now(-1, libc::POLLIN), Ok(0));
    }
}
