"""Row chunks that keep the cpu backend's fp32 temporaries small.

Converting LLaVA-NeXT's keys or rest tokens to fp32 in one piece makes temporaries of tens of MiB:
above glibc's largest mmap threshold (32 MiB) every call page-faults them in again, and even below it
they stream through DRAM several times. Chunks of CHUNK_FLOATS (1 MiB of fp32, an L2's worth) are
converted, used and reused while cached: at LLaVA-NeXT shapes bypass_align runs 7x and tv_score 2x
faster than in one piece (measured on the 2-core CI machine)."""
CHUNK_FLOATS = 1 << 18


def row_chunks(rows: int, row_floats: int):
    """(start, stop) ranges covering 0..rows-1 with at most CHUNK_FLOATS fp32 values each."""
    step = max(1, CHUNK_FLOATS // max(1, row_floats))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]
