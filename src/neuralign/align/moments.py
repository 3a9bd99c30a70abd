"""Streaming moments of paired unit activations (the statistics behind activation matching):
float64 totals, float32 GEMMs for the cross-products, reused scratch buffers."""

from __future__ import annotations

import torch

from neuralign.errors import DataError


class _Scratch:
    """Reusable float buffers for the per-batch temporaries of a statistics pass: a fresh
    multi-megabyte tensor per probe and batch costs page faults (the allocator returns large
    blocks to the system) that are a sizeable part of the pass; one buffer per shape does not."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, slot: int, rows: int, size: int, like: torch.Tensor) -> torch.Tensor:
        key = (slot, size, like.dtype, like.device)
        buf = self.bufs.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = self.bufs[key] = torch.empty(rows, size, dtype=like.dtype, device=like.device)
        return buf[:rows]


class ActivationStats:
    """Streaming first and second moments of paired unit activations.

    Totals are kept in float64 about a fixed per-unit shift, each batch's sums taken in the
    activations' precision, the cross-products by GEMMs accumulating in float32 over up to
    ``FLUSH_ROWS`` rows (a batch, or several small ones) before joining the float64 total.
    When the first batch's means lie within ``RAW_MEANS`` standard deviations of zero in every
    unit (activations after ReLU or a norm layer) the shift is zero and the sums are taken on
    the raw activations (no centred copies): the
    float64 totals then lose nothing to the means. Otherwise the shift is the first batch's
    means and each batch is centred first (into ``scratch``'s reused buffers), so that large
    means cost no precision either.
    """

    RAW_MEANS = 4.0
    FLUSH_ROWS = 4096  # cross-products of up to this many rows are summed in float32 (by the
    # GEMM, as one batch of that many rows would be) before joining the float64 total: a
    # conversion and addition of the whole square per batch of a wide linear layer cost more
    # than a tenth of its pass

    def __init__(self, size: int):
        self.size, self.n = size, 0
        self.sa = self.sb = self.saa = self.sbb = self._sab = None
        self._part, self._part_rows = None, 0  # cross-products not yet in ``_sab``
        self.shift_a = self.shift_b = None
        self.raw = False

    def _flush(self) -> None:
        if self._part_rows:
            self._sab = self._sab + self._part  # not in place: may run outside inference mode
            self._part_rows = 0

    @property
    def sab(self) -> torch.Tensor | None:
        """The float64 sum of the (shifted) cross-products ``a_i b_j`` over every row seen."""
        self._flush()
        return self._sab

    def affine(self, ka: torch.Tensor, ta: torch.Tensor, kb: torch.Tensor, tb: torch.Tensor
               ) -> ActivationStats:
        """The statistics of ``(ka * a + ta, kb * b + tb)`` (per unit), exactly from these:
        about the shifts ``k * shift + t`` the totals are ``k`` (``k k'``) times the old ones."""
        out = ActivationStats(self.size)
        out.n, out.derived = self.n, True
        if self.n == 0:
            return out
        sab = self.sab
        ka, ta, kb, tb = (v.to(sab.device, torch.float64) for v in (ka, ta, kb, tb))
        out.shift_a, out.shift_b = ka * self.shift_a + ta, kb * self.shift_b + tb
        out.sa, out.sb, out.saa, out.sbb = (ka * self.sa, kb * self.sb, ka * ka * self.saa,
                                            kb * kb * self.sbb)
        out._sab = sab * torch.outer(ka, kb)
        return out

    derived = False

    def update(self, za: torch.Tensor, zb: torch.Tensor, scratch: _Scratch | None = None) -> None:
        if self.derived:
            raise RuntimeError("these statistics were derived from others (ActivationStats."
                               "affine) and take no more data; update the ones they came from")
        za, zb = za.float(), zb.float()
        if self.shift_a is None:
            ma, mb = za.mean(0), zb.mean(0)
            va, vb = ((z - m).square_().mean(0) for z, m in ((za, ma), (zb, mb)))
            self.raw = bool((ma.square() <= self.RAW_MEANS ** 2 * va).all()
                            and (mb.square() <= self.RAW_MEANS ** 2 * vb).all())
            self.shift_a, self.shift_b = (torch.zeros_like(ma), torch.zeros_like(mb)) \
                if self.raw else (ma, mb)
            dev = za.device
            self.sa, self.sb, self.saa, self.sbb = (
                torch.zeros(self.size, dtype=torch.float64, device=dev) for _ in range(4))
            self._sab = torch.zeros(self.size, self.size, dtype=torch.float64, device=dev)
        scratch = scratch if scratch is not None else _Scratch()
        rows = za.shape[0]
        if self.raw:
            ca, cb = za, zb
        else:
            ca = torch.sub(za, self.shift_a, out=scratch.get(0, rows, self.size, za))
            cb = torch.sub(zb, self.shift_b, out=scratch.get(1, rows, self.size, zb))
        self.n += rows
        self.sa += ca.sum(0)
        self.sb += cb.sum(0)
        # squares into a reused buffer, then a column sum: several times cheaper than the
        # diagonal of a Gram GEMM for every width (a narrow GEMM is no faster than a wide one)
        sq = scratch.get(2, rows, self.size, za)
        self.saa += torch.mul(ca, ca, out=sq).sum(0)
        self.sbb += torch.mul(cb, cb, out=sq).sum(0)
        if self._part_rows == 0:
            self._part = torch.mm(ca.T, cb, out=self._part)
        else:
            self._part.addmm_(ca.T, cb)
        self._part_rows += rows
        if self._part_rows >= self.FLUSH_ROWS:
            self._flush()

    def _moments(self):
        if self.n == 0:
            raise DataError("no activations were recorded; is the loader empty?")
        return self.sa / self.n, self.sb / self.n

    def cov(self) -> torch.Tensor:
        ma, mb = self._moments()
        return (self.sab / self.n - torch.outer(ma, mb)).cpu()

    def corr(self) -> torch.Tensor:
        ma, mb = self._moments()
        va = (self.saa / self.n - ma * ma).clamp_min(0).cpu()
        vb = (self.sbb / self.n - mb * mb).clamp_min(0).cpu()
        denom = torch.outer(va.sqrt(), vb.sqrt())
        c = self.cov() / denom.clamp_min(1e-12)
        return torch.where(denom > 1e-12, c, torch.zeros_like(c))
