//! Accesses to the scratch pages and ring mappings, by address. They are volatile: the kernel
//! reads and writes the ring pages behind our back, and no Rust reference points into them.

pub(super) fn write_bytes(addr: u64, bytes: &[u8]) {
    for (k, b) in bytes.iter().enumerate() {
        // SAFETY: callers pass addresses inside writable mappings the fuzzer owns (the scratch
        // page, or a ring mapping with PROT_WRITE), with `bytes.len()` bytes of room.
        unsafe { std::ptr::write_volatile((addr as usize + k) as *mut u8, *b) };
    }
}

pub(super) fn read_bytes<const N: usize>(addr: u64) -> [u8; N] {
    let mut out = [0u8; N];
    for (k, b) in out.iter_mut().enumerate() {
        // SAFETY: callers pass addresses inside readable mappings the fuzzer owns.
        *b = unsafe { std::ptr::read_volatile((addr as usize + k) as *const u8) };
    }
    out
}

pub(super) fn write_u32(addr: u64, v: u32) {
    write_bytes(addr, &v.to_le_bytes());
}

pub(super) fn write_u64(addr: u64, v: u64) {
    write_bytes(addr, &v.to_le_bytes());
}

pub(super) fn read_u32(addr: u64) -> u32 {
    u32::from_le_bytes(read_bytes::<4>(addr))
}

pub(super) fn read_u64(addr: u64) -> u64 {
    u64::from_le_bytes(read_bytes::<8>(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_accessors_round_trip() {
        let mut buf = [0u64; 4];
        let at = buf.as_mut_ptr() as u64;
        write_u64(at, 0x1122_3344_5566_7788);
        write_u32(at + 8, 0xdead_beef);
        assert_eq!(read_u64(at), 0x1122_3344_5566_7788);
        assert_eq!(read_u32(at + 8), 0xdead_beef);
        assert_eq!(read_bytes::<2>(at), [0x88, 0x77]);
    }
}
