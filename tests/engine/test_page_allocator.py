"""dash_kernels._C.PageAllocator: every state transition, the invariants, and that misuse is a ValueError.

Run: .venv/bin/python -m pytest tests/engine/test_page_allocator.py -q
"""

import random

import pytest
import torch

import dash_kernels
from dash_kernels import _C

assert dash_kernels.HAS_C, "dash_kernels._C failed to import; rebuild with `pip install -e . --no-build-isolation`"


def ids(*xs):
    return torch.tensor(xs, dtype=torch.long)


def check_invariants(a, live):
    """ref count of a page == number of live page tables holding it; free pages are exactly those with ref 0."""
    holders = [0] * a.num_pages
    for s in live:
        table = a.page_table(s)
        assert len(table) == a.pages_for(a.num_tokens(s))
        for p in table:
            holders[p] += 1
    assert [a.ref_count(p) for p in range(a.num_pages)] == holders
    assert a.num_free_pages == sum(h == 0 for h in holders)
    assert a.num_seqs == len(live)


def test_allocate_gives_contiguous_slots_per_page():
    a = _C.PageAllocator(8, 4)
    slots = a.allocate(ids(0, 1), ids(6, 3))
    assert slots.dtype == torch.int32
    t0, t1 = a.page_table(0), a.page_table(1)
    assert len(t0) == 2 and len(t1) == 1
    expect = [t0[i // 4] * 4 + i % 4 for i in range(6)] + [t1[0] * 4 + i for i in range(3)]
    assert slots.tolist() == expect
    assert a.num_free_pages == 5 and a.can_allocate(20) and not a.can_allocate(21)
    check_invariants(a, [0, 1])


def test_append_takes_new_page_only_at_boundary():
    a = _C.PageAllocator(4, 4)
    a.allocate(ids(0), ids(3))
    slots, table, lens, src, dst = a.append(ids(0))  # token 3: still page 0
    assert slots.tolist() == [3] and lens.tolist() == [4] and table.tolist() == [[0]] and src.numel() == 0
    assert a.pages_needed_for_append(ids(0)) == 1
    slots, table, lens, _, _ = a.append(ids(0), min_width=3, pad=-1)  # token 4 opens page 1
    assert slots.tolist() == [4] and lens.tolist() == [5] and table.tolist() == [[0, 1, -1]]
    check_invariants(a, [0])


def test_fork_shares_pages_and_copy_on_write_of_partial_page():
    G, prompt, page = 4, 10, 4  # 2 full prompt pages + a partial one
    a = _C.PageAllocator(16, page)
    a.allocate(ids(0), ids(prompt))
    a.fork(0, ids(1, 2, 3))
    shared = a.page_table(0)
    assert all(a.page_table(c) == shared for c in range(G))
    assert all(a.ref_count(p) == G for p in shared)
    assert a.num_free_pages == 16 - 3  # the prompt's pages once, not G times
    check_invariants(a, range(G))
    # First decode step: every writer of the shared partial page but the last copies it.
    assert a.pages_needed_for_append(ids(0, 1, 2, 3)) == G - 1
    slots, table, lens, src, dst = a.append(ids(0, 1, 2, 3))
    assert src.tolist() == [shared[2]] * (G - 1) and len(set(dst.tolist())) == G - 1
    assert lens.tolist() == [prompt + 1] * G
    tables = table.tolist()
    assert all(t[:2] == shared[:2] for t in tables)  # full prompt pages stay shared
    assert len({t[2] for t in tables}) == G and tables[-1][2] == shared[2]  # the last writer kept the original
    assert len(set(slots.tolist())) == G  # nobody writes another sequence's slot
    assert a.ref_count(shared[0]) == G and a.ref_count(shared[2]) == 1
    assert a.num_free_pages == 16 - 3 - (G - 1)
    check_invariants(a, range(G))


def test_partial_writers_count_when_not_all_holders_append():
    a = _C.PageAllocator(8, 4)
    a.allocate(ids(0), ids(2))
    a.fork(0, ids(1, 2))
    assert a.pages_needed_for_append(ids(1)) == 1  # page still held by 0 and 2 afterwards
    assert a.pages_needed_for_append(ids(0, 1, 2)) == 2
    _, _, _, src, dst = a.append(ids(1))
    assert src.tolist() == [a.page_table(0)[0]] and dst.tolist() == a.page_table(1)
    check_invariants(a, [0, 1, 2])


def test_fork_on_page_boundary_needs_no_copy():
    a = _C.PageAllocator(8, 4)
    a.allocate(ids(0), ids(8))
    a.fork(0, ids(1))
    _, table, _, src, _ = a.append(ids(0, 1))
    assert src.numel() == 0 and table[0, :2].tolist() == table[1, :2].tolist() and table[0, 2] != table[1, 2]
    check_invariants(a, [0, 1])


def test_free_releases_only_unshared_pages():
    a = _C.PageAllocator(8, 4)
    a.allocate(ids(0), ids(6))
    a.fork(0, ids(1))
    a.free(ids(0))
    assert a.num_free_pages == 6 and not a.has_seq(0)  # pages still held by 1
    check_invariants(a, [1])
    a.free(ids(1))
    assert a.num_free_pages == 8
    check_invariants(a, [])


@pytest.mark.parametrize("misuse", [
    lambda a: a.free(ids(0)),                      # double free
    lambda a: a.free(ids(1, 1)),                   # the same sequence twice in one call
    lambda a: a.free(ids(7)),                      # never allocated
    lambda a: a.append(ids(0)),                    # append after free
    lambda a: a.append(ids(1, 1)),
    lambda a: a.fork(0, ids(2)),                   # fork of a freed parent
    lambda a: a.fork(1, ids(1)),                   # child id already live
    lambda a: a.allocate(ids(1), ids(3)),          # id already live
    lambda a: a.allocate(ids(5), ids(0)),          # empty sequence
    lambda a: a.allocate(ids(5), ids(1000)),       # more pages than free
    lambda a: a.allocate(ids(5, 5), ids(1, 1)),
    lambda a: a.allocate(ids(5), torch.tensor([3], dtype=torch.int32)),  # wrong dtype
    lambda a: a.allocate_cached(ids(5), ids(1, 2), ids(3)),  # tokens do not match lens
    lambda a: a.allocate_cached(ids(1), ids(1, 2, 3), ids(3)),  # id already live
    lambda a: a.allocate_cached(ids(5), ids(*range(100)), ids(100)),  # more pages than free
    lambda a: a.ref_count(99),
    lambda a: a.num_tokens(0),
], ids=["double_free", "free_dup", "free_unknown", "append_freed", "append_dup", "fork_freed", "fork_live_child",
        "allocate_live", "allocate_empty", "allocate_oom", "allocate_dup", "wrong_dtype", "cached_tokens_len",
        "cached_live", "cached_oom", "bad_page", "freed_query"])
def test_misuse_is_value_error_and_leaves_state_intact(misuse):
    a = _C.PageAllocator(8, 4)
    a.allocate(ids(0, 1), ids(5, 3))
    a.free(ids(0))

    def state():
        return (a.num_free_pages, a.page_table(1), a.num_tokens(1), [a.ref_count(p) for p in range(8)],
                a.num_cached_pages)

    before = state()
    with pytest.raises(ValueError, match="PageAllocator"):
        misuse(a)
    assert before == state()


def test_append_out_of_pages_is_atomic():
    a = _C.PageAllocator(2, 2)
    a.allocate(ids(0, 1), ids(2, 2))  # both full, no free page
    assert a.pages_needed_for_append(ids(0, 1)) == 2
    with pytest.raises(ValueError, match="out of pages"):
        a.append(ids(0, 1))
    assert a.num_tokens(0) == 2 and a.num_tokens(1) == 2
    a.free(ids(1))  # eviction frees room
    a.append(ids(0))
    check_invariants(a, [0])


def test_constructor_rejects_bad_sizes():
    for args in [(0, 4), (4, 0), (2**30, 16)]:
        with pytest.raises(ValueError):
            _C.PageAllocator(*args)


def test_random_walk_keeps_invariants():
    """Random allocate / fork / append / free sequences; invariants hold after every call."""
    rng = random.Random(0)
    a = _C.PageAllocator(40, 3)
    live, next_id = [], 0
    for _ in range(400):
        op = rng.random()
        if op < 0.25 and a.can_allocate(7):
            a.allocate(ids(next_id), ids(rng.randint(1, 7)))
            live.append(next_id)
            next_id += 1
        elif op < 0.4 and live:
            kids = list(range(next_id, next_id + rng.randint(1, 3)))
            a.fork(rng.choice(live), torch.tensor(kids))
            live += kids
            next_id += len(kids)
        elif op < 0.8 and live:
            batch = rng.sample(live, rng.randint(1, len(live)))
            while batch and a.pages_needed_for_append(torch.tensor(batch)) > a.num_free_pages:
                victim = batch.pop()  # evict, as the scheduler does
                a.free(ids(victim))
                live.remove(victim)
            if batch:
                before = {s: a.num_tokens(s) for s in batch}
                free_before = a.num_free_pages
                need = a.pages_needed_for_append(torch.tensor(batch))
                slots, *_ = a.append(torch.tensor(batch))
                assert a.num_free_pages == free_before - need  # the estimate is exact
                assert all(a.num_tokens(s) == before[s] + 1 for s in batch)
                assert len(set(slots.tolist())) == len(batch)
                for s, slot in zip(batch, slots.tolist()):  # the written page is private to its sequence
                    assert a.ref_count(slot // 3) == 1 and slot // 3 == a.page_table(s)[-1]
        elif live:
            victim = rng.choice(live)
            a.free(ids(victim))
            live.remove(victim)
        check_invariants(a, live)


# ---- prefix caching (allocate_cached) ----

def test_cached_allocation_shares_full_pages_within_a_call():
    a = _C.PageAllocator(16, 4)
    A = list(range(10, 20))                         # pages [10..13] [14..17] [18 19]
    B = list(range(10, 18)) + [99, 98, 97]          # same two full pages, then its own
    slots, cached = a.allocate_cached(ids(0, 1), torch.tensor(A + B), ids(10, 11))
    assert cached.tolist() == [0, 8]
    t0, t1 = a.page_table(0), a.page_table(1)
    assert t1[:2] == t0[:2] and t1[2] != t0[2]
    assert slots.tolist() == [t0[i // 4] * 4 + i % 4 for i in range(10)] + [t1[2] * 4 + i for i in range(3)]
    assert a.num_free_pages == 16 - 4 and a.num_cached_pages == 2  # only full pages are named
    check_invariants(a, [0, 1])


def test_freed_named_pages_are_revived_by_a_later_call():
    a = _C.PageAllocator(8, 4)
    prompt = list(range(3, 13))  # 2 full pages + 2 tokens
    a.allocate_cached(ids(0), torch.tensor(prompt), ids(10))
    first = a.page_table(0)
    a.free(ids(0))
    assert a.num_free_pages == 8 and a.num_cached_pages == 2  # free, but still holding their K/V
    slots, cached = a.allocate_cached(ids(1), torch.tensor(prompt), ids(10))
    assert cached.tolist() == [8] and a.page_table(1)[:2] == first[:2]
    assert slots.tolist() == [a.page_table(1)[2] * 4 + i for i in range(2)]  # only the last 2 tokens are computed
    assert a.num_free_pages == 8 - 3
    check_invariants(a, [1])


def test_last_token_is_always_computed():
    a = _C.PageAllocator(8, 4)
    prompt = list(range(3, 11))  # exactly 2 full pages
    a.allocate_cached(ids(0), torch.tensor(prompt), ids(8))
    slots, cached = a.allocate_cached(ids(1), torch.tensor(prompt), ids(8))
    assert cached.tolist() == [4] and slots.numel() == 4  # page 2 holds the last token: recomputed, never a full hit
    check_invariants(a, [0, 1])


def test_same_page_after_a_different_prefix_is_not_a_hit():
    a = _C.PageAllocator(8, 4)
    a.allocate_cached(ids(0), torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9]), ids(9))
    _, cached = a.allocate_cached(ids(1), torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9]), ids(9))
    assert cached.tolist() == [0]  # page 2 matches token for token, but its prefix does not


def test_reusing_a_free_named_page_for_new_content_drops_its_name():
    a = _C.PageAllocator(3, 2)
    a.allocate_cached(ids(0), torch.tensor([5, 6, 7]), ids(3))  # names page 0 ([5, 6])
    a.free(ids(0))
    a.allocate(ids(1), ids(6))  # needs all 3 pages: the named one is overwritten
    assert a.num_cached_pages == 0
    a.free(ids(1))
    _, cached = a.allocate_cached(ids(2), torch.tensor([5, 6, 7]), ids(3))
    assert cached.tolist() == [0]
    check_invariants(a, [2])


def test_random_walk_cache_content_is_exact():
    """A simulated KV pool records which token and position each slot holds. After every call each live sequence's
    pages must hold exactly its own tokens, whether they were computed or taken from the cache."""
    rng = random.Random(1)
    page = 3
    a = _C.PageAllocator(30, page)
    pool = {}  # slot -> (token, position)
    live, toks, next_id = [], {}, 0
    prefixes = [[rng.randrange(4) for _ in range(rng.randint(0, 9))] for _ in range(4)]
    hits = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.35:
            batch = []
            for _ in range(rng.randint(1, 3)):
                seq = rng.choice(prefixes) + [rng.randrange(4) for _ in range(rng.randint(1, 4))]
                batch.append((next_id, seq))
                next_id += 1
            lens = ids(*[len(t) for _, t in batch])
            flat = torch.tensor([x for _, t in batch for x in t])
            if sum(a.pages_for(len(t)) for _, t in batch) > a.num_free_pages:
                continue
            free_before = a.num_free_pages
            slots, cached = a.allocate_cached(ids(*[s for s, _ in batch]), flat, lens)
            assert a.num_free_pages <= free_before
            it = iter(slots.tolist())
            for (s, t), c in zip(batch, cached.tolist()):
                assert c % page == 0 and c < len(t)
                hits += c > 0
                for pos in range(c, len(t)):
                    pool[next(it)] = (t[pos], pos)  # the step computes and stores these
                live.append(s)
                toks[s] = t
        elif op < 0.55 and live:
            s = rng.choice(live)  # decode one token
            if a.pages_needed_for_append(ids(s)) <= a.num_free_pages:
                slot, *_ = a.append(ids(s))
                toks[s] = toks[s] + [rng.randrange(4)]
                pool[int(slot[0])] = (toks[s][-1], len(toks[s]) - 1)
        elif live:
            s = rng.choice(live)
            a.free(ids(s))
            live.remove(s)
        check_invariants(a, live)
        for s in live:
            table = a.page_table(s)
            assert [pool.get(table[i // page] * page + i % page) for i in range(len(toks[s]))] == \
                [(x, i) for i, x in enumerate(toks[s])]
    assert hits > 50  # the walk really exercised the cache
