"""What goes where, before a model loads: resident weights, the routed-expert cache, the KV cache,
disk reads. From headers only (config.json and the safetensors headers; no tensor data is read).

The native engine's default expert cache is choose_expert_cache() here, and `kimi-desktop plan`
prints plan_memory(), which makes the same decision: one rule, one place.

    choice = choose_expert_cache(folder, requested_gb=None)     # None: auto; 0: the OS page cache
    plan = plan_model(folder, ram_bytes=64 << 30)               # a machine with 64 GiB
    print(format_plan(plan))

The rule (bytes):
    headroom = max(HEADROOM_MIN, HEADROOM_SHARE * available)   the OS, this process's heap and
               activations, the page cache of the libraries and of the embedding rows
    left     = available - headroom - resident weights - KV cache for ctx tokens
    routed experts <= left: they stay in the OS page cache (mmap), no store;
    otherwise an expert store of `left` bytes (whole slots), with O_DIRECT: the page cache cannot
    hold the experts, so a buffered read would only copy twice and evict something useful.
Most of what is available goes to the store: a small fixed guess loses to the page cache (measured
in issue 8: a 3 GiB store at 3.57 tok/s against the page cache's 5.30 with ~6 GiB to use).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from kimi_desktop.offload.experts import ExpertGeometry, ExpertStore, gib
from kimi_desktop.offload.safetensors import Checkpoint

GIB = 1 << 30
HEADROOM_MIN = 3 * GIB // 4
HEADROOM_SHARE = 0.03
DEFAULT_CTX = 32768          # KV reserved when no context is given (the cache grows as a chat does)
HIT_RATES = (0.0, 0.5, 0.8, 0.9, 0.95)
MIN_TOK_S = 1.0              # below this decode speed the disk is "slower than needed"

__all__ = ["ModelSizes", "ExpertCacheChoice", "Plan", "model_sizes", "choose_expert_cache", "decide",
           "plan_memory", "plan_model", "format_plan", "headroom_bytes"]


@dataclass(frozen=True)
class ModelSizes:
    """A checkpoint's bytes by where they live, from its headers."""
    folder: str
    disk_bytes: int              # the model's files as stored (safetensors shards, expert pack)
    resident_bytes: int          # read into RAM at load: everything but routed experts and embedding
    embedding_bytes: int         # read by row, per token, through the page cache
    expert_bytes: int            # all routed experts' tensors
    expert_nbytes: int           # one expert's tensors (gate, up, down)
    slot_bytes: int              # one expert-store slot (page-aligned spans)
    n_experts: int               # routed experts over all MoE layers
    moe_layers: int
    top_k: int                   # experts per token and layer
    n_layers: int
    kv_bytes_per_token: int      # MLA latent: layers x (kv_lora_rank + qk_rope_head_dim) x 2 (bf16, the default)
    max_ctx: int
    expert_source: str           # checkpoint | pack

    @property
    def min_store_bytes(self) -> int:
        """One layer's top-k experts: what one token's MoE step holds at once."""
        return self.top_k * self.slot_bytes

    @property
    def store_cap_bytes(self) -> int:
        return self.n_experts * self.slot_bytes

    def kv_bytes(self, ctx: int) -> int:
        return self.kv_bytes_per_token * ctx

    def default_ctx(self) -> int:
        return min(self.max_ctx, DEFAULT_CTX) if self.max_ctx else DEFAULT_CTX


def model_sizes(model_dir: str | os.PathLike) -> ModelSizes:
    """Read config.json and the safetensors headers (and an expert pack's index, if any)."""
    from kimi_desktop.runtime.config import load_config

    folder = Path(model_dir)
    cfg = load_config(folder)
    geom, qcfg = ExpertGeometry.from_folder(folder)
    ckpt = Checkpoint(folder)
    try:
        experts = embedding = total = 0
        for name in ckpt.names():
            n = ckpt.info(name).nbytes
            total += n
            if ".mlp.experts." in name:
                experts += n
            elif name == "model.embed_tokens.weight" and (not cfg.tie_word_embeddings or "lm_head.weight" in ckpt):
                embedding += n
        disk = sum(f.stat().st_size for f in (*folder.glob("*.safetensors"), *folder.glob("*.kdpack")))
        if geom.layers:
            # the store's own slot arithmetic (policy "none" allocates nothing and reads no data)
            store = ExpertStore.from_checkpoint(ckpt, qcfg, dict(geom.n_experts), geom.hidden, geom.moe_inter,
                                                policy="none")
            try:
                expert_nbytes, slot_bytes, source = store.expert_nbytes, store.slot_bytes, store.source
            finally:
                store.close()
        else:
            expert_nbytes = slot_bytes = 0
            source = "none"
    finally:
        ckpt.close()
    return ModelSizes(
        folder=str(folder), disk_bytes=disk, resident_bytes=total - experts - embedding,
        embedding_bytes=embedding, expert_bytes=experts, expert_nbytes=expert_nbytes, slot_bytes=slot_bytes,
        n_experts=sum(geom.n_experts.values()), moe_layers=len(geom.layers), top_k=cfg.num_experts_per_tok,
        n_layers=cfg.num_hidden_layers,
        kv_bytes_per_token=cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2,
        max_ctx=int(cfg.max_position_embeddings or 0), expert_source=source)


@dataclass(frozen=True)
class ExpertCacheChoice:
    """Where the routed experts live. budget_bytes None: the OS page cache (mmap), no store."""
    budget_bytes: int | None
    direct_io: bool
    reason: str
    n_slots: int = 0
    auto: bool = True            # decided by the rule (False: the user gave a size)

    @property
    def mode(self) -> str:
        return "page cache" if self.budget_bytes is None else "expert store"

    def line(self) -> str:
        """The one line the CLI / engine prints."""
        if self.budget_bytes is None:
            return f"expert cache: OS page cache ({self.reason})"
        io = ", O_DIRECT" if self.direct_io else ""
        return f"expert cache: {gib(self.budget_bytes)} store, {self.n_slots} slots{io} ({self.reason})"

    def as_stats(self) -> dict:
        return {"expert_cache_mode": self.mode, "expert_cache_auto": self.auto,
                "expert_cache_direct_io": self.direct_io, "expert_cache_reason": self.reason}


def headroom_bytes(available: int) -> int:
    # available - headroom grows with available (slope >= 0.97): more RAM never plans less
    return max(HEADROOM_MIN, int(HEADROOM_SHARE * available))


def available_memory() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def decide(sizes: ModelSizes, requested_gb: float | None = None, available_bytes: int | None = None,
           ctx: int | None = None) -> ExpertCacheChoice:
    """The expert-cache decision on known sizes (choose_expert_cache reads them from a folder).

    requested_gb: None = auto (the rule in the module docstring), 0 = the page cache, > 0 = a store
    of that many GiB, capped at the experts' total. ValueError (in the user's terms, ready for the
    CLI to prefix with the flag's name) when the size is no number, holds less than one layer's
    top-k experts, or does not fit in the available memory beside the resident weights and KV cache.
    """
    avail = available_memory() if available_bytes is None else int(available_bytes)
    ctx = sizes.default_ctx() if ctx is None else int(ctx)
    headroom = headroom_bytes(avail)
    fixed = sizes.resident_bytes + sizes.kv_bytes(ctx)
    left = avail - headroom - fixed                       # what the experts may use
    if requested_gb is not None:
        if isinstance(requested_gb, bool) or not isinstance(requested_gb, (int, float)) \
                or not math.isfinite(requested_gb) or requested_gb < 0:
            raise ValueError(f"must be a number of GiB >= 0 (0: the OS page cache), got {requested_gb!r}")
        if requested_gb == 0:
            return ExpertCacheChoice(None, False, "asked for 0 GiB", auto=False)
        if sizes.n_experts == 0:
            return ExpertCacheChoice(None, False, "the model has no routed experts", auto=False)
        want = int(requested_gb * GIB)
        budget = min(want, sizes.store_cap_bytes)
        n_slots = budget // sizes.slot_bytes
        if n_slots < sizes.top_k:
            raise ValueError(
                f"{requested_gb:g} GiB holds {n_slots} expert{'s' if n_slots != 1 else ''}, fewer than the "
                f"{sizes.top_k} a token needs in one layer: give at least {gib(sizes.min_store_bytes)}, "
                f"or 0 for the OS page cache")
        if n_slots * sizes.slot_bytes + fixed > avail:
            raise ValueError(
                f"{requested_gb:g} GiB does not fit in memory: {gib(avail)} available, of which the resident "
                f"weights need {gib(sizes.resident_bytes)} and the KV cache ({ctx} tokens) "
                f"{gib(sizes.kv_bytes(ctx))}; at most {gib(max(0, avail - fixed))}")
        capped = want > sizes.store_cap_bytes
        reason = (f"asked for {requested_gb:g} GiB, capped at the model's {sizes.n_experts} experts" if capped
                  else f"asked for {requested_gb:g} GiB")
        # O_DIRECT pays when the page cache could not hold the experts beside the store anyway
        direct = sizes.expert_bytes > left - n_slots * sizes.slot_bytes
        return ExpertCacheChoice(n_slots * sizes.slot_bytes, direct, reason, n_slots, auto=False)
    where = (f"{gib(avail)} available, less {gib(sizes.resident_bytes)} resident weights, "
             f"{gib(sizes.kv_bytes(ctx))} KV cache ({ctx} tokens) and {gib(headroom)} headroom")
    if sizes.n_experts == 0:
        return ExpertCacheChoice(None, False, "the model has no routed experts")
    if sizes.expert_bytes <= left:
        return ExpertCacheChoice(None, False, f"the routed experts ({gib(sizes.expert_bytes)}) fit in {gib(left)}: "
                                              f"{where}")
    n_slots = min(max(left, 0) // sizes.slot_bytes, sizes.n_experts)
    if n_slots < sizes.top_k:
        return ExpertCacheChoice(None, False, f"too little memory for an expert store of at least "
                                              f"{gib(sizes.min_store_bytes)}: {where}")
    return ExpertCacheChoice(n_slots * sizes.slot_bytes, True,
                             f"the routed experts ({gib(sizes.expert_bytes)}) do not fit in {gib(left)}: {where}",
                             n_slots)


def choose_expert_cache(model_dir: str | os.PathLike, requested_gb: float | None = None,
                        available_bytes: int | None = None, ctx: int | None = None) -> ExpertCacheChoice:
    """The native engine's expert cache for a checkpoint folder (headers only); see decide()."""
    return decide(model_sizes(model_dir), requested_gb, available_bytes, ctx)


@dataclass(frozen=True)
class Plan:
    sizes: ModelSizes
    ram_bytes: int               # what the plan may use
    ram_source: str              # "--ram-gb" | "available now (psutil)"
    ctx: int
    headroom_bytes: int
    kv_bytes: int
    cache: ExpertCacheChoice
    hit_rate: float              # planned: the share of experts held in RAM (uniform routing)
    read_per_token: dict = field(default_factory=dict)   # hit rate -> expert bytes read per decoded token
    planned_read_per_token: int = 0
    disk_gbps: float | None = None
    warnings: tuple[str, ...] = ()

    @property
    def expert_ram_bytes(self) -> int:
        """RAM the plan gives the experts: the store, or the page cache holding all of them."""
        if self.cache.budget_bytes is not None:
            return self.cache.budget_bytes
        return self.sizes.expert_bytes if self.hit_rate >= 1.0 else 0

    @property
    def memory_bytes(self) -> int:
        """Everything planned: resident weights, KV cache, experts and headroom."""
        return self.sizes.resident_bytes + self.kv_bytes + self.expert_ram_bytes + self.headroom_bytes


def plan_memory(sizes: ModelSizes, ram_bytes: int | None = None, ctx: int | None = None,
                requested_gb: float | None = None, disk_gbps: float | None = None) -> Plan:
    """A plan on known sizes; ram_bytes None = what psutil says is available now."""
    source = "--ram-gb" if ram_bytes is not None else "available now (psutil)"
    ram = available_memory() if ram_bytes is None else int(ram_bytes)
    ctx = sizes.default_ctx() if ctx is None else int(ctx)
    choice = decide(sizes, requested_gb, ram, ctx)
    if sizes.n_experts == 0:
        hit = 1.0
    elif choice.budget_bytes is None:
        # page cache: all experts (it was chosen because they fit), or none (too little memory)
        hit = 1.0 if sizes.expert_bytes <= ram - headroom_bytes(ram) - sizes.resident_bytes - sizes.kv_bytes(ctx) \
            else 0.0
    else:
        hit = choice.n_slots / sizes.n_experts
    full = sizes.moe_layers * sizes.top_k * sizes.expert_nbytes
    table = {h: int(round((1 - h) * full)) for h in HIT_RATES}
    planned = int(round((1 - hit) * full))
    warnings = []
    need = sizes.resident_bytes + sizes.kv_bytes(ctx) + headroom_bytes(ram)
    if need > ram:
        warnings.append(f"not enough RAM for the resident weights: they need {gib(sizes.resident_bytes)}, the KV "
                        f"cache {gib(sizes.kv_bytes(ctx))} and headroom {gib(headroom_bytes(ram))}, "
                        f"{gib(need)} of {gib(ram)}")
    if ctx < sizes.max_ctx and need - sizes.kv_bytes(ctx) + sizes.kv_bytes(sizes.max_ctx) > ram:
        warnings.append(f"the model's full context ({sizes.max_ctx} tokens) needs a "
                        f"{gib(sizes.kv_bytes(sizes.max_ctx))} "
                        f"KV cache; this plan keeps {gib(sizes.kv_bytes(ctx))} for {ctx} (--ctx to change)")
    # the disk's speed only when told (sysfs "rotational" is 1 for the virtual disks of many VMs)
    gbps = disk_gbps
    if gbps is not None and planned > 0 and gbps * 1e9 / planned < MIN_TOK_S:
        warnings.append(f"disk slower than needed: at {gbps:g} GB/s, reading {planned / 1e9:.2f} GB of experts per "
                        f"token caps decode at {gbps * 1e9 / planned:.2f} tok/s")
    return Plan(sizes, ram, source, ctx, headroom_bytes(ram), sizes.kv_bytes(ctx), choice, hit, table, planned,
                gbps, tuple(warnings))


def plan_model(model_dir: str | os.PathLike, ram_bytes: int | None = None, ctx: int | None = None,
               requested_gb: float | None = None, disk_gbps: float | None = None) -> Plan:
    return plan_memory(model_sizes(model_dir), ram_bytes, ctx, requested_gb, disk_gbps)


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _rate(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_plan(p: Plan) -> str:
    s = p.sizes
    lines = [
        f"model: {s.folder}",
        f"memory: {gib(p.ram_bytes)} ({p.ram_source}); headroom for the OS and the process {gib(p.headroom_bytes)}",
        f"resident weights: {s.resident_bytes} bytes ({gib(s.resident_bytes)}): attention, dense and shared MLPs, "
        f"router, norms, lm_head",
        f"embedding: {gib(s.embedding_bytes)}, read by row from disk",
        f"KV cache: {s.kv_bytes_per_token} bytes per token ({s.n_layers} layers x latent + rope x 2 B, bf16); "
        f"{p.ctx} tokens: {p.kv_bytes} bytes ({gib(p.kv_bytes)})"
        + (f"; the model's full {s.max_ctx}: {gib(s.kv_bytes(s.max_ctx))}" if s.max_ctx > p.ctx else ""),
    ]
    if s.n_experts:
        lines.append(f"routed experts: {gib(s.expert_bytes)} "
                     f"({s.n_experts} experts in {_n(s.moe_layers, 'MoE layer')}, "
                     f"{s.expert_nbytes / 2**20:.2f} MiB each, slot {s.slot_bytes / 2**20:.2f} MiB; from the "
                     f"{s.expert_source})")
        c = p.cache
        if c.budget_bytes is None:
            lines.append(f"expert cache: none, the OS page cache serves the experts ({c.reason})")
        else:
            lines.append(f"expert cache: {c.budget_bytes} bytes ({gib(c.budget_bytes)}) = {c.n_slots} slots "
                         f"({p.hit_rate:.1%} of the experts){', O_DIRECT' if c.direct_io else ''} ({c.reason})")
    lines.append(f"disk: {s.disk_bytes} bytes ({gib(s.disk_bytes)}) of model files")
    if s.n_experts:
        full = p.read_per_token[0.0]
        lines.append(f"expert bytes read per decoded token ({_n(s.moe_layers, 'layer')} x {s.top_k} experts x "
                     f"{s.expert_nbytes / 1e6:.2f} MB = {_rate(full)} at 0% hits; per second, times tok/s):")
        rows = [(f"{p.hit_rate:.1%} (planned)", p.planned_read_per_token)]
        rows += [(f"{h:.0%}", v) for h, v in p.read_per_token.items() if h != p.hit_rate]
        for label, v in rows:
            cap = (f", decode at most {p.disk_gbps * 1e9 / v:.2f} tok/s at {p.disk_gbps:g} GB/s"
                   if p.disk_gbps is not None and v else "")
            lines.append(f"  hit rate {label:>15}: {_rate(v)}{cap}")
    lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)
