"""LAION caption datamodule: real-format parquet fixtures, cleaning, shuffling, DDP sharding, resume, errors."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.laion import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    LAIONCaptionDataModule,
    LAIONDataError,
    read_captions,
    style_caption,
)

NSFW_CYCLE = ("UNLIKELY", "UNLIKELY", "UNSURE", "NSFW")


def laion_table(texts, start_id: int = 0, size_type=pa.int32(), nsfw=None, columns=None) -> pa.Table:
    """An 8-column LAION-400M metadata table in the real column order and dtypes (docs/formats.md §2)."""
    n = len(texts)
    nsfw = nsfw if nsfw is not None else [NSFW_CYCLE[i % 4] for i in range(n)]
    size = (lambda v: v) if pa.types.is_integer(size_type) else float
    data = {
        "SAMPLE_ID": pa.array(range(start_id, start_id + n), pa.int64()),
        "URL": pa.array([f"https://example.com/{start_id + i}.jpg" for i in range(n)], pa.string()),
        "TEXT": pa.array(texts, pa.string()),
        "HEIGHT": pa.array([size(256 + i) for i in range(n)], size_type),
        "WIDTH": pa.array([size(320 + i) for i in range(n)], size_type),
        "LICENSE": pa.array(["?"] * n, pa.string()),
        "NSFW": pa.array(nsfw, pa.string()),
        "similarity": pa.array([0.3 + 0.001 * i for i in range(n)], pa.float64()),
    }
    names = columns or list(data)
    return pa.table({k: data[k] for k in names})


def write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")
    return path


def captions_for(prefix: str, n: int) -> list:
    """Real-looking captions with some null, empty and whitespace-only TEXT rows mixed in."""
    out = []
    for i in range(n):
        if i % 7 == 3:
            out.append(None)
        elif i % 11 == 5:
            out.append("")
        elif i % 13 == 6:
            out.append("   \t")
        else:
            out.append(f"  {prefix} caption number {i} of a dog on a beach  " if i % 2 else f"{prefix} photo {i}")
    return out


@pytest.fixture(scope="module")
def laion_dir(tmp_path_factory) -> Path:
    """Two part files like laion400m-meta: HEIGHT/WIDTH int32 in one, float64 in the other."""
    root = tmp_path_factory.mktemp("laion") / "laion400m-meta"
    write(laion_table(captions_for("alpha", 40), 0, pa.int32()), root / "part-00000-5b54c5d5-c000.snappy.parquet")
    write(laion_table(captions_for("beta", 34), 1000, pa.float64()), root / "part-00001-5b54c5d5-c000.snappy.parquet")
    return root


def expected_captions(texts, drop=()) -> list[str]:
    out = []
    for i, t in enumerate(texts):
        if t is None or not t.strip() or NSFW_CYCLE[i % 4] in drop:
            continue
        out.append(t.strip())
    return out


ALL = expected_captions(captions_for("alpha", 40)) + expected_captions(captions_for("beta", 34))


def dm(laion_dir, tmp_path, **kw) -> LAIONCaptionDataModule:
    kw.setdefault("cache_dir", str(tmp_path / "hf"))
    return LAIONCaptionDataModule(str(laion_dir), **kw)


def loader_batches(loader):
    return [(b["caption"], b["index"].tolist()) for b in loader]


def test_reads_both_dtypes_and_drops_null_and_empty(laion_dir, tmp_path):
    caps = read_captions(laion_dir, cache_dir=str(tmp_path / "hf"))
    assert caps.column_names == ["caption"]
    assert list(caps["caption"]) == ALL  # file order, stripped, nulls/empties/whitespace gone
    # a file, a glob and a list name the same files
    one = read_captions(sorted(laion_dir.glob("*.parquet"))[0], cache_dir=str(tmp_path / "hf"))
    assert list(one["caption"]) == expected_captions(captions_for("alpha", 40))
    globbed = read_captions(str(laion_dir / "part-*.parquet"), cache_dir=str(tmp_path / "hf"))
    assert list(globbed["caption"]) == ALL
    # a second read comes from the cache (same Arrow files, no new map)
    again = read_captions([str(p) for p in sorted(laion_dir.glob("*.parquet"))], cache_dir=str(tmp_path / "hf"))
    assert list(again["caption"]) == ALL
    assert [f["filename"] for f in again.cache_files] == [f["filename"] for f in caps.cache_files]


def test_nsfw_and_length_filters(laion_dir, tmp_path):
    cache = str(tmp_path / "hf")
    no_nsfw = list(read_captions(laion_dir, drop_nsfw=True, cache_dir=cache)["caption"])
    assert no_nsfw == expected_captions(captions_for("alpha", 40), ("NSFW",)) + expected_captions(captions_for("beta", 34), ("NSFW",))
    strict = list(read_captions(laion_dir, drop_nsfw="unsure", cache_dir=cache)["caption"])
    assert strict == expected_captions(captions_for("alpha", 40), ("NSFW", "UNSURE")) + expected_captions(
        captions_for("beta", 34), ("NSFW", "UNSURE")
    )
    assert len(strict) < len(no_nsfw) < len(ALL)
    short = list(read_captions(laion_dir, max_length=15, cache_dir=cache)["caption"])
    assert short == [c for c in ALL if len(c) <= 15] and short
    long = list(read_captions(laion_dir, min_length=16, cache_dir=cache)["caption"])
    assert long == [c for c in ALL if len(c) >= 16] and long
    capped = list(read_captions(laion_dir, max_captions=5, cache_dir=cache)["caption"])
    assert capped == ALL[:5]
    with pytest.raises(ValueError, match="drop_nsfw"):
        read_captions(laion_dir, drop_nsfw="maybe", cache_dir=cache)
    with pytest.raises(ValueError, match="min_length 20 is larger than max_length 10"):
        read_captions(laion_dir, min_length=20, max_length=10, cache_dir=cache)


def test_seeded_shuffle_is_deterministic(laion_dir, tmp_path):
    a = loader_batches(dm(laion_dir, tmp_path, batch_size=8, seed=3).train_dataloader())
    b = loader_batches(dm(laion_dir, tmp_path, batch_size=8, seed=3).train_dataloader())
    c = loader_batches(dm(laion_dir, tmp_path, batch_size=8, seed=4).train_dataloader())
    assert a == b
    assert a != c
    flat = [i for _, idx in a for i in idx]
    assert sorted(flat) == list(range(len(ALL)))  # one epoch: every caption once
    assert flat != sorted(flat)
    caps = [c for cap, _ in a for c in cap]
    assert caps == [ALL[i] for i in flat]  # "index" is the caption's position in the caption set


def test_validation_holdout(laion_dir, tmp_path):
    d = dm(laion_dir, tmp_path, batch_size=4, val_captions=6, seed=1)
    train = {i for _, idx in loader_batches(d.train_dataloader()) for i in idx}
    val = [i for _, idx in loader_batches(d.val_dataloader()) for i in idx]
    assert len(val) == 6 and not train & set(val) and train | set(val) == set(range(len(ALL)))
    assert val == sorted(d.val_indices.tolist())
    other = dm(laion_dir, tmp_path, val_captions=6, seed=2)
    other.setup()
    assert sorted(other.val_indices.tolist()) != val
    assert dm(laion_dir, tmp_path).val_dataloader() == []
    with pytest.raises(LAIONDataError, match="leaves no training caption"):
        dm(laion_dir, tmp_path, val_captions=len(ALL)).setup()


@pytest.mark.parametrize("val_captions", [0, 1])
def test_two_ranks_see_disjoint_captions(laion_dir, tmp_path, val_captions):
    n_train = len(ALL) - val_captions
    seen = []
    for rank in (0, 1):
        d = dm(laion_dir, tmp_path, batch_size=5, seed=7, val_captions=val_captions)
        d.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = d.train_dataloader()
        assert loader.sampler.rank == rank and loader.sampler.world_size == 2
        seen.append([i for _, idx in loader_batches(loader) for i in idx])
    r0, r1 = map(set, seen)
    assert len(seen[0]) == len(r0) and len(seen[1]) == len(r1)  # no repeats within a rank
    assert not r0 & r1  # no caption on both ranks
    # all training captions are covered, except the (n_train % 2) left out so that no rank pads by repeating
    assert len(r0 | r1) == n_train - n_train % 2
    assert (r0 | r1) <= set(dm(laion_dir, tmp_path, val_captions=val_captions, seed=7).train_indices.tolist())


def test_resume_continues_at_the_exact_batch(laion_dir, tmp_path):
    full = loader_batches(dm(laion_dir, tmp_path, batch_size=4, seed=5).train_dataloader())
    per_epoch = len(full)
    epoch1 = dm(laion_dir, tmp_path, batch_size=4, seed=5).train_dataloader()
    epoch1.sampler.set_epoch(1)
    full += loader_batches(epoch1)
    for processed in (3, per_epoch + 2):
        d = dm(laion_dir, tmp_path, batch_size=4, seed=5)
        progress = SimpleNamespace(total=SimpleNamespace(processed=processed))
        d.trainer = SimpleNamespace(
            global_rank=0, world_size=1, limit_train_batches=1.0,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        )
        loader = d.train_dataloader()
        resumed = loader_batches(loader)
        assert resumed == full[processed : (processed // per_epoch + 1) * per_epoch]


def test_caption_styles():
    assert style_caption("a dog on a beach", 0, "none") == "a dog on a beach"
    objects = {style_caption("a dog on a beach", i, "object", seed=0) for i in range(200)}
    assert objects == {t.format("dog on a beach") for t in OBJECT_TEMPLATES}  # every variant used, no "a a"
    styles = {style_caption("Van Gogh", i, "style", seed=0) for i in range(200)}
    assert styles == {t.format("Van Gogh") for t in STYLE_TEMPLATES}
    both = [style_caption("cat", i, "both", seed=0) for i in range(200)]
    assert any("style of" in s for s in both) and any("style of" not in s for s in both)
    # deterministic per (index, seed), and the seed matters
    assert [style_caption("cat", i, "both", 1) for i in range(50)] == [style_caption("cat", i, "both", 1) for i in range(50)]
    assert [style_caption("cat", i, "both", 1) for i in range(50)] != [style_caption("cat", i, "both", 2) for i in range(50)]
    with pytest.raises(ValueError, match="caption_style"):
        style_caption("cat", 0, "poem")


def test_datamodule_rewrites_captions_stably(laion_dir, tmp_path):
    d = dm(laion_dir, tmp_path, batch_size=8, caption_style="object", seed=0)
    batches = loader_batches(d.train_dataloader())
    for caps, idx in batches:
        for c, i in zip(caps, idx):
            assert c == style_caption(ALL[i], i, "object", 0)
            assert c.startswith(("a ", "an "))
    # the text of a caption does not depend on the epoch or the order it comes in
    again = dm(laion_dir, tmp_path, batch_size=3, caption_style="object", seed=0, shuffle=False)
    texts = {i: c for caps, idx in loader_batches(again.train_dataloader()) for c, i in zip(caps, idx)}
    assert texts == {i: c for caps, idx in batches for c, i in zip(caps, idx)}


def test_caption_set_key(laion_dir, tmp_path):
    base = dm(laion_dir, tmp_path).caption_set_key()
    assert base == dm(laion_dir, tmp_path, batch_size=3, val_captions=4).caption_set_key()  # loaders don't matter
    assert len(base) == 16
    changed = [
        dm(laion_dir, tmp_path, drop_nsfw=True),
        dm(laion_dir, tmp_path, drop_nsfw="unsure"),
        dm(laion_dir, tmp_path, min_length=3),
        dm(laion_dir, tmp_path, max_length=50),
        dm(laion_dir, tmp_path, max_captions=10),
        dm(laion_dir, tmp_path, caption_style="object"),
        dm(laion_dir, tmp_path, caption_style="style"),
    ]
    keys = [d.caption_set_key() for d in changed]
    assert base not in keys and len(set(keys)) == len(keys)
    # the seed only matters when it picks caption variants
    assert dm(laion_dir, tmp_path, seed=9).caption_set_key() == base
    assert dm(laion_dir, tmp_path, caption_style="both", seed=1).caption_set_key() != dm(
        laion_dir, tmp_path, caption_style="both", seed=2
    ).caption_set_key()
    # the files matter: a touched (re-downloaded) file changes the key
    first = sorted(laion_dir.glob("*.parquet"))[0]
    st = first.stat()
    try:
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert dm(laion_dir, tmp_path).caption_set_key() != base
    finally:
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_file_without_text_column_lists_its_columns(tmp_path):
    path = write(
        laion_table(["x"] * 3, columns=["SAMPLE_ID", "URL", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"]),
        tmp_path / "bad" / "part-00000.parquet",
    )
    with pytest.raises(LAIONDataError) as err:
        read_captions(path, cache_dir=str(tmp_path / "hf"))
    msg = str(err.value)
    assert str(path) in msg and "no TEXT column" in msg and "'SAMPLE_ID', 'URL', 'HEIGHT'" in msg


def test_nsfw_filter_without_nsfw_column(tmp_path):
    path = write(laion_table(["a cat"] * 3, columns=["URL", "TEXT", "WIDTH", "HEIGHT", "similarity"]), tmp_path / "laion2b.parquet")
    assert list(read_captions(path, cache_dir=str(tmp_path / "hf"))["caption"]) == ["a cat"] * 3
    with pytest.raises(LAIONDataError, match="no NSFW column"):
        read_captions(path, drop_nsfw=True, cache_dir=str(tmp_path / "hf"))


def test_all_null_file_is_named(laion_dir, tmp_path):
    folder = tmp_path / "mixed"
    good = write(laion_table(["a cat", "a dog"]), folder / "part-00000.parquet")
    bad = write(laion_table([None, "", "  ", None]), folder / "part-00001.parquet")
    with pytest.raises(LAIONDataError) as err:
        read_captions(folder, cache_dir=str(tmp_path / "hf"))
    msg = str(err.value)
    assert str(bad) in msg and str(good) not in msg
    assert "4 rows, 2 null TEXT, 2 empty TEXT" in msg
    # filters that leave nothing are reported the same way
    nsfw_only = write(laion_table(["a", "b"], nsfw=["NSFW", "NSFW"]), tmp_path / "nsfw" / "part-00000.parquet")
    with pytest.raises(LAIONDataError, match=r"2 tagged NSFW"):
        read_captions(nsfw_only, drop_nsfw=True, cache_dir=str(tmp_path / "hf"))


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(LAIONDataError, match="file not found"):
        read_captions(tmp_path / "nope.parquet", cache_dir=str(tmp_path / "hf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LAIONDataError, match=r"holds no \*\.parquet"):
        read_captions(tmp_path / "empty", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(LAIONDataError, match="glob matches no files"):
        read_captions(str(tmp_path / "none-*.parquet"), cache_dir=str(tmp_path / "hf"))
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(LAIONDataError, match="cannot be read as a parquet file"):
        read_captions(junk, cache_dir=str(tmp_path / "hf"))


def test_rewritten_file_is_read_again(tmp_path):
    path = write(laion_table(["one", "two"]), tmp_path / "part-00000.parquet")
    assert list(read_captions(path, cache_dir=str(tmp_path / "hf"))["caption"]) == ["one", "two"]
    write(laion_table(["three", None, "four"]), path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # a later mtime, as a re-download has
    assert list(read_captions(path, cache_dir=str(tmp_path / "hf"))["caption"]) == ["three", "four"]
