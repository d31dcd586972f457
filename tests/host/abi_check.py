#!/usr/bin/env python3
"""The ABI has one source, include/uapi/blktap.h; this check fails when the kernel's Rust copy
(src/uapi.rs) disagrees with it. (The userspace's copy is generated from the header by bindgen,
blktap-abi/build.rs, so it cannot disagree.)

It compiles a C program against the header that prints every constant, struct size and field
offset, computes the repr(C) layout of each struct in src/uapi.rs from its field types, and
compares them. Prints one line per difference; exits 1 if there is any.

    tests/host/abi_check.py [REPO]
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2])

# Rust constant -> C macro.
CONSTS = {
    "MAX_MINORS": "BLKTAP_MAX_MINORS",
    "IOCTL_ALLOC_TAP": "BLKTAP2_IOCTL_ALLOC_TAP",
    "IOCTL_FREE_TAP": "BLKTAP2_IOCTL_FREE_TAP",
    "IOCTL_RESPOND": "BLKTAP2_IOCTL_RESPOND",
    "IOCTL_CREATE_DEVICE_COMPAT": "BLKTAP2_IOCTL_CREATE_DEVICE_COMPAT",
    "IOCTL_REMOVE_DEVICE": "BLKTAP2_IOCTL_REMOVE_DEVICE",
    "IOCTL_CREATE_DEVICE": "BLKTAP2_IOCTL_CREATE_DEVICE",
    "IOCTL_PAUSE": "BLKTAP2_IOCTL_PAUSE",
    "IOCTL_RESUME": "BLKTAP2_IOCTL_RESUME",
    "RING_SIZE": "BLKTAP_RING_SIZE",
    "SEGMENT_MAX": "BLKTAP_SEGMENT_MAX",
    "MMAP_PAGES": "BLKTAP_MMAP_PAGES",
    "RING_HEADER_SIZE": "BLKTAP_RING_HEADER_SIZE",
    "RING_ENTRY_SIZE": "sizeof(union blktap_ring_entry)",
    "RING_MSG_OFFSET": "offsetof(struct blktap_sring, msg)",
    "RING_MSG_PAUSE": "BLKTAP2_RING_MESSAGE_PAUSE",
    "RING_MSG_RESUME": "BLKTAP2_RING_MESSAGE_RESUME",
    "RING_MSG_CLOSE": "BLKTAP2_RING_MESSAGE_CLOSE",
    "OP_READ": "BLKTAP_OP_READ",
    "OP_WRITE": "BLKTAP_OP_WRITE",
    "OP_FLUSH": "BLKTAP_OP_FLUSH",
    "OP_DISCARD": "BLKTAP_OP_DISCARD",
    "OP_WRITE_FUA": "BLKTAP_OP_WRITE_FUA",
    "DISCARD_MAX_SECTORS": "BLKTAP_DISCARD_MAX_SECTORS",
    "RSP_OKAY": "BLKTAP_RSP_OKAY",
    "RSP_EOPNOTSUPP": "BLKTAP_RSP_EOPNOTSUPP",
    "DEVICE_RO": "BLKTAP_DEVICE_RO",
    "DEVICE_FLUSH": "BLKTAP_DEVICE_FLUSH",
    "DEVICE_DISCARD": "BLKTAP_DEVICE_DISCARD",
    "DEVICE_FUA": "BLKTAP_DEVICE_FUA",
    "DEVICE_RECOVERY": "BLKTAP_DEVICE_RECOVERY",
    "DEVICE_STAGED_WRITES": "BLKTAP_DEVICE_STAGED_WRITES",
    "DEVICE_REQ_EVENT": "BLKTAP_DEVICE_REQ_EVENT",
    "DEVICE_LARGE_REQUESTS": "BLKTAP_DEVICE_LARGE_REQUESTS",
    "SEGMENT_MAX_LARGE": "BLKTAP_SEGMENT_MAX_LARGE",
    "NAME_MAX": "(BLKTAP_NAME_MAX - 1)",
}
# Rust struct -> (C type, size to compare with: None for the C struct's own).
STRUCTS = {
    "BlktapInfo": ("struct blktap_info", None),
    "BlktapParams": ("struct blktap2_params", None),
    "BlktapDeviceInfo": ("struct blktap_device_info", None),
    "Segment": ("struct blktap_segment", None),
    "Request": ("struct blktap_request", None),
    # The Rust copy is padded to a whole ring entry.
    "RequestDiscard": ("struct blktap_request_discard", "sizeof(union blktap_ring_entry)"),
    "Response": ("struct blktap_response", None),
    # The header only: the fields before the entries.
    "SringHeader": ("struct blktap_sring", "offsetof(struct blktap_sring, ring)"),
}
SCALARS = {"u8": 1, "i8": 1, "u16": 2, "i16": 2, "u32": 4, "i32": 4, "u64": 8, "i64": 8,
           "usize": 8, "isize": 8}


def rust_consts(src):
    out = {}
    for name, expr in re.findall(r"pub\(crate\) const (\w+): \w+ =\s*([^;]+);", src):
        expr = expr.strip()
        if name not in CONSTS:
            continue
        out[name] = expr
    return out


def rust_structs(src):
    """{name: [(field, type)]} for the repr(C) structs."""
    structs = {}
    for name, body in re.findall(r"#\[repr\(C\)\][^{]*?pub\(crate\) struct (\w+) \{(.*?)\n\}", src, re.S):
        fields = re.findall(r"pub\(crate\) (\w+): ([^,]+),", body)
        structs[name] = fields
    return structs


def layout(fields, structs, consts):
    """repr(C) offsets and size, from field types."""
    def size_align(ty):
        ty = ty.strip()
        if ty in SCALARS:
            return SCALARS[ty], SCALARS[ty]
        m = re.fullmatch(r"\[(.+); (.+)\]", ty)
        if m:
            s, a = size_align(m.group(1))
            n = m.group(2)
            for k, v in consts.items():
                n = re.sub(rf"\b{k}\b", str(v), n)
            return s * eval(n, {}), a
        offs, size, align = layout(structs[ty], structs, consts)
        return size, align
    off, align, offs = 0, 1, {}
    for f, ty in fields:
        s, a = size_align(ty)
        off = (off + a - 1) // a * a
        offs[f] = off
        off += s
        align = max(align, a)
    return offs, (off + align - 1) // align * align, align


def main():
    src = (REPO / "src/uapi.rs").read_text()
    consts = rust_consts(src)
    structs = rust_structs(src)
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{REPO}/include/uapi/blktap.h"',
             "int main(void) {"]
    for name, c in CONSTS.items():
        lines.append(f'printf("const {name} %lld\\n", (long long)({c}));')
    for rname, (ctype, size) in STRUCTS.items():
        lines.append(f'printf("size {rname} %zu\\n", (size_t)({size or "sizeof(" + ctype + ")"}));')
        for f, _ in structs.get(rname, []):
            cf = "__" + f if f.startswith(("pad", "rsvd")) else f
            if rname == "RequestDiscard" and f == "pad3" or rname == "SringHeader" and f == "pad":
                cf = {"pad3": None, "pad": "__pad"}[f]
            if cf:
                lines.append(f'printf("offset {rname}.{f} %zu\\n", offsetof({ctype}, {cf}));')
    lines.append("return 0; }")
    with tempfile.TemporaryDirectory() as d:
        c = Path(d) / "abi.c"
        c.write_text("\n".join(lines) + "\n")
        exe = Path(d) / "abi"
        subprocess.run(["cc", "-Wall", "-o", str(exe), str(c)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    cvals = {}
    for line in out.splitlines():
        kind, key, val = line.split()
        cvals[(kind, key)] = int(val)
    bad = []
    numeric = {}
    for name in CONSTS:
        if name not in consts:
            bad.append(f"src/uapi.rs has no constant {name}")
            continue
        expr = consts[name]
        for k, v in numeric.items():
            expr = re.sub(rf"\b{k}\b", str(v), expr)
        expr = expr.replace("size_of::<Request>()", str(cvals[("const", "RING_ENTRY_SIZE")]))
        try:
            val = eval(re.sub(r"_(?=\d)|(?<=\d)_", "", expr), {})
        except Exception:
            bad.append(f"{name}: cannot evaluate '{consts[name]}'")
            continue
        numeric[name] = val
        if val != cvals[("const", name)]:
            bad.append(f"{name}: Rust {val}, C {cvals[('const', name)]}")
    for rname in STRUCTS:
        if rname not in structs:
            bad.append(f"src/uapi.rs has no struct {rname}")
            continue
        offs, size, _ = layout(structs[rname], structs, numeric)
        if size != cvals[("size", rname)]:
            bad.append(f"{rname}: size Rust {size}, C {cvals[('size', rname)]}")
        for f, off in offs.items():
            key = ("offset", f"{rname}.{f}")
            if key in cvals and cvals[key] != off:
                bad.append(f"{rname}.{f}: offset Rust {off}, C {cvals[key]}")
    for b in bad:
        print(b)
    n = len(CONSTS) + len(STRUCTS)
    print(f"abi: {n} constants and structs compared, {len(bad)} differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
