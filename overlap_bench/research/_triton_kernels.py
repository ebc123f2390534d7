"""The Triton kernels of :mod:`.comm_like` (imported only there, on first use: needs triton)."""

import triton
import triton.language as tl


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def ctas_kernel(src, dst, stamps, n_slices, slice_elems, duration_ns, period_ns,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Each CTA copies chunks of its slice, then spins until ``i * period_ns`` has passed; stops after
    ``duration_ns``; writes ``[start ns, end ns, SM id, chunks]`` to ``stamps[pid]``."""
    pid = tl.program_id(0)
    t0 = _now()
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    base = (pid % n_slices).to(tl.int64) * slice_elems
    offs = tl.arange(0, BLOCK)
    t_end = t0 + duration_ns
    i = pid * 0
    now = t0
    while now < t_end:
        start = base + (i.to(tl.int64) * CHUNK) % slice_elems
        for j in tl.static_range(0, CHUNK, BLOCK):
            p = start + j + offs
            tl.store(dst + p, tl.load(src + p))
        i += 1
        deadline = tl.minimum(t0 + i.to(tl.int64) * period_ns, t_end)
        now = _now()
        while now < deadline:
            now = _now()
    t1 = _now()
    row = stamps + pid * 4
    tl.store(row, t0)
    tl.store(row + 1, t1)
    tl.store(row + 2, sm.to(tl.int64))
    tl.store(row + 3, i.to(tl.int64))


@triton.jit
def stamp_kernel(out, idx):
    """``out[idx] = %globaltimer`` (one thread)."""
    tl.store(out + idx, _now())
