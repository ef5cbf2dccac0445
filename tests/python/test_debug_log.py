"""The CPU lines of the debug log (ORCHARD_DEBUG_FLASH_ATN=1).

A forward's variant names the operands and tiles the kernel really ran, and the region trace
(`cpu_regions=... [tasks=... team=... wall_us=... start_us=... busy_us=...]`, the parallel regions
the call started) agrees with it: the forward's last region runs one task per (batch, query head,
row block), so its task count is b * h * ceil(sq / br). The trace's times are checked for sense
(a participant's start and busy time fit in its region's wall time, the regions in the call).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

import orchard

VARIANT = re.compile(r"variant=cpu_fwd_(fp64|fp32|fp32split3amx|bf16amx|bf16dot)_tiled_br(\d+)_bc(\d+)_")
REGION = re.compile(r"\[tasks=(\d+) team=(\d+) wall_us=(\d+)(?: start_us=(\d+)/(\d+) busy_us=(\d+)/(\d+))?\]")


def _log_lines(tmp_path, monkeypatch, call):
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    call()
    return (tmp_path / f"orchard_flash_attn_{os.getpid()}.log").read_text().splitlines()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,s", [(1, 8, 512), (2, 3, 200), (1, 1, 64)])
def test_forward_line_names_its_tiles_and_regions(tmp_path, monkeypatch, dtype, b, h, s):
    q, k, v = (torch.randn(b, h, s, 64, dtype=dtype) for _ in range(3))
    lines = _log_lines(tmp_path, monkeypatch, lambda: orchard.scaled_dot_product_attention(q, k, v))
    assert len(lines) == 1 and lines[0].startswith("FWD #"), lines
    line = lines[0]
    variant = VARIANT.search(line)
    assert variant, line
    operands, br = variant.group(1), int(variant.group(2))
    assert (operands == "fp64") == (dtype == torch.float64), line
    assert operands.startswith("bf16") <= (dtype == torch.bfloat16), line

    regions = REGION.findall(line)
    assert f"cpu_regions={len(regions)} " in line, line
    if torch.get_num_threads() > 1:  # one thread: every region runs serially, still traced
        assert regions, line
    if regions:
        assert int(regions[-1][0]) == b * h * math.ceil(s / br), (br, line)
    total = float(re.search(r"cpu_region_us=(\d+)", line).group(1))
    elapsed_us = 1000 * float(re.search(r"elapsed_ms=(\S+)$", line).group(1))
    assert sum(int(r[2]) for r in regions) == pytest.approx(total, abs=len(regions))
    assert total <= elapsed_us + 1, line
    for tasks, team, wall, start_median, start_max, busy_median, busy_max in regions:
        assert 1 <= int(team) <= max(torch.get_num_threads(), 1), line
        if busy_max:  # times from the region's start, rounded to whole µs
            assert int(start_median) <= int(start_max) <= int(wall) + 1, line
            assert int(busy_median) <= int(busy_max) <= int(wall) + 1, line


def test_backward_and_decode_lines_carry_the_trace(tmp_path, monkeypatch):
    q, k, v = (torch.randn(1, 4, 256, 32, requires_grad=True) for _ in range(3))
    cache = torch.randn(2, 512, 4, 32)

    def calls():
        orchard.scaled_dot_product_attention(q, k, v).sum().backward()
        orchard.flash_attn_with_kvcache(torch.randn(2, 1, 4, 32), cache, cache.clone(),
                                         cache_seqlens=torch.tensor([300, 17], dtype=torch.int32))

    lines = _log_lines(tmp_path, monkeypatch, calls)
    assert [ln.split()[0] for ln in lines] == ["FWD", "BWD", "DECODE"], lines
    for line in lines:
        assert re.search(r" cpu_regions=\d+ cpu_region_us=\d+ cpu_outside_us=\d+", line), line
    assert re.search(r"variant=cpu_bwd_fp32_tiled_br\d+_bc\d+_", lines[1]), lines[1]
    assert lines[1].rstrip().split()[-1].startswith("elapsed_ms=")
    assert lines[2].rstrip().split()[-1].startswith("host_ms=")
