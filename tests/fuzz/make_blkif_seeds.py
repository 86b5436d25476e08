#!/usr/bin/env python3
"""Writes the seed corpus of blkif_request_fuzz (tests/fuzz/corpus/blkif_request/).

The input layout is documented at the top of blkif_request_fuzz.cc. Each seed is a ring holding a
mix of valid and invalid requests under one ABI and geometry, so the fuzzer starts from inputs
that reach every validation rule instead of discovering the ring header by chance.
Run from anywhere: python3 tests/fuzz/make_blkif_seeds.py
"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "blkif_request")
PAGE = 4096

# protocol selector -> (entry size, id, sector, seg, indirect: handle, grefs, discard nr_sectors)
ABI = {
    0: dict(entry=112, id=8, sector=16, seg=24, ihandle=24, igrefs=28, dnr=24),  # native (x86_64)
    1: dict(entry=108, id=4, sector=12, seg=20, ihandle=20, igrefs=24, dnr=20),  # x86_32-abi
    2: dict(entry=112, id=8, sector=16, seg=24, ihandle=24, igrefs=28, dnr=24),  # x86_64-abi
}
READ, WRITE, BARRIER, FLUSH, RESERVED, DISCARD, INDIRECT = range(7)


def ring_size(pages, entry):
    n = (pages * PAGE - 64) // entry
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def rw(abi, op, rid, sector, segs, nr=None):
    a = ABI[abi]
    b = bytearray(a["entry"])
    b[0] = op
    b[1] = len(segs) if nr is None else nr
    struct.pack_into("<HQQ", b, 2, 0, 0, 0)
    struct.pack_into("<Q", b, a["id"], rid)
    struct.pack_into("<Q", b, a["sector"], sector)
    for i, (gref, first, last) in enumerate(segs):
        struct.pack_into("<IBB", b, a["seg"] + 8 * i, gref, first, last)
    return bytes(b)


def discard(abi, rid, sector, nr, flag=0):
    a = ABI[abi]
    b = bytearray(a["entry"])
    b[0] = DISCARD
    b[1] = flag
    struct.pack_into("<Q", b, a["id"], rid)
    struct.pack_into("<Q", b, a["sector"], sector)
    struct.pack_into("<Q", b, a["dnr"], nr)
    return bytes(b)


def indirect(abi, iop, rid, sector, nr, grefs):
    a = ABI[abi]
    b = bytearray(a["entry"])
    b[0] = INDIRECT
    b[1] = iop
    struct.pack_into("<H", b, 2, nr)
    struct.pack_into("<Q", b, a["id"], rid)
    struct.pack_into("<Q", b, a["sector"], sector)
    for i, g in enumerate(grefs):
        struct.pack_into("<I", b, a["igrefs"] + 4 * i, g)
    return bytes(b)


def seed(abi, requests, *, read_only=False, discard_on=True, lbs_log2=0, pages_log2=0,
         max_indirect=256, sectors=1 << 20, flush_off=False, barrier_off=False, start=0, req_prod_2=None, rsp_event_2=None,
         indirect_segs=()):
    pages = 1 << pages_log2
    a = ABI[abi]
    size = ring_size(pages, a["entry"])
    flags = (int(read_only) | (int(discard_on) << 1) | (lbs_log2 << 2) | (pages_log2 << 4)
             | (int(flush_off) << 6) | (int(barrier_off) << 7))
    req_prod = (start + len(requests)) & 0xFFFFFFFF
    if req_prod_2 is None:
        req_prod_2 = req_prod
    if rsp_event_2 is None:
        rsp_event_2 = (start + 1) & 0xFFFFFFFF
    head = struct.pack("<BBHQIII", abi, flags, max_indirect, sectors, start, req_prod_2,
                       rsp_event_2)
    assert len(head) == 24
    ring = bytearray(pages * PAGE)
    struct.pack_into("<IIII", ring, 0, req_prod, (start + 1) & 0xFFFFFFFF, start,
                     (start + 1) & 0xFFFFFFFF)
    for i, r in enumerate(requests):
        off = 64 + ((start + i) & (size - 1)) * a["entry"]
        ring[off:off + len(r)] = r
    pages_bytes = bytearray()
    for gref, first, last in indirect_segs:
        pages_bytes += struct.pack("<IBBxx", gref, first, last)
    return head + bytes(ring) + bytes(pages_bytes)


def mix(abi):
    full = [(100 + i, 0, 7) for i in range(11)]
    return [
        rw(abi, READ, 1, 0, [(7, 0, 7)]),
        rw(abi, WRITE, 2, 8, full),
        rw(abi, BARRIER, 3, 16, [(7, 2, 5)]),
        rw(abi, FLUSH, 4, 0, []),
        discard(abi, 5, 64, 64, flag=1),
        indirect(abi, WRITE, 6, 128, 20, [900]),
        rw(abi, RESERVED, 7, 0, [(7, 0, 7)]),
        rw(abi, READ, 8, 0, [], nr=0),
        rw(abi, READ, 9, 0, full, nr=12),
        rw(abi, READ, 10, 0, [(7, 5, 4)]),
        rw(abi, WRITE, 11, (1 << 20) - 1, [(7, 0, 7)]),
        rw(abi, READ, 12, 0xFFFFFFFFFFFFFFFF, [(7, 0, 7)]),
        discard(abi, 13, 0, 0),
        indirect(abi, FLUSH, 14, 0, 1, [901]),
        indirect(abi, READ, 15, 0, 0, [902]),
        rw(abi, 0xFF, 16, 0, []),
    ]


def main():
    os.makedirs(OUT, exist_ok=True)
    segs = [(1000 + i, 0, 7) for i in range(20)]
    seeds = {}
    for abi, name in ((0, "native"), (1, "x86_32"), (2, "x86_64")):
        seeds[f"{name}-mix"] = seed(abi, mix(abi), indirect_segs=segs)
        seeds[f"{name}-readonly"] = seed(abi, mix(abi), read_only=True, indirect_segs=segs)
        seeds[f"{name}-4k-blocks"] = seed(abi, mix(abi), lbs_log2=3, indirect_segs=segs)
        seeds[f"{name}-wrap"] = seed(abi, mix(abi), start=0xFFFFFFF8, indirect_segs=segs)
        seeds[f"{name}-broken"] = seed(abi, mix(abi)[:2], req_prod_2=1000)
        seeds[f"{name}-4-pages"] = seed(abi, mix(abi) * 4, pages_log2=2, indirect_segs=segs)
        seeds[f"{name}-no-discard-no-indirect"] = seed(abi, mix(abi), discard_on=False,
                                                       max_indirect=0)
        seeds[f"{name}-no-flush-no-barrier"] = seed(abi, mix(abi), flush_off=True,
                                                    barrier_off=True, indirect_segs=segs)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(seeds)} seeds to {OUT}")


if __name__ == "__main__":
    main()
