"""ReferenceGallery: nearest-neighbour search, persistence, learning at run time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge.infer.gallery import MAX_VIEWS, ReferenceGallery, nearest_sq_distance


def _patches(rng: np.random.Generator, c: int = 16, hw: int = 6) -> np.ndarray:
    p = rng.normal(size=(c, hw, hw)).astype(np.float32)
    return p / np.linalg.norm(p, axis=0, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (5, 4), elements=st.floats(-3, 3, width=32)),
       arrays(np.float32, (7, 4), elements=st.floats(-3, 3, width=32)))
def test_nearest_distance_matches_brute_force(q: np.ndarray, b: np.ndarray) -> None:
    """The GEMM formulation equals the brute-force minimum squared distance."""
    brute = ((q[:, None, :] - b[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    np.testing.assert_allclose(nearest_sq_distance(q, b), brute, rtol=1e-4, atol=1e-3)


def test_seen_view_scores_low_unseen_high_and_unknown_none(tmp_path: Path) -> None:
    """A reference scores ~0 against itself, a changed patch stands out at its place."""
    rng = np.random.default_rng(0)
    ref = _patches(rng)
    g = ReferenceGallery(tmp_path, top_k=1)
    g.add("P1", "top", ref)
    same = g.score("P1", "top", ref)
    assert same is not None
    assert same.score < 1e-3
    changed = ref.copy()
    changed[:, 2, 3] = _patches(rng)[:, 0, 0]
    res = g.score("P1", "top", changed)
    assert res is not None
    assert res.score > 0.3
    assert np.unravel_index(int(np.argmax(res.patch_map)), res.patch_map.shape) == (2, 3)
    assert g.score("P2", "top", ref) is None
    assert g.score("P1", "angled", ref) is None


def test_position_matters_for_moved_content(tmp_path: Path) -> None:
    """Content that appears elsewhere in the references but not here is still anomalous."""
    rng = np.random.default_rng(1)
    ref = _patches(rng, hw=8)
    moved = np.roll(ref, 4, axis=2)
    g = ReferenceGallery(None, top_k=4)
    g.add("P", "top", ref)
    assert g.score("P", "top", moved).score > g.score("P", "top", ref).score + 0.2  # type: ignore[union-attr]


def test_learned_references_persist_and_reload(tmp_path: Path) -> None:
    """Views added at run time are on disk and come back in a new gallery instance."""
    rng = np.random.default_rng(2)
    g = ReferenceGallery(tmp_path / "g")
    assert g.is_empty()
    g.add("P/weird id", "top", np.stack([_patches(rng), _patches(rng)]), views=2)
    g.add("P/weird id", "top", _patches(rng))
    again = ReferenceGallery(tmp_path / "g")
    assert again.products() == ("P/weird id",)
    assert again.views("P/weird id", "top") == 3
    assert again.has("P/weird id")
    assert not again.has(None)
    assert not list((tmp_path / "g").rglob("*.tmp"))


def test_bank_is_capped(tmp_path: Path) -> None:
    """A product's bank never exceeds max_patches however many views are learned."""
    rng = np.random.default_rng(3)
    g = ReferenceGallery(None, max_patches=50)
    for _ in range(5):
        g.add("P", "top", _patches(rng))
    assert g.views("P", "top") == 5
    res = g.score("P", "top", _patches(rng))
    assert res is not None
    assert np.isfinite(res.score)


def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    """A corrupt gallery file is logged and skipped; the rest of the gallery loads."""
    rng = np.random.default_rng(4)
    ReferenceGallery(tmp_path).add("A", "top", _patches(rng))
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "top.npz").write_bytes(b"junk")
    assert ReferenceGallery(tmp_path).products() == ("A",)


def test_empty_and_truncated_gallery_files_cost_only_their_own_references(
        tmp_path: Path) -> None:
    """What a power cut or a half-finished copy leaves: an empty file and a cut-off one.
    Both are skipped at start, and a reload keeps the bank it had for such a file; they used
    to stop the node (EOFError, BadZipFile)."""
    rng = np.random.default_rng(4)
    g = ReferenceGallery(tmp_path)
    g.add("A", "top", _patches(rng))
    g.add("B", "top", _patches(rng))
    whole = (tmp_path / "B" / "top.npz").read_bytes()
    (tmp_path / "B" / "top.npz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "top.npz").write_bytes(b"")
    assert ReferenceGallery(tmp_path).products() == ("A",)
    assert g.reload()["removed"] == 0  # a running gallery keeps what it had for B
    assert g.products() == ("A", "B")


def test_references_from_another_embedding_model_are_not_scored(tmp_path: Path) -> None:
    """A bank of 16-channel features scored with a 24-channel model: no anomaly score (the
    item is judged without the gallery) instead of an error that drops the whole batch."""
    rng = np.random.default_rng(9)
    g = ReferenceGallery(tmp_path)
    g.add("A", "top", _patches(rng, c=16))
    assert g.score("A", "top", _patches(rng, c=24)) is None
    assert g.score("A", "top", _patches(rng, c=16)) is not None
    g.add("A", "top", _patches(rng, c=24))  # feedback with the new model starts anew
    assert g.views("A", "top") == 1
    assert g.score("A", "top", _patches(rng, c=24)) is not None


def test_unwritable_gallery_keeps_learning_in_memory(tmp_path: Path) -> None:
    """If the gallery directory cannot be written, the reference still counts (logged error)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file in the way")
    g = ReferenceGallery(blocker)
    g.add("P", "top", _patches(np.random.default_rng(5)))
    assert g.has("P", "top")


def test_reload_takes_in_what_changed_on_disk(tmp_path: Path) -> None:
    """A reload (SIGHUP) sees banks copied in, grown or removed by another process, and
    keeps what the running gallery learned but could not write."""
    rng = np.random.default_rng(6)
    running = ReferenceGallery(tmp_path / "g")
    running.add("A", "top", _patches(rng))
    running.add("B", "top", _patches(rng))
    other = ReferenceGallery(tmp_path / "g")  # e.g. references from another node, copied in
    other.add("A", "top", _patches(rng))
    other.add("C", "angled", _patches(rng))
    (tmp_path / "g" / "B" / "top.npz").unlink()  # an operator resets B's references
    assert running.views("A", "top") == 1
    assert running.has("B", "top")
    assert not running.has("C")
    counts = running.reload()
    assert counts == {"added": 1, "changed": 1, "removed": 1, "unsaved": 0}
    assert running.views("A", "top") == 2
    assert not running.has("B")
    assert running.views("C", "angled") == 1
    res = running.score("C", "angled", _patches(rng))
    assert res is not None
    assert np.isfinite(res.score)


def test_a_view_learned_while_the_reload_reads_the_disk_is_kept(tmp_path: Path) -> None:
    """Feedback lands between the reload's read of the files and its swap: the new view stays
    (it used to vanish until the next reload, and the new packaging kept being sidelined)."""
    rng = np.random.default_rng(10)
    g = ReferenceGallery(tmp_path / "g")
    g.add("A", "top", _patches(rng))
    read = g._read

    def read_then_learn(unreadable: set[Path] | None = None) -> dict[tuple[str, str], object]:
        banks = read(unreadable)
        g.add("A", "top", _patches(rng))  # the feedback thread, mid-reload
        return banks  # type: ignore[return-value]

    g._read = read_then_learn  # type: ignore[method-assign]
    g.reload()
    assert g.views("A", "top") == 2


def test_reload_keeps_banks_whose_write_failed(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file in the way")
    g = ReferenceGallery(blocker)
    g.add("P", "top", _patches(np.random.default_rng(7)))
    assert g.reload() == {"added": 0, "changed": 0, "removed": 0, "unsaved": 1}
    assert g.views("P", "top") == 1


def test_reload_of_a_vanished_folder_forgets_nothing(tmp_path: Path) -> None:
    """A gallery folder that is gone (unmounted, renamed) must not wipe every product."""
    g = ReferenceGallery(tmp_path / "g")
    g.add("A", "top", _patches(np.random.default_rng(8)))
    (tmp_path / "g").rename(tmp_path / "elsewhere")
    assert g.reload() == {"added": 0, "changed": 0, "removed": 0, "unsaved": 0}
    assert g.views("A", "top") == 1


def test_banks_of_another_embedding_model_are_set_aside_with_their_views(
        tmp_path: Path) -> None:
    """Features of the same size from another embedding model are not scored (they would
    give meaningless distances); the views the bank was built from are still there to
    re-embed, and a rebuilt bank belongs to the new model on disk."""
    rng = np.random.default_rng(10)
    views = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
    old = ReferenceGallery(tmp_path, model="model-a")
    old.add("P", "top", np.stack([_patches(rng), _patches(rng)]), views=2, images=views)
    new = ReferenceGallery(tmp_path, model="model-b")
    assert not new.has("P", "top")
    assert new.score("P", "top", _patches(rng)) is None
    assert new.stale() == {("P", "top"): "model-a"}
    kept = new.stored_views("P", "top")
    assert len(kept) == 2
    assert all(np.array_equal(a, b) for a, b in zip(kept, views, strict=True))
    ref = _patches(rng)
    new.add("P", "top", ref, views=2, images=kept, replace=True)
    assert new.stale() == {}
    assert new.score("P", "top", ref).score < 1e-3  # type: ignore[union-attr]
    again = ReferenceGallery(tmp_path, model="model-b")
    assert again.views("P", "top") == 2
    assert len(again.stored_views("P", "top")) == 2
    # The old model's rows stay beside the new ones: a rollback scores as before.
    rolled_back = ReferenceGallery(tmp_path, model="model-a")
    assert rolled_back.stale() == {}
    assert rolled_back.has("P", "top")
    assert ReferenceGallery(tmp_path, model="model-c").stale() == {("P", "top"): "model-b"}


def test_kept_views_are_capped_to_the_latest(tmp_path: Path) -> None:
    """Feedback goes on for years: a bank keeps at most MAX_VIEWS views, the newest."""
    rng = np.random.default_rng(11)
    g = ReferenceGallery(tmp_path, model="m")
    for i in range(MAX_VIEWS + 3):
        g.add("P", "top", _patches(rng), images=[np.full((4, 4, 3), i, np.uint8)])
    kept = ReferenceGallery(tmp_path, model="m").stored_views("P", "top")
    assert len(kept) == MAX_VIEWS
    assert int(kept[-1][0, 0, 0]) == MAX_VIEWS + 2
    assert int(kept[0][0, 0, 0]) == 3


def test_a_bank_from_before_models_were_recorded_is_adopted(tmp_path: Path) -> None:
    """Files without a model are taken as the starting node's model's and say so once
    flushed, so that the next model change finds them stale instead of scoring against them;
    their rows stay as older releases read them."""
    rng = np.random.default_rng(12)
    (tmp_path / "P").mkdir()
    rows = ReferenceGallery(None)
    rows.add("P", "top", _patches(rng))
    bank = rows._banks[("P", "top")]
    np.savez(tmp_path / "P" / "top.npz", rows=bank.rows.astype(np.float16),
             product_id=np.str_("P"), camera_id=np.str_("top"), views=np.int64(1))
    assert ReferenceGallery(tmp_path, model="model-a").stale() == {("P", "top"): None}
    g = ReferenceGallery(tmp_path, model="model-a", adopt_unrecorded=True)
    assert g.has("P", "top")
    assert g.flush() == 0
    assert ReferenceGallery(tmp_path, model="model-b").stale() == {("P", "top"): "model-a"}
    with np.load(tmp_path / "P" / "top.npz") as data:
        np.testing.assert_array_equal(data["rows"], bank.rows.astype(np.float16))


def test_a_gallery_prepared_for_another_model_writes_nothing_until_flushed(
        tmp_path: Path) -> None:
    """A reload re-embeds beside the running gallery: the files stay the running model's
    until the switch (a refused model must leave them as they were)."""
    rng = np.random.default_rng(13)
    running = ReferenceGallery(tmp_path, model="model-a")
    running.add("P", "top", _patches(rng), images=[np.zeros((4, 4, 3), np.uint8)])
    prepared = running.for_model("model-b")
    assert prepared.stale() == {("P", "top"): "model-a"}
    prepared.add("P", "top", _patches(rng), images=prepared.stored_views("P", "top"),
                  persist=False, replace=True)
    assert ReferenceGallery(tmp_path, model="model-a").has("P", "top")
    assert prepared.flush() == 0
    assert ReferenceGallery(tmp_path, model="model-b").has("P", "top")
    assert len(ReferenceGallery(tmp_path, model="model-b").stored_views("P", "top")) == 1


def test_views_learned_while_a_reload_prepares_are_handed_over(tmp_path: Path) -> None:
    """The running gallery's journal names what it learned after a mark, and a gallery
    opened for another model carries over views the running one could not write yet."""
    rng = np.random.default_rng(14)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file in the way")
    running = ReferenceGallery(blocker, model="model-a")  # every write fails
    running.add("P", "top", _patches(rng), images=[np.zeros((4, 4, 3), np.uint8)])
    mark = running.journal_mark()
    prepared = running.for_model("model-b")
    assert prepared.stale() == {("P", "top"): "model-a"}
    assert len(prepared.stored_views("P", "top")) == 1  # unwritten, carried over
    running.add("Q", "top", _patches(rng), images=[np.ones((4, 4, 3), np.uint8)])
    assert [key for key, _ in running.learned_since(mark)] == [("Q", "top")]
