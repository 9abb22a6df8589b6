#!/usr/bin/env python3
"""An independent per-packet harness for xlb: none of xlb's bench code, no aya.

It builds its own network namespace, starts the real `xlb run` agent there (generic
XDP on two veth pairs, a nat service with 100 backends, Maglev M=65537, the flood
guard off), takes the program the agent attached from its pinned link, loads its own
two-instruction XDP_PASS program, and times both with BPF_PROG_TEST_RUN, one packet
per call (raw bpf(2) through ctypes). Within each round the two programs run in
alternating blocks; each round's typical call (the mean below the 90th percentile,
see `typical`) is kept and the median of the rounds reported, with the ratio
xlb / XDP_PASS. It also times XDP_PASS alone (no xlb calls in between), the "plain" reading.

    python3 scripts/perpacket_harness.py --xlb target/release/xlb [--rounds 5] [--calls 20000]

Root only. Everything it creates (namespaces, pins, agent) is removed at exit.
"""

import argparse
import ctypes
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321  # x86_64
CLONE_NEWNET = 0x40000000
BPF_PROG_LOAD, BPF_OBJ_GET, BPF_PROG_TEST_RUN = 5, 7, 10
BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 13, 15
BPF_PROG_TYPE_XDP = 6
XDP_PASS, XDP_REDIRECT = 2, 4
VIP = "10.100.0.10"
BACKENDS = 100


def bpf(cmd, attr):
    r = libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return r


class ObjGet(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class InfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class LinkInfo(ctypes.Structure):
    # struct bpf_link_info: type, id, prog_id, then a union we do not read.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 64)]


class GetFdById(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class ProgLoad(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class TestRun(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


def xdp_pass_program():
    # r0 = XDP_PASS; exit
    insns = struct.pack("<BBhi", 0xB7, 0x00, 0, XDP_PASS) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ProgLoad(prog_type=BPF_PROG_TYPE_XDP, insn_cnt=2, insns=ctypes.addressof(buf), license=ctypes.addressof(lic))
    attr.prog_name = b"harness_pass"
    return bpf(BPF_PROG_LOAD, attr)


def program_of_pinned_link(path):
    p = ctypes.create_string_buffer(path.encode())
    link_fd = bpf(BPF_OBJ_GET, ObjGet(pathname=ctypes.addressof(p)))
    info = LinkInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, InfoByFd(bpf_fd=link_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    os.close(link_fd)
    return bpf(BPF_PROG_GET_FD_BY_ID, GetFdById(id=info.prog_id))


class Runner:
    """One BPF_PROG_TEST_RUN call per packet, as if it arrived on `ifindex`."""

    def __init__(self, ifindex):
        self.out = ctypes.create_string_buffer(2048)
        # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        self.ifindex = ifindex

    def run(self, prog_fd, frame):
        data = ctypes.create_string_buffer(frame, len(frame))
        ctx = ctypes.create_string_buffer(struct.pack("<6I", 0, len(frame), 0, self.ifindex, 0, 0), 24)
        attr = TestRun(prog_fd=prog_fd, data_size_in=len(frame), data_size_out=2048,
                       data_in=ctypes.addressof(data), data_out=ctypes.addressof(self.out), repeat=1,
                       ctx_size_in=24, ctx_in=ctypes.addressof(ctx))
        bpf(BPF_PROG_TEST_RUN, attr)
        return attr.retval, attr.duration


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(a):
    return bytes(int(x) for x in a.split("."))


def frame(src, sport, dst, dport, proto="tcp", flags=0x02):
    if proto == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0)
        pnum = 6
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + 4, 0) + b"ping"
        pnum = 17
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, pnum, 0, ip4(src), ip4(dst))
    iph = iph[:10] + struct.pack("!H", csum(iph)) + iph[12:]
    pseudo = ip4(src) + ip4(dst) + struct.pack("!BBH", 0, pnum, len(l4))
    c = csum(pseudo + l4)
    off = 16 if proto == "tcp" else 6
    l4 = l4[:off] + struct.pack("!H", c) + l4[off + 2:]
    eth = bytes.fromhex("020000000001") + bytes.fromhex("020000000002") + b"\x08\x00"
    return eth + iph + l4


def new_client(i):
    return f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", 10000 + i % 50000


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def setup(ns, pin, cfg_path, xlb, guard_key=True):
    """The LB namespace `ns` (client side 10.30.0.1/24, backend side 10.40.0.1/24) and a
    backend namespace holding the 100 backend addresses, so the agent's neighbour
    entries resolve by ARP as on a real network."""
    bns = ns + "b"
    sh("ip", "netns", "add", ns)
    sh("ip", "netns", "add", bns)
    n = ["ip", "-n", ns]
    sh(*n, "link", "add", "xhc", "type", "veth", "peer", "name", "xhcp")
    sh(*n, "addr", "add", "10.30.0.1/24", "dev", "xhc")
    sh(*n, "link", "add", "xhb", "type", "veth", "peer", "name", "xhbp", "netns", bns)
    sh(*n, "addr", "add", "10.40.0.1/24", "dev", "xhb")
    for dev in ["xhc", "xhcp", "xhb"]:
        sh(*n, "link", "set", dev, "up")
    for i in range(BACKENDS):
        sh("ip", "-n", bns, "addr", "add", f"10.40.0.{2 + i}/24", "dev", "xhbp")
    sh("ip", "-n", bns, "link", "set", "xhbp", "up")
    sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    backends = ", ".join(f'{{address: "10.40.0.{2 + i}:8080"}}' for i in range(BACKENDS))
    with open(cfg_path, "w") as f:
        f.write(
            "snat: {ipv4: 10.40.0.1}\nmaglev_table_size: 65537\n"
            + ("flood_guard: {new_flows_per_cpu: 0}\n" if guard_key else "")
            +
            f'services:\n  - name: web\n    vip: "{VIP}"\n    port: 80\n    protocol: tcp\n    backends: [{backends}]\n'
            f'  - name: dns\n    vip: "{VIP}"\n    port: 53\n    protocol: udp\n    backends: [{backends}]\n'
        )
    agent = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", xlb, "run", "--iface", "xhc,xhb", "--xdp-mode", "generic",
         "--config", cfg_path, "--pin-path", pin],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(f"{pin}/link_xhc"):
        if agent.poll() is not None:
            raise SystemExit(f"xlb exited: {agent.stderr.read()}")
        if time.time() > deadline:
            raise SystemExit("xlb did not attach within 60 s")
        time.sleep(0.1)
    # The agent fills the maps and resolves the backends' neighbours after attaching.
    deadline = time.time() + 30
    while True:
        out = subprocess.run(["ip", "-n", ns, "neigh", "show", "dev", "xhb"], capture_output=True, text=True).stdout
        if sum(1 for line in out.splitlines() if "REACHABLE" in line or "STALE" in line) >= BACKENDS:
            break
        if time.time() > deadline:
            raise SystemExit(f"backend neighbours unresolved:\n{out}")
        time.sleep(0.2)
    return agent


def measure(run, xlb_fd, pass_fd, frames_for, first, calls, want, rounds, block=256):
    xs, ps = [], []
    for rnd in range(rounds):
        x, p = [], []
        # Each round its own frames' indices: new-flow cases need new clients.
        start = first + rnd * calls
        i = start
        while i < start + calls:
            blk = [frames_for(j) for j in range(i, min(i + block, start + calls))]
            for fr in blk:
                v, d = run(xlb_fd, fr)
                if v != want:
                    raise SystemExit(f"verdict {v}, wanted {want}")
                x.append(d)
            for fr in blk:
                p.append(run(pass_fd, fr)[1])
            i += block
        xs.append(typical(x))
        ps.append(typical(p))
    return statistics.median(xs), statistics.median(ps)


def typical(durations):
    """The mean of the calls below their 90th percentile, as `cargo xtask bench` keeps:
    the kernel's clock may advance in steps (10 ns on some VMs), which a median of
    single calls would round to."""
    kept = sorted(durations)[: max(1, len(durations) * 9 // 10)]
    return sum(kept) / len(kept)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlb", default="target/release/xlb")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--fills", default="20000,200000")
    ap.add_argument("--no-guard-key", action="store_true",
                    help="for an xlb from before the flood guard: leave flood_guard out of the config")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("root only (netns, BPF)")
    ns = f"xh{os.getpid()}"
    pin = f"/sys/fs/bpf/xh{os.getpid()}"
    cfg = tempfile.NamedTemporaryFile(suffix=".yaml", delete=False).name
    agent = None
    try:
        agent = setup(ns, pin, cfg, os.path.abspath(args.xlb), not args.no_guard_key)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise SystemExit("setns failed")
        os.close(fd)
        ifindex = libc.if_nametoindex(b"xhc")
        r = Runner(ifindex)
        xlb_fd = program_of_pinned_link(f"{pin}/link_xhc")
        pass_fd = xdp_pass_program()
        results = []
        # XDP_PASS alone, nothing between its calls: the plain reading.
        fr = frame("10.30.0.2", 5000, "10.30.0.1", 9999, "udp")
        plain = [typical([r.run(pass_fd, fr)[1] for _ in range(args.calls)]) for _ in range(args.rounds)]
        print(f"XDP_PASS alone: {statistics.median(plain):.0f} ns")
        cases = [("not a VIP (UDP to the LB itself)", lambda i: fr, XDP_PASS)]
        syn = frame("10.30.0.2", 40000, VIP, 80)
        v, _ = r.run(xlb_fd, syn)
        assert v == XDP_REDIRECT, f"opening the flow: verdict {v}"
        ack = frame("10.30.0.2", 40000, VIP, 80, flags=0x10)
        cases.append(("established TCP flow (IPv4)", lambda i: ack, XDP_REDIRECT))
        # New flows: the agent's tables are never emptied here (deleting entries from
        # an LRU map leaves its free lists in a state that makes inserts dearer), so
        # the table grows: to each size in turn, plus a hundredth of it per round.
        in_table = 1  # the established flow above
        next_client = 0

        def new(i):
            s, p = new_client(i)
            return frame(s, p, VIP, 80)

        for fill in sorted(int(x) for x in args.fills.split(",") if x):
            for i in range(next_client, next_client + fill - in_table):
                v, _ = r.run(xlb_fd, new(i))
                assert v == XDP_REDIRECT, f"filling: verdict {v}"
            next_client += fill - in_table
            per_round = max(fill // 100, 1000)
            name = f"new TCP flow (SYN), {fill // 1000}k flows in the table"
            x, p = measure(r.run, xlb_fd, pass_fd, new, next_client, per_round, XDP_REDIRECT, args.rounds)
            next_client += per_round * args.rounds
            in_table = fill + per_round * args.rounds
            results.append({"case": name, "xlb_ns": x, "xdp_pass_ns": p, "ratio": x / p})
            print(f"{name:<48} xlb {x:6.0f} ns  XDP_PASS {p:5.0f} ns  ratio {x / p:5.2f}")
        for name, f, want in cases:
            x, p = measure(r.run, xlb_fd, pass_fd, f, 0, args.calls, want, args.rounds)
            results.append({"case": name, "xlb_ns": x, "xdp_pass_ns": p, "ratio": x / p})
            print(f"{name:<48} xlb {x:6.0f} ns  XDP_PASS {p:5.0f} ns  ratio {x / p:5.2f}")
        print(json.dumps({"harness": "scripts/perpacket_harness.py", "xdp_pass_alone_ns": statistics.median(plain), "cases": results}))
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGINT)  # SIGINT detaches
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        subprocess.run(["rm", "-rf", pin])
        for name in [ns, ns + "b"]:
            subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
        os.unlink(cfg)


if __name__ == "__main__":
    main()
