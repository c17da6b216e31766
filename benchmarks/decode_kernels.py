"""Triton kernels of the decode benchmark's own small ops (``sparsity_decode_gpu.py``), outside the FFN.

They are not part of ffnkit: they make the part of the step that dense and sparse share (attention, norms)
about as fast as a tuned decoder's, so that the FFN's share of the step is what it would be in one. Each is
checked against its eager formulation by the benchmark before it is timed. Kernels are defined on first
use, so that the CPU smoke test needs no Triton.

- ``attn_core_triton``: rotary, KV-cache write and GQA attention of one token in one launch, one program
  per KV head looping over the cache.
- ``attn_core_split``: the same split over the cache positions as well (flash-decoding): each program
  attends over one block of positions, writes its (max, sum, output) partials, and the last program of
  each KV head to finish (a ticket) merges them, so there is still one launch and no host sync.
- ``add_rms_norm``: the residual add and the next RMSNorm in one program (the compiled one, in Triton, so
  that it can take part in programmatic dependent launch).
- ``argmax``: the greedy choice over the vocabulary in one launch of many programs (the compiled argmax
  is one long single-program reduction: about 30 us over 128,256 logits on an H200).
- ``partials_add_rms_norm``: the residual add and the next RMSNorm, taking the gather FFN's unreduced
  float32 partial sums (``launch_fused_1(partials=True)``) instead of its output: the sum over the
  partials happens in this launch, which removes the FFN's separate reduce launch. The programs each sum
  a slice of the columns; the last one to finish (a ticket) normalises the whole row. Measured in the 8B
  decode: no gain over the separate reduce (results/sparsity_decode_h200_partials.json).

Inside ``ffnkit.kernels.programmatic_launch()`` they launch with programmatic dependent launch, as
ffnkit's decode kernels do: each loads what the kernel just before does not write (norm weights, the
cached keys and values of past positions), waits for that kernel, then lets the next one launch.
"""

from __future__ import annotations

import torch

_KERNELS: dict = {}


def _kernels() -> dict:
    """Compile-on-first-use: the kernels below as {name: jitted function}."""
    global triton, tl, _rotary, _rotary_tables, _rotary_queries, pdl_wait, sum_partials  # the JIT's names
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    from ffnkit.kernels.triton_sparse_ffn import pdl_wait, sum_partials

    @triton.jit
    def _rotary_tables(cos_ptr, sin_ptr, HD: tl.constexpr):
        """(d, the rotated-half index of d, its sign, cos, sin) of one position, float32 (device code)."""
        d = tl.arange(0, HD)
        half: tl.constexpr = HD // 2
        cs = tl.load(cos_ptr + d).to(tl.float32)
        sn = tl.load(sin_ptr + d).to(tl.float32)
        return d, (d + half) % HD, tl.where(d < half, -1.0, 1.0), cs, sn

    @triton.jit
    def _rotary_queries(
        qkv_ptr, kv, d, dr, sign, cs, sn, G: tl.constexpr, HD: tl.constexpr, BG: tl.constexpr
    ):
        """The G query heads of KV head kv after rotary, [BG, HD] float32, their offsets and mask (device code)."""
        g = tl.arange(0, BG)
        mg = g < G
        qoff = (kv * G + g) * HD  # [BG]
        q = tl.load(qkv_ptr + qoff[:, None] + d[None, :], mask=mg[:, None], other=0.0).to(tl.float32)
        qr = tl.load(qkv_ptr + qoff[:, None] + dr[None, :], mask=mg[:, None], other=0.0).to(tl.float32)
        return q * cs[None, :] + sign[None, :] * qr * sn[None, :], qoff, mg

    @triton.jit
    def _rotary(ptr, d, dr, sign, cs, sn):
        """[..., HD] float32 rotary of the head(s) at ``ptr`` (device code)."""
        x = tl.load(ptr + d).to(tl.float32)
        xr = tl.load(ptr + dr).to(tl.float32)
        return x * cs + sign * xr * sn

    @triton.jit
    def _decode_attn_kernel(
        qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, L, scale,
        H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """One KV head per program: rotary of its key and of its G queries, the KV-cache write of the new token,
        then online-softmax attention over positions <= pos (one launch for the whole attention core)."""
        pdl_wait(PDL)
        kv = tl.program_id(0)
        p = tl.load(pos_ptr)
        d, dr, sign, cs, sn = _rotary_tables(cos_ptr, sin_ptr, HD)
        k_rot = _rotary(qkv_ptr + (H + kv) * HD, d, dr, sign, cs, sn)
        cache = kv * L * HD
        tl.store(k_ptr + cache + p * HD + d, k_rot.to(k_ptr.dtype.element_ty))
        vn = tl.load(qkv_ptr + (H + KV + kv) * HD + d)
        tl.store(v_ptr + cache + p * HD + d, vn)
        q, qoff, mg = _rotary_queries(qkv_ptr, kv, d, dr, sign, cs, sn, G, HD, BG)
        q = q.to(k_ptr.dtype.element_ty)  # [BG, HD]
        tl.debug_barrier()  # the cache write above is read below by other threads of this program
        m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BG], dtype=tl.float32)
        acc = tl.zeros([BG, HD], dtype=tl.float32)
        for l0 in range(0, L, BL):
            lo = l0 + tl.arange(0, BL)
            ml = (lo <= p) & (lo < L)
            kb = tl.load(
                k_ptr + cache + lo[:, None] * HD + d[None, :], mask=ml[:, None], other=0.0
            )  # [BL, HD]
            s = tl.dot(q, tl.trans(kb)) * scale  # [BG, BL]
            s = tl.where(ml[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            vb = tl.load(v_ptr + cache + lo[:, None] * HD + d[None, :], mask=ml[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(pr.to(vb.dtype), vb)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(o_ptr + qoff[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty), mask=mg[:, None])

    @triton.jit
    def _decode_attn_split_kernel(
        qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, ml_ptr, acc_ptr, ticket_ptr, L, scale,
        H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr,
        NS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (kv, s): the G queries of KV head kv over cache positions [s BL, (s+1) BL) below pos, plus
        (s = 0) the new token from registers, which s = 0 also writes into the cache. The partials go to
        ml_ptr [KV, NS, 2, BG] (running max, sum) and acc_ptr [KV, NS, BG, HD]; the last of the NS programs of
        a KV head merges them into o and re-arms the head's ticket."""
        kv = tl.program_id(0)
        sp = tl.program_id(1)
        p = tl.load(pos_ptr)
        d, dr, sign, cs, sn = _rotary_tables(cos_ptr, sin_ptr, HD)
        cache = kv * L * HD
        lo = sp * BL + tl.arange(0, BL)
        ml = lo < p  # past positions: written by earlier steps, readable before the wait
        kb = tl.load(k_ptr + cache + lo[:, None] * HD + d[None, :], mask=ml[:, None], other=0.0)  # [BL, HD]
        vb = tl.load(v_ptr + cache + lo[:, None] * HD + d[None, :], mask=ml[:, None], other=0.0)
        pdl_wait(PDL)
        k_new = _rotary(qkv_ptr + (H + kv) * HD, d, dr, sign, cs, sn).to(k_ptr.dtype.element_ty)  # [HD]
        v_new = tl.load(qkv_ptr + (H + KV + kv) * HD + d)  # [HD]
        if sp == 0:  # no program reads position pos from the cache in this step: no barrier needed
            tl.store(k_ptr + cache + p * HD + d, k_new)
            tl.store(v_ptr + cache + p * HD + d, v_new)
        q, qoff, mg = _rotary_queries(qkv_ptr, kv, d, dr, sign, cs, sn, G, HD, BG)
        q = q.to(k_ptr.dtype.element_ty)  # [BG, HD]
        g = tl.arange(0, BG)
        s = tl.dot(q, tl.trans(kb)) * scale  # [BG, BL]
        s = tl.where(ml[None, :], s, float("-inf"))
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # [BG]
        s_new = tl.where(sp == 0, s_new, float("-inf"))
        m = tl.maximum(tl.max(s, axis=1), s_new)  # [BG], -inf for an empty block
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        pr = tl.exp(s - m_safe[:, None])
        w_new = tl.exp(s_new - m_safe)
        acc = tl.dot(pr.to(vb.dtype), vb) + w_new[:, None] * v_new.to(tl.float32)[None, :]  # [BG, HD]
        l_i = tl.sum(pr, axis=1) + w_new
        slot = kv * NS + sp
        tl.store(ml_ptr + slot * 2 * BG + g, m)
        tl.store(ml_ptr + slot * 2 * BG + BG + g, l_i)
        tl.store(acc_ptr + slot * BG * HD + g[:, None] * HD + d[None, :], acc)
        tl.debug_barrier()  # every thread's partials are written before the ticket is taken
        if tl.atomic_add(ticket_ptr + kv, 1, sem="acq_rel") == NS - 1:
            m_all = tl.full([BG], float("-inf"), dtype=tl.float32)
            for j in tl.static_range(NS):
                m_all = tl.maximum(m_all, tl.load(ml_ptr + (kv * NS + j) * 2 * BG + g, cache_modifier=".cg"))
            den = tl.zeros([BG], dtype=tl.float32)
            o = tl.zeros([BG, HD], dtype=tl.float32)
            for j in tl.static_range(NS):
                base = (kv * NS + j) * 2 * BG
                w = tl.exp(tl.load(ml_ptr + base + g, cache_modifier=".cg") - m_all)  # 0 for an empty block
                den += w * tl.load(ml_ptr + base + BG + g, cache_modifier=".cg")
                part = tl.load(
                    acc_ptr + (kv * NS + j) * BG * HD + g[:, None] * HD + d[None, :], cache_modifier=".cg"
                )
                o += w[:, None] * part
            o = o / den[:, None]
            tl.store(o_ptr + qoff[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty), mask=mg[:, None])
            tl.store(ticket_ptr + kv, 0)

    @triton.jit
    def _add_norm_kernel(
        h_ptr, d_ptr, w_ptr, h_out_ptr, y_ptr, D, eps, BLOCK_D: tl.constexpr, PDL: tl.constexpr
    ):
        """h' = h + delta (in h's dtype), y = RMSNorm(h') * w: one program for the row."""
        od = tl.arange(0, BLOCK_D)
        md = od < D
        w = tl.load(w_ptr + od, mask=md, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        x = tl.load(h_ptr + od, mask=md, other=0.0).to(tl.float32)
        x += tl.load(d_ptr + od, mask=md, other=0.0).to(tl.float32)
        hn = x.to(h_out_ptr.dtype.element_ty)
        tl.store(h_out_ptr + od, hn, mask=md)
        x = hn.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        tl.store(y_ptr + od, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=md)

    @triton.jit(do_not_specialize=["N"])
    def _argmax_kernel(x_ptr, pm_ptr, pi_ptr, out_ptr, ticket_ptr, N, BLOCK: tl.constexpr, NP: tl.constexpr,
                       PDL: tl.constexpr):  # fmt: skip
        """out[0] = the first index of the largest of x[:N]: each program finds its block's (max, first index),
        the last to finish (a ticket) reduces those and re-arms the ticket."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        pdl_wait(PDL)
        v = tl.load(x_ptr + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
        mx = tl.max(v, axis=0)
        tl.store(pm_ptr + pid, mx)
        tl.store(pi_ptr + pid, tl.min(tl.where(v == mx, offs, N), axis=0))
        tl.debug_barrier()  # every thread's stores are issued before the ticket is taken
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            op = tl.arange(0, NP)
            mp = op < tl.num_programs(0)
            pv = tl.load(pm_ptr + op, mask=mp, other=float("-inf"), cache_modifier=".cg")
            pix = tl.load(pi_ptr + op, mask=mp, other=N, cache_modifier=".cg")
            gm = tl.max(pv, axis=0)
            tl.store(out_ptr, tl.min(tl.where(pv == gm, pix, N), axis=0).to(tl.int64))
            tl.store(ticket_ptr, 0)

    @triton.jit(do_not_specialize=["S", "D"])
    def _partials_add_norm_kernel(
        part_ptr, h_ptr, w_ptr, h_out_ptr, y_ptr, ss_ptr, ticket_ptr, S, D, eps,
        BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """h' = h + sum_s part[s] (rounded to h's dtype, as an add of the FFN output would be), y = RMSNorm(h')
        * w. Each program owns BLOCK columns; the last to finish normalises the row and re-arms the sum of
        squares and the ticket (both start at zero)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        delta = (
            sum_partials(part_ptr, offs, m, S, D, BLOCK, BLOCK_S).to(h_ptr.dtype.element_ty).to(tl.float32)
        )
        hn = (tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32) + delta).to(h_out_ptr.dtype.element_ty)
        tl.store(h_out_ptr + offs, hn, mask=m)
        hf = hn.to(tl.float32)
        tl.atomic_add(ss_ptr, tl.sum(hf * hf, axis=0), sem="release")
        tl.debug_barrier()  # every thread's h' is stored before the ticket is taken
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            total = tl.atomic_add(ss_ptr, 0.0, sem="acquire")
            rstd = 1.0 / tl.sqrt(total / D + eps)
            od = tl.arange(0, BLOCK_D)
            md = od < D
            x = tl.load(h_out_ptr + od, mask=md, other=0.0, cache_modifier=".cg").to(tl.float32)
            w = tl.load(w_ptr + od, mask=md, other=0.0).to(tl.float32)
            tl.store(y_ptr + od, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=md)
            tl.store(ss_ptr, 0.0)
            tl.store(ticket_ptr, 0)

    _KERNELS.update(
        attn=_decode_attn_kernel, attn_split=_decode_attn_split_kernel, add_norm=_add_norm_kernel,
        partials_add_norm=_partials_add_norm_kernel, argmax=_argmax_kernel,
    )  # fmt: skip
    return _KERNELS


_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(key: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed buffer made once per (key, device); the kernels that use it leave it zero again."""
    k = (key, n, dtype, device)
    if k not in _ZEROS:
        _ZEROS[k] = torch.zeros(n, dtype=dtype, device=device)
    return _ZEROS[k]


def _pdl_kw(device: torch.device) -> dict:
    """The PDL constexpr and launch option of a kernel launched now (ffnkit's programmatic_launch mode)."""
    from ffnkit.kernels.triton_sparse_ffn import pdl_args

    return pdl_args(device)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float = 1e-5):
    """(h + delta, RMSNorm(h + delta) * w) for one row [1, D] in one program."""
    d = h.shape[-1]
    h_out, y = torch.empty_like(h), torch.empty_like(h)
    _kernels()["add_norm"][(1,)](
        h, delta, w, h_out, y, d, eps, BLOCK_D=1 << (d - 1).bit_length(), **_pdl_kw(h.device), num_warps=8
    )
    return h_out, y


def argmax(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The first index of the largest logit of one row [1, V], as int64 [1] (``logits.argmax(-1)``)."""
    n = logits.shape[-1]
    programs = -(-n // block)
    out = torch.empty(1, device=logits.device, dtype=torch.int64)
    pm = torch.empty(programs, device=logits.device, dtype=torch.float32)
    pi = torch.empty(programs, device=logits.device, dtype=torch.int32)
    _kernels()["argmax"][(programs,)](
        logits, pm, pi, out, _zeros("argmax_ticket", 1, torch.int32, logits.device), n,
        BLOCK=block, NP=1 << (programs - 1).bit_length(), **_pdl_kw(logits.device), num_warps=4,
    )  # fmt: skip
    return out


def _group_block(heads: int, kv_heads: int) -> int:
    return max(16, 1 << (heads // kv_heads - 1).bit_length())  # tl.dot needs >= 16 rows


def attn_core_triton(qkv, cos, sin, k_cache, v_cache, pos, shape: dict) -> torch.Tensor:
    """Rotary + cache write + GQA attention of one token in one launch; one program per KV head."""
    h, kvh, hd = shape["HEADS"], shape["KV_HEADS"], shape["HEAD_DIM"]
    o = torch.empty(1, h * hd, device=qkv.device, dtype=qkv.dtype)
    _kernels()["attn"][(kvh,)](
        qkv, cos, sin, k_cache, v_cache, pos, o, k_cache.shape[2], hd**-0.5,
        H=h, KV=kvh, G=h // kvh, HD=hd, BG=_group_block(h, kvh), BL=64, **_pdl_kw(qkv.device), num_warps=4,
    )  # fmt: skip
    return o


def attn_core_split(qkv, cos, sin, k_cache, v_cache, pos, shape: dict, block: int = 64) -> torch.Tensor:
    """The same, one program per (KV head, block of ``block`` cache positions), merged in the launch."""
    h, kvh, hd = shape["HEADS"], shape["KV_HEADS"], shape["HEAD_DIM"]
    length = k_cache.shape[2]
    ns = -(-length // block)
    bg = _group_block(h, kvh)
    o = torch.empty(1, h * hd, device=qkv.device, dtype=qkv.dtype)
    ml = torch.empty(kvh * ns * 2 * bg, device=qkv.device, dtype=torch.float32)
    acc = torch.empty(kvh * ns * bg * hd, device=qkv.device, dtype=torch.float32)
    ticket = _zeros("attn_ticket", kvh, torch.int32, qkv.device)
    _kernels()["attn_split"][(kvh, ns)](
        qkv, cos, sin, k_cache, v_cache, pos, o, ml, acc, ticket, length, hd**-0.5,
        H=h, KV=kvh, G=h // kvh, HD=hd, BG=bg, BL=block, NS=ns, **_pdl_kw(qkv.device), num_warps=4,
    )  # fmt: skip
    return o


def partials_add_rms_norm(
    part: torch.Tensor, h: torch.Tensor, w: torch.Tensor, eps: float, block: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + sum(part), RMSNorm(h + sum(part)) * w) in one launch; part: [S, 1, D] float32, h: [1, D]."""
    s, d = part.shape[0], part.shape[-1]
    h_out, y = torch.empty_like(h), torch.empty_like(h)
    block_s = min(max(2, 1 << (s - 1).bit_length()), 8192 // block)
    _kernels()["partials_add_norm"][(-(-d // block),)](
        part, h, w, h_out, y, _zeros("norm_ss", 1, torch.float32, h.device),
        _zeros("norm_ticket", 1, torch.int32, h.device), s, d, eps,
        BLOCK=block, BLOCK_S=block_s, BLOCK_D=1 << (d - 1).bit_length(), num_warps=4,
    )  # fmt: skip
    return h_out, y
