"""The expert-store read benchmark (python -m kimi_desktop.bench.store) runs end to end on a small checkpoint."""

from __future__ import annotations

from kimi_desktop.bench import store as bench_store


def test_store_bench_reads_every_expert_in_every_configuration(tmp_path, capsys):
    assert bench_store.main(["--dir", str(tmp_path / "scratch"), "--gb", "0.05"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("pread", "portable", "O_DIRECT",
                                                                               "none", "pack,"))]
    names = [name for name, _, _ in bench_store.RUNS + bench_store.PACK_RUNS]
    assert [ln[:34].rstrip() for ln in lines] == names
    assert all("'GB': 0.05," in ln for ln in lines)          # two K2-shaped INT4 experts, 49.6 MB
    assert not (tmp_path / "scratch").exists()              # the scratch folder is removed
