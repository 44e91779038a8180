"""The build's progress bar. A dataset with a known length (every non-streaming one) is counted in rows, so the bar
shows the total and an ETA, with the tokens built beside it; a streaming dataset has no length and is counted in
tokens. Only the main rank shows it."""

from __future__ import annotations

from typing import Any

from cache_tools.format import packing


class BuildProgress:
    def __init__(self, total_rows: int | None, *, enabled: bool, rank: int) -> None:
        from tqdm.auto import tqdm

        self.by_rows = total_rows is not None
        self.tokens = 0
        self.kept_shards = 0
        self._bar: Any = tqdm(total=total_rows, unit="row" if self.by_rows else "tok", unit_scale=not self.by_rows,
                              desc=f"teacher cache (rank {rank})", disable=not enabled, dynamic_ncols=True)

    def advance(self, windows: list[packing.Window], tokens: int) -> None:
        """`windows` were built (or kept) with `tokens` valid tokens. Rows: a window records the first row it holds,
        so the count trails by at most the rows of one window."""
        self.tokens += tokens
        if not self.by_rows:
            self._bar.update(tokens)
            return
        rows_done = max(w.doc_index for w in windows) + 1
        self._bar.update(max(0, rows_done - self._bar.n))
        kept = f", kept {self.kept_shards} finished shard(s)" if self.kept_shards else ""
        self._bar.set_postfix_str(f"{self._bar.format_sizeof(self.tokens)} tokens{kept}", refresh=False)

    def keep(self, windows: list[packing.Window], tokens: int) -> None:
        """A finished shard of an interrupted build, kept: counted, so a resumed bar starts where the last one was."""
        self.kept_shards += 1
        if not self.by_rows:
            self._bar.set_postfix_str(f"kept {self.kept_shards} finished shard(s)", refresh=False)
        self.advance(windows, tokens)

    def close(self) -> None:
        self._bar.close()
