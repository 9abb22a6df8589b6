#!/usr/bin/env python3
"""Where the XDP program's own time goes, by source line.

Run it while something drives the program, e.g. in another shell:

    cargo xtask bench --only per-packet --packets 8000000 --case "established TCP flow (IPv4)"
    python3 scripts/profile_lines.py --seconds 10

It finds the newest loaded XDP program named `xlb` (raw bpf(2), no bpftool needed),
reads its JIT's line info (the kernel address of each BPF line record) and the source
lines from its BTF, samples every CPU with `perf record -e cpu-clock`, and prints the
share of the program's samples per source line, and the kernel functions sampled
beside it (map lookups, hashing, the test-run harness). A sample lands on the
instruction after the one that took the time (skid): a helper call's cost shows on
the line after the call, a map lookup's on `fun(map, key)`.

Root; Linux only. Nothing here is asserted: it is a tool for reading a profile.
"""
import argparse
import bisect
import collections
import ctypes
import struct
import subprocess
import sys
import tempfile

NR_BPF = 321  # x86-64
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_GET_FD_BY_ID = 19
BPF_PROG_TYPE_XDP = 6
PROG_INFO_LEN = 232  # struct bpf_prog_info up to attach_btf_id

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    if libc.syscall(NR_BPF, cmd, buf, 128) < 0:
        raise OSError(ctypes.get_errno(), f"bpf({cmd})")
    return buf.raw


def sys_fd(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(NR_BPF, cmd, buf, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"bpf({cmd})")
    return fd


def obj_info(fd, request):
    out = ctypes.create_string_buffer(bytes(request), len(request))
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, len(request), ctypes.addressof(out)))
    return out.raw


def newest_xlb():
    """The highest-numbered loaded XDP program named xlb, as an fd."""
    best, next_id = None, 0
    for _ in range(100000):  # bounded: ids are finite
        try:
            raw = bpf(BPF_PROG_GET_NEXT_ID, struct.pack("III", next_id, 0, 0))
        except OSError:
            break
        next_id = struct.unpack_from("I", raw, 4)[0]
        try:
            fd = sys_fd(BPF_PROG_GET_FD_BY_ID, struct.pack("III", next_id, 0, 0))
        except OSError:
            continue
        info = obj_info(fd, bytes(PROG_INFO_LEN))
        ptype = struct.unpack_from("I", info, 0)[0]
        name = info[64:80].split(b"\0")[0].decode()
        if ptype == BPF_PROG_TYPE_XDP and name == "xlb":
            best = fd
        else:
            libc.close(fd)
    if best is None:
        sys.exit("no XDP program named xlb is loaded: start the bench (or an agent) first")
    return best


def line_map(fd):
    """(jited address, file, line, source text) per line record, and the functions' ranges."""
    info = obj_info(fd, bytes(PROG_INFO_LEN))
    nr_ksyms, nr_lens = struct.unpack_from("II", info, 104)
    btf_id = struct.unpack_from("I", info, 128)[0]
    nr_line = struct.unpack_from("I", info, 148)[0]
    nr_jline, li_rec, jli_rec = struct.unpack_from("III", info, 168)
    ksyms = ctypes.create_string_buffer(8 * nr_ksyms)
    lens = ctypes.create_string_buffer(4 * nr_lens)
    lines = ctypes.create_string_buffer(li_rec * nr_line)
    jlines = ctypes.create_string_buffer(jli_rec * nr_jline)
    req = bytearray(PROG_INFO_LEN)
    struct.pack_into("II", req, 104, nr_ksyms, nr_lens)
    struct.pack_into("QQ", req, 112, ctypes.addressof(ksyms), ctypes.addressof(lens))
    struct.pack_into("I", req, 148, nr_line)
    struct.pack_into("QQ", req, 152, ctypes.addressof(lines), ctypes.addressof(jlines))
    struct.pack_into("III", req, 168, nr_jline, li_rec, jli_rec)
    obj_info(fd, req)
    funcs = list(zip(struct.unpack(f"{nr_ksyms}Q", ksyms.raw), struct.unpack(f"{nr_lens}I", lens.raw)))
    records = [struct.unpack_from("IIII", lines.raw, k * li_rec) for k in range(nr_line)]
    addrs = struct.unpack(f"{nr_jline}Q", jlines.raw)
    # The BTF's string section names the files and holds the source lines.
    btf_fd = sys_fd(BPF_BTF_GET_FD_BY_ID, struct.pack("III", btf_id, 0, 0))
    size = struct.unpack_from("I", obj_info(btf_fd, bytes(32)), 8)[0]
    raw = ctypes.create_string_buffer(size)
    req = bytearray(32)
    struct.pack_into("QI", req, 0, ctypes.addressof(raw), size)
    obj_info(btf_fd, req)
    hdr_len = struct.unpack_from("I", raw.raw, 4)[0]
    str_off, str_len = struct.unpack_from("II", raw.raw, 16)
    strings = raw.raw[hdr_len + str_off : hdr_len + str_off + str_len]

    def string(off):
        return strings[off : strings.index(b"\0", off)].decode(errors="replace")

    out = []
    for addr, (_insn, file_off, line_off, line_col) in zip(addrs, records):
        out.append((addr, string(file_off).split("/src/")[-1], line_col >> 10, string(line_off).strip()))
    out.sort()
    return out, funcs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    fd = newest_xlb()
    lines, funcs = line_map(fd)
    addrs = [l[0] for l in lines]
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/perf.data"
        subprocess.run(
            ["perf", "record", "-q", "-e", "cpu-clock", "-c", "25000", "-a", "-o", data,
             "--", "sleep", str(args.seconds)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        script = subprocess.run(
            ["perf", "script", "-i", data, "-F", "ip,sym"],
            check=True, capture_output=True, text=True,
        ).stdout
    in_prog, beside = collections.Counter(), collections.Counter()
    for row in script.splitlines():
        parts = row.split(None, 1)
        if len(parts) < 2:
            continue
        try:
            ip = int(parts[0], 16)
        except ValueError:
            continue
        if any(start <= ip < start + n for start, n in funcs):
            _, f, line, src = lines[max(bisect.bisect_right(addrs, ip) - 1, 0)]
            in_prog[(f, line, src[:72])] += 1
        else:
            beside[parts[1].strip()] += 1
    total = sum(in_prog.values())
    if total == 0:
        sys.exit("no samples in the program: is something running it?")
    print(f"{total} samples in the program's own instructions, by source line:")
    for (f, line, src), n in in_prog.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {f}:{line}  {src}")
    print("kernel functions sampled beside it (samples; the program's own = "
          f"{total}):")
    shown = 0
    for name, n in beside.most_common():
        if any(s in name for s in ("htab", "lookup", "hash", "memcmp", "lru", "bpf", "xdp",
                                   "redirect", "ktime", "fib")):
            print(f"  {n:7d}  {name}")
            shown += 1
            if shown == args.top:
                break


if __name__ == "__main__":
    main()
