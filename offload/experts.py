"""Budgeted routed-expert store: a fixed pool of equal slots, aligned reads, pluggable eviction.

    store = ExpertStore.open(folder, budget_bytes=64 << 30, policy="lru")
    gate, up, down = store.get(layer, e)          # Linear triple whose arrays live in one slot
    store.prefetch(layer + 1, predicted_ids)      # speculative, only on spare I/O
    for e, (gate, up, down) in store.get_many(layer, ids):   # all misses in flight at once
        ...
    store.stats()                                 # hits, misses, recall, bytes, GB/s, ...

This module is the store's front door (every public name is importable from here); the pieces:
  expert_layout     geometry (which experts, their shapes), tensors, the aligned read plan of a slot
  expert_policies   eviction: lru, lfu, least-stale, random; belady (the offline bound, for traces)
  expert_io         source files, preadv / O_DIRECT / portable reads, reader pools, the read meter
  expert_catalog    where each expert's bytes are (pack or checkpoint), slot bytes -> Linear triple
  expert_store      the interface, StoreOptions, and the factory that picks a mode
  expert_slots      SlotStore: the budgeted slot pool (policy lru, lfu, least-stale, random)
  expert_pagecache  PageCacheStore: policy "none", the OS page cache only
Options: ExpertStore.open(folder, budget_bytes, policy, **fields of StoreOptions) or options=StoreOptions(...).

Memory. One anonymous mmap (page-aligned, huge pages where the kernel allows, every page faulted
in when the store opens: a read into untouched memory pays the faults inside the read, measured
1.3 vs 2.3 GB/s O_DIRECT and 0.6 vs 0.03 s of system CPU per GB here) of n_slots equal slots,
n_slots = budget_bytes // slot_bytes (or n_slots= directly), at most one slot per expert of the
model (a larger budget is capped: stats()["budget_bytes"] is what was kept). slot_bytes: see
expert_catalog; slot layout: see expert_layout. Nothing else holds expert bytes, so the resident
expert bytes never exceed the budget.

I/O. Each span is split into chunks of chunk_bytes (4 MiB), each read by os.preadv (which releases
the GIL; reads="portable" uses seek + readinto instead, the automatic choice where the platform
lacks preadv) into the slot's memory from a ThreadPoolExecutor: demand reads on io_threads workers,
prefetch reads on a separate, smaller pool (prefetch_threads), so a demand read never queues behind
a prefetch; a prefetch that gets demanded has its unstarted chunks moved to the demand pool.
direct_io=True opens files with O_DIRECT; a file system that refuses it falls back to buffered
reads for that file, and stats()["direct_io_note"] says why (expert_io).

Pinning (what the model must know). A slot is never evicted while referenced: get() / get_many()
return a lease: every array of the returned triple is a view of one per-call root array, and the
slot stays pinned until the last view of that root is gone (weakref.finalize on the root).
Dropping the triple (end of the expert's matmuls) unpins it. Keep a triple only as long as you
compute with it; hold the triples themselves to keep experts (e.g. prefill grouping, hot experts).
If every slot is pinned or loading, a demand get() waits up to pin_wait_s, then raises
ExpertStoreFull. get_many() needs >= 2 slots (the loop variable still holds the previous triple).

Prefetch. prefetch(layer, ids) starts reads only into a free slot or by evicting the policy's
victim among slots that are neither pinned, loading, nor "just demanded" (demanded in the current
or previous layer step) nor a prefetch issued in the current or previous step; at most
max_prefetch_inflight prefetched experts are being read at once, the rest are dropped (a late
prefetch is worthless). A prefetched expert later demanded counts as prefetch_used:
recall = used / issued, coverage = used / (used + misses). stats()["loading_experts"] counts
experts whose reads are still in flight.

policy="none": no user-space cache at all (PageCacheStore). get() returns mmap views of the
checkpoint (reads served by the OS page cache), or with none_io="pread" a fresh buffer filled by
the same reader pool per call; prefetch() becomes posix_fadvise(WILLNEED).

Thread safety: get(), get_many(), prefetch() and stats() may be called from any thread.
"""
from __future__ import annotations

from .expert_catalog import ExpertCatalog
from .expert_layout import (CHUNK_BYTES, MERGE_GAP, MODULES, PACK_INDEX, PAGE, ExpertGeometry, PartSpec,
                            expert_parts, slot_bound)
from .expert_pagecache import PageCacheStore
from .expert_policies import (POLICIES, Clock, EvictionPolicy, LeastStalePolicy, LFUPolicy, LRUPolicy,
                              RandomPolicy, make_policy)
from .expert_slots import SlotStore
from .expert_store import ExpertStore, ExpertStoreFull, StoreOptions, default_budget_bytes, gib

__all__ = [
    "ExpertStore", "ExpertStoreFull", "StoreOptions", "SlotStore", "PageCacheStore", "ExpertCatalog",
    "ExpertGeometry", "PartSpec", "MODULES", "POLICIES",
    "EvictionPolicy", "LRUPolicy", "LFUPolicy", "LeastStalePolicy", "RandomPolicy", "Clock", "make_policy",
    "default_budget_bytes", "expert_parts", "slot_bound", "gib", "PAGE", "PACK_INDEX", "CHUNK_BYTES",
    "MERGE_GAP",
]
