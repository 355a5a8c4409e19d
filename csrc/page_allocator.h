// KV page allocator of the paged sampler: free list, per-page reference counts, per-sequence page tables, group fork
// with copy-on-write of a shared partial page, and prefix caching of full prompt pages (allocate_cached).
// Bound as dash_kernels._C.PageAllocator (pybind11). Files: this header (the class and its invariants),
// page_allocator.cpp (free list, allocate / fork / append / free, the binding), page_allocator_prefix.cpp
// (allocate_cached: planning prefix-cache hits), prefix_index.h (naming full pages by their tokens).
//
// Why C++: the scheduler touches every live sequence on every decode step (one new slot each, sometimes a new page,
// sometimes a copy-on-write). In Python that is ~1 us per sequence; here it is a few ns, and the results come back as
// ready int32 tensors (slot mapping, padded page table, context lengths, copy pairs) with no per-sequence Python.
//
// Invariants (checked by tests/engine/test_page_allocator.py):
//   * ref_[p] == number of page tables that contain p; a page is on the free list iff ref_[p] == 0.
//   * A sequence's page table has exactly ceil(num_tokens / page_size) pages.
//   * A page written by append() belongs to that sequence alone (ref 1): a shared last page is copied first.
//   * A page named by the prefix index (csrc/prefix_index.h) holds exactly the tokens it is named by: the name is
//     dropped whenever the page is handed out again. A freed named page stays on the free list with its K/V, so a
//     later prompt with the same prefix revives it instead of recomputing it.
// Python never sees a reference count it could decrement: pages are released only through free(seq_id), which forgets
// the sequence, so a second free (or any use of a freed id) is a ValueError, never an underflow.
// Every mutating call validates all of its inputs before changing anything, so a ValueError leaves the state intact.
// The CPU paged attention that reads these pages in place (decode and prefill) is csrc/paged_attention_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "prefix_index.h"

namespace dash {

struct Sequence {
  std::vector<int32_t> pages;  // page table: logical page i of the sequence -> physical page
  int64_t num_tokens = 0;      // tokens whose K/V have a slot
};

class PageAllocator {
 public:
  PageAllocator(int64_t num_pages, int64_t page_size);

  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return page_size_; }
  int64_t num_free_pages() const { return num_free_; }
  int64_t num_cached_pages() const { return index_.size(); }
  int64_t num_seqs() const { return static_cast<int64_t>(seqs_.size()); }
  bool has_seq(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  int64_t pages_for(int64_t num_tokens) const { return (num_tokens + page_size_ - 1) / page_size_; }
  bool can_allocate(int64_t num_tokens) const { return pages_for(num_tokens) <= num_free_pages(); }
  int64_t num_tokens(int64_t seq_id) const { return get(seq_id).num_tokens; }
  std::vector<int32_t> page_table(int64_t seq_id) const { return get(seq_id).pages; }
  int64_t ref_count(int64_t page) const;

  // New sequences with lens[i] tokens each (a prefill). Returns the slot of every token, packed: [sum(lens)] int32.
  at::Tensor allocate(const at::Tensor& seq_ids, const at::Tensor& lens);

  // allocate() with prefix caching. tokens: [sum(lens)] int64, the sequences' tokens packed. Full pages whose chained
  // hash and tokens match a named page (from an earlier call, or an earlier sequence of this call) are shared instead
  // of recomputed; every full page this call writes is named for later ones. At least the last token of each sequence
  // is always computed (its logits are sampled). Returns (slots [sum(lens - cached)] int32 of the tokens to compute,
  // packed; cached [B] int64 tokens taken from the cache per sequence, a multiple of page_size).
  std::vector<at::Tensor> allocate_cached(const at::Tensor& seq_ids, const at::Tensor& tokens, const at::Tensor& lens);

  // Children share every page of the parent (full prompt pages and the partial last one) by reference count; the
  // partial page is copied lazily by the first append() that would write into it while it is shared.
  void fork(int64_t parent, const at::Tensor& child_ids);

  // Free pages one append() on these sequences would take. Exact: a shared page is copied by every writer but the
  // last one, which finds itself the sole owner and writes in place.
  int64_t pages_needed_for_append(const at::Tensor& seq_ids) const;

  // One decode step: give each sequence the slot for its next token (new page at a page boundary, copy-on-write of a
  // shared last page) and return (slots[B], page_table[B, W] padded with `pad`, context_lens[B], cow_src[n],
  // cow_dst[n]), all int32. context_lens counts the new token; W = max pages over the batch (>= min_width).
  std::vector<at::Tensor> append(const at::Tensor& seq_ids, int64_t min_width, int64_t pad);

  // Padded page tables without changing anything: [B, max(W, min_width)] int32.
  at::Tensor page_tables(const at::Tensor& seq_ids, int64_t min_width, int64_t pad) const;

  // Finish or eviction: drop the sequences and return pages nobody else references to the free list.
  void free(const at::Tensor& seq_ids);

 private:
  static constexpr int64_t kRootEntry = INT64_MIN;  // plan entry "before the first page" (see allocate_cached)

  const Sequence& get(int64_t seq_id) const;
  // Inputs of allocate / allocate_cached: B new, distinct sequences of positive length. Returns sum(lens).
  int64_t check_new_seqs(const int64_t* ids, const int64_t* n, int64_t B, int64_t num_lens) const;
  void check_free_pages(int64_t need, const char* what) const;
  void release(int32_t p);
  void revive(int32_t p);
  int32_t take_page();
  int32_t slot(const Sequence& s, int64_t t) const {
    return static_cast<int32_t>(s.pages[t / page_size_] * page_size_ + t % page_size_);
  }

  int64_t num_pages_, page_size_;
  std::vector<int32_t> ref_;     // [num_pages] reference count of each page
  std::vector<uint32_t> stamp_;  // [num_pages] times the page was freed (validates free-list entries)
  std::deque<std::pair<int32_t, uint32_t>> free_;  // (page, stamp) FIFO; may hold stale entries, see release()
  int64_t num_free_ = 0;          // pages with ref 0 (the live entries of free_)
  PrefixIndex index_;
  std::unordered_map<int64_t, Sequence> seqs_;
};

// Shared by the allocator's source files.
namespace alloc {
[[noreturn]] void value_error(const std::string& msg);
// Sequence ids arrive as an int64 CPU tensor so a decode step costs one call, not one call per sequence.
const int64_t* ids_ptr(const at::Tensor& ids, const char* what);
at::Tensor int32_tensor(at::IntArrayRef sizes);
}  // namespace alloc

}  // namespace dash
