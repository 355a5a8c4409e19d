// KV page allocator of the paged sampler: free list, per-page reference counts, per-sequence page tables, group fork
// with copy-on-write of a shared partial page, and prefix caching of full prompt pages (allocate_cached).
// Bound as dash_kernels._C.PageAllocator (pybind11).
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
#include <torch/extension.h>

#include <algorithm>
#include <deque>
#include <numeric>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "prefix_index.h"

namespace dash {
namespace {

[[noreturn]] void value_error(const std::string& msg) { throw pybind11::value_error("PageAllocator: " + msg); }

// Sequence ids arrive as an int64 CPU tensor so a decode step costs one call, not one call per sequence.
const int64_t* ids_ptr(const at::Tensor& ids, const char* what) {
  if (ids.device().type() != at::kCPU || ids.scalar_type() != at::kLong || ids.dim() != 1 || !ids.is_contiguous()) {
    value_error(std::string(what) + " must be a contiguous 1-D int64 CPU tensor");
  }
  return ids.data_ptr<int64_t>();
}

at::Tensor int32_tensor(at::IntArrayRef sizes) { return at::empty(sizes, at::TensorOptions().dtype(at::kInt)); }

struct Sequence {
  std::vector<int32_t> pages;  // page table: logical page i of the sequence -> physical page
  int64_t num_tokens = 0;      // tokens whose K/V have a slot
};

class PageAllocator {
 public:
  PageAllocator(int64_t num_pages, int64_t page_size)
      : num_pages_(checked(num_pages, page_size)), page_size_(page_size), index_(num_pages, page_size) {
    ref_.assign(num_pages, 0);
    stamp_.assign(num_pages, 0);
    // FIFO: a freed page goes to the back, so a named (cached) page survives as long as possible before reuse,
    // which is least-recently-freed eviction. Page 0 is handed out first, which keeps small tests readable.
    for (int64_t p = 0; p < num_pages; ++p) free_.push_back({static_cast<int32_t>(p), 0});
    num_free_ = num_pages;
  }

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

  int64_t ref_count(int64_t page) const {
    if (page < 0 || page >= num_pages_) value_error("page " + std::to_string(page) + " out of range");
    return ref_[page];
  }

  // New sequences with lens[i] tokens each (a prefill). Returns the slot of every token, packed: [sum(lens)] int32.
  at::Tensor allocate(const at::Tensor& seq_ids, const at::Tensor& lens) {
    const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
    const int64_t* n = ids_ptr(lens, "lens");
    const int64_t B = seq_ids.size(0);
    const int64_t total = check_new_seqs(ids, n, B, lens.size(0));
    int64_t need = 0;
    for (int64_t i = 0; i < B; ++i) need += pages_for(n[i]);
    if (need > num_free_pages()) {
      value_error("out of pages: need " + std::to_string(need) + ", " + std::to_string(num_free_pages()) + " free");
    }
    at::Tensor slots = int32_tensor({total});
    int32_t* out = slots.data_ptr<int32_t>();
    for (int64_t i = 0; i < B; ++i) {
      Sequence& s = seqs_[ids[i]];
      s.num_tokens = n[i];
      s.pages.reserve(pages_for(n[i]) + 1);
      for (int64_t j = 0; j < pages_for(n[i]); ++j) s.pages.push_back(take_page());
      for (int64_t t = 0; t < n[i]; ++t) *out++ = slot(s, t);
    }
    return slots;
  }

  // allocate() with prefix caching. tokens: [sum(lens)] int64, the sequences' tokens packed. Full pages whose chained
  // hash and tokens match a named page (from an earlier call, or an earlier sequence of this call) are shared instead
  // of recomputed; every full page this call writes is named for later ones. At least the last token of each sequence
  // is always computed (its logits are sampled). Returns (slots [sum(lens - cached)] int32 of the tokens to compute,
  // packed; cached [B] int64 tokens taken from the cache per sequence, a multiple of page_size).
  std::vector<at::Tensor> allocate_cached(const at::Tensor& seq_ids, const at::Tensor& tokens, const at::Tensor& lens) {
    const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
    const int64_t* n = ids_ptr(lens, "lens");
    const int64_t* tok = ids_ptr(tokens, "tokens");
    const int64_t B = seq_ids.size(0);
    const int64_t total = check_new_seqs(ids, n, B, lens.size(0));
    if (tokens.size(0) != total) {
      value_error("tokens has " + std::to_string(tokens.size(0)) + " entries, lens sum to " + std::to_string(total));
    }
    // Plan without touching any state: each logical page is an existing page (a hit) or a new page, numbered in
    // order of first use; a new full page may be shared by later sequences of this call (same chain and tokens).
    struct NewPage { uint64_t hash; const int64_t* tokens; bool full; int64_t parent; };  // parent: plan entry
    std::vector<NewPage> fresh;
    std::unordered_map<uint64_t, int32_t> fresh_by_hash;  // chained hash -> index into fresh
    std::vector<std::vector<int64_t>> plan(B);            // >= 0: existing page, < 0: ~index into fresh
    std::vector<int64_t> cached(B, 0);
    std::unordered_set<int32_t> revived;                  // existing free pages this call takes back
    const int64_t* t = tok;
    for (int64_t i = 0; i < B; t += n[i], ++i) {
      const int64_t full = n[i] / page_size_, reusable = (n[i] - 1) / page_size_;
      uint64_t h = PrefixIndex::kRoot;
      bool hitting = true;
      for (int64_t j = 0; j < pages_for(n[i]); ++j) {
        const int64_t* page_tokens = t + j * page_size_;
        const int64_t parent = j ? plan[i][j - 1] : kRootEntry;
        if (j < full) h = PrefixIndex::chain(h, page_tokens, page_size_);
        if (hitting && j < reusable) {
          // An indexed page can only follow an indexed page or start a sequence: after a new page, skip the index.
          int32_t p = -1;
          if (parent == kRootEntry) p = index_.lookup(h, page_tokens, PrefixIndex::kNoPage);
          if (parent >= 0) p = index_.lookup(h, page_tokens, static_cast<int32_t>(parent));
          if (p >= 0) {
            if (ref_[p] == 0) revived.insert(p);
            plan[i].push_back(p);
            cached[i] += page_size_;
            continue;
          }
          auto f = fresh_by_hash.find(h);
          if (f != fresh_by_hash.end() && fresh[f->second].parent == parent &&
              std::equal(page_tokens, page_tokens + page_size_, fresh[f->second].tokens)) {
            plan[i].push_back(~static_cast<int64_t>(f->second));
            cached[i] += page_size_;
            continue;
          }
          hitting = false;
        }
        if (j < full && !fresh_by_hash.count(h)) fresh_by_hash[h] = static_cast<int32_t>(fresh.size());
        plan[i].push_back(~static_cast<int64_t>(fresh.size()));
        fresh.push_back({h, page_tokens, j < full, parent});
      }
    }
    const int64_t need = static_cast<int64_t>(fresh.size() + revived.size());
    if (need > num_free_pages()) {
      value_error("out of pages: need " + std::to_string(need) + ", " + std::to_string(num_free_pages()) + " free");
    }
    // Commit: revive first, so taking new pages cannot evict a page this call is about to reuse.
    for (int32_t p : revived) revive(p);
    std::vector<int32_t> fresh_page(fresh.size());
    for (size_t k = 0; k < fresh.size(); ++k) {
      fresh_page[k] = take_page();
      ref_[fresh_page[k]] = 0;  // counted per holder below
    }
    for (size_t k = 0; k < fresh.size(); ++k) {  // a parent always comes before its child in `fresh`
      if (!fresh[k].full) continue;
      const int64_t e = fresh[k].parent;
      const int32_t parent = e == kRootEntry ? PrefixIndex::kNoPage : e >= 0 ? static_cast<int32_t>(e) : fresh_page[~e];
      index_.insert(fresh[k].hash, fresh_page[k], fresh[k].tokens, parent);
    }
    for (int32_t p : revived) ref_[p] = 0;
    at::Tensor slots = int32_tensor({total - std::accumulate(cached.begin(), cached.end(), int64_t{0})});
    at::Tensor cached_out = at::empty({B}, at::TensorOptions().dtype(at::kLong));
    int32_t* out = slots.data_ptr<int32_t>();
    for (int64_t i = 0; i < B; ++i) {
      Sequence& s = seqs_[ids[i]];
      s.num_tokens = n[i];
      s.pages.reserve(plan[i].size() + 1);
      for (int64_t e : plan[i]) {
        const int32_t p = e >= 0 ? static_cast<int32_t>(e) : fresh_page[~e];
        ++ref_[p];
        s.pages.push_back(p);
      }
      for (int64_t k = cached[i]; k < n[i]; ++k) *out++ = slot(s, k);
      cached_out.data_ptr<int64_t>()[i] = cached[i];
    }
    return {slots, cached_out};
  }

  // Children share every page of the parent (full prompt pages and the partial last one) by reference count; the
  // partial page is copied lazily by the first append() that would write into it while it is shared.
  void fork(int64_t parent, const at::Tensor& child_ids) {
    const int64_t* ids = ids_ptr(child_ids, "child_ids");
    const Sequence& p = get(parent);
    std::unordered_set<int64_t> seen;
    for (int64_t i = 0; i < child_ids.size(0); ++i) {
      if (has_seq(ids[i]) || !seen.insert(ids[i]).second) {
        value_error("fork child " + std::to_string(ids[i]) + " is already allocated");
      }
    }
    const Sequence copy = p;  // seqs_ may rehash below
    for (int64_t i = 0; i < child_ids.size(0); ++i) {
      seqs_[ids[i]] = copy;
      for (int32_t page : copy.pages) ++ref_[page];
    }
  }

  // Free pages one append() on these sequences would take. Exact: a shared page is copied by every writer but the
  // last one, which finds itself the sole owner and writes in place.
  int64_t pages_needed_for_append(const at::Tensor& seq_ids) const {
    const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
    int64_t need = 0;
    std::unordered_map<int32_t, int32_t> writers;  // shared last page -> sequences of this batch writing into it
    for (int64_t i = 0; i < seq_ids.size(0); ++i) {
      const Sequence& s = get(ids[i]);
      if (s.num_tokens % page_size_ == 0) {
        ++need;
      } else if (ref_[s.pages.back()] > 1) {
        ++writers[s.pages.back()];
      }
    }
    for (const auto& [page, w] : writers) need += (w == ref_[page]) ? w - 1 : w;
    return need;
  }

  // One decode step: give each sequence the slot for its next token (new page at a page boundary, copy-on-write of a
  // shared last page) and return (slots[B], page_table[B, W] padded with `pad`, context_lens[B], cow_src[n],
  // cow_dst[n]), all int32. context_lens counts the new token; W = max pages over the batch (>= min_width).
  std::vector<at::Tensor> append(const at::Tensor& seq_ids, int64_t min_width, int64_t pad) {
    const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
    const int64_t B = seq_ids.size(0);
    std::unordered_set<int64_t> seen;
    for (int64_t i = 0; i < B; ++i) {
      get(ids[i]);
      if (!seen.insert(ids[i]).second) value_error("sequence " + std::to_string(ids[i]) + " appears twice");
    }
    const int64_t need = pages_needed_for_append(seq_ids);
    if (need > num_free_pages()) {
      value_error("out of pages for append: need " + std::to_string(need) + ", " + std::to_string(num_free_pages()) +
                  " free (preempt sequences first)");
    }
    at::Tensor slots = int32_tensor({B}), lens = int32_tensor({B});
    int32_t* slot_out = slots.data_ptr<int32_t>();
    int32_t* len_out = lens.data_ptr<int32_t>();
    std::vector<int32_t> src, dst;
    std::vector<Sequence*> batch(B);
    int64_t width = std::max<int64_t>(min_width, 0);
    for (int64_t i = 0; i < B; ++i) {
      Sequence& s = seqs_.find(ids[i])->second;
      batch[i] = &s;
      const int64_t t = s.num_tokens;
      if (t % page_size_ == 0) {
        s.pages.push_back(take_page());
      } else if (ref_[s.pages.back()] > 1) {  // shared partial page: this writer gets a private copy
        const int32_t old = s.pages.back(), fresh = take_page();
        --ref_[old];
        src.push_back(old);
        dst.push_back(fresh);
        s.pages.back() = fresh;
      }
      s.num_tokens = t + 1;
      slot_out[i] = slot(s, t);
      len_out[i] = static_cast<int32_t>(t + 1);
      width = std::max<int64_t>(width, static_cast<int64_t>(s.pages.size()));
    }
    at::Tensor table = int32_tensor({B, width});
    int32_t* row = table.data_ptr<int32_t>();
    for (int64_t i = 0; i < B; ++i, row += width) {
      const auto& pages = batch[i]->pages;
      std::copy(pages.begin(), pages.end(), row);
      std::fill(row + pages.size(), row + width, static_cast<int32_t>(pad));
    }
    return {slots, table, lens, vec_tensor(src), vec_tensor(dst)};
  }

  // Padded page tables without changing anything: [B, max(W, min_width)] int32.
  at::Tensor page_tables(const at::Tensor& seq_ids, int64_t min_width, int64_t pad) const {
    const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
    const int64_t B = seq_ids.size(0);
    int64_t width = std::max<int64_t>(min_width, 0);
    for (int64_t i = 0; i < B; ++i) width = std::max<int64_t>(width, get(ids[i]).pages.size());
    at::Tensor table = int32_tensor({B, width});
    int32_t* row = table.data_ptr<int32_t>();
    for (int64_t i = 0; i < B; ++i, row += width) {
      const auto& pages = get(ids[i]).pages;
      std::copy(pages.begin(), pages.end(), row);
      std::fill(row + pages.size(), row + width, static_cast<int32_t>(pad));
    }
    return table;
  }

  // Finish or preemption: drop the sequences and return pages nobody else references to the free list.
  void free(const at::Tensor& seq_ids) {
    const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
    std::unordered_set<int64_t> seen;
    for (int64_t i = 0; i < seq_ids.size(0); ++i) {
      get(ids[i]);  // unknown (e.g. already freed) -> ValueError before anything is released
      if (!seen.insert(ids[i]).second) value_error("sequence " + std::to_string(ids[i]) + " freed twice in one call");
    }
    for (int64_t i = 0; i < seq_ids.size(0); ++i) {
      auto it = seqs_.find(ids[i]);
      for (int32_t page : it->second.pages) {
        if (--ref_[page] == 0) release(page);
      }
      seqs_.erase(it);
    }
  }

 private:
  const Sequence& get(int64_t seq_id) const {
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) value_error("unknown sequence " + std::to_string(seq_id) + " (never allocated or freed)");
    return it->second;
  }

  static constexpr int64_t kRootEntry = INT64_MIN;  // plan entry "before the first page" (see allocate_cached)

  // Inputs of allocate / allocate_cached: B new, distinct sequences of positive length. Returns sum(lens).
  int64_t check_new_seqs(const int64_t* ids, const int64_t* n, int64_t B, int64_t num_lens) const {
    if (num_lens != B) value_error("seq_ids and lens must have the same length");
    int64_t total = 0;
    std::unordered_set<int64_t> seen;
    for (int64_t i = 0; i < B; ++i) {
      if (n[i] <= 0) value_error("sequence " + std::to_string(ids[i]) + " has length " + std::to_string(n[i]));
      if (has_seq(ids[i]) || !seen.insert(ids[i]).second) {
        value_error("sequence " + std::to_string(ids[i]) + " is already allocated");
      }
      total += n[i];
    }
    return total;
  }

  static int64_t checked(int64_t num_pages, int64_t page_size) {
    if (num_pages <= 0 || page_size <= 0) value_error("num_pages and page_size must be positive");
    if (num_pages > INT32_MAX / page_size) value_error("num_pages * page_size must fit in int32 (slot ids are int32)");
    return num_pages;
  }

  // A free-list entry is live while its page is still free and was not freed again since (the stamp): revive() takes
  // a named page off the free list in O(1) by leaving its entry behind, and take_page() skips such stale entries.
  void release(int32_t p) {
    free_.push_back({p, ++stamp_[p]});
    ++num_free_;
  }

  void revive(int32_t p) {  // a free page named by the prefix index is wanted again, with its K/V
    ref_[p] = 1;
    --num_free_;
  }

  int32_t take_page() {  // callers have checked there are enough free pages
    for (;;) {
      const auto [p, stamp] = free_.front();
      free_.pop_front();
      if (ref_[p] != 0 || stamp != stamp_[p]) continue;  // revived, or freed again later (a newer entry exists)
      index_.forget(p);  // new content: the page's old name would now lie
      ref_[p] = 1;
      --num_free_;
      return p;
    }
  }

  int32_t slot(const Sequence& s, int64_t t) const {
    return static_cast<int32_t>(s.pages[t / page_size_] * page_size_ + t % page_size_);
  }

  static at::Tensor vec_tensor(const std::vector<int32_t>& v) {
    at::Tensor out = int32_tensor({static_cast<int64_t>(v.size())});
    std::copy(v.begin(), v.end(), out.data_ptr<int32_t>());
    return out;
  }

  int64_t num_pages_, page_size_;
  std::vector<int32_t> ref_;   // [num_pages] reference count of each page
  std::vector<uint32_t> stamp_;  // [num_pages] times the page was freed (validates free-list entries)
  std::deque<std::pair<int32_t, uint32_t>> free_;  // (page, stamp) FIFO; may hold stale entries, see release()
  int64_t num_free_ = 0;          // pages with ref 0 (the live entries of free_)
  PrefixIndex index_;
  std::unordered_map<int64_t, Sequence> seqs_;
};

}  // namespace

void bind_page_allocator(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<PageAllocator>(m, "PageAllocator",
                            "KV page allocator: free list, ref counts, fork, copy-on-write (csrc/page_allocator.cpp).")
      .def(py::init<int64_t, int64_t>(), py::arg("num_pages"), py::arg("page_size"))
      .def_property_readonly("num_pages", &PageAllocator::num_pages)
      .def_property_readonly("page_size", &PageAllocator::page_size)
      .def_property_readonly("num_free_pages", &PageAllocator::num_free_pages)
      .def_property_readonly("num_seqs", &PageAllocator::num_seqs)
      .def_property_readonly("num_cached_pages", &PageAllocator::num_cached_pages)
      .def("has_seq", &PageAllocator::has_seq, py::arg("seq_id"))
      .def("pages_for", &PageAllocator::pages_for, py::arg("num_tokens"))
      .def("can_allocate", &PageAllocator::can_allocate, py::arg("num_tokens"))
      .def("num_tokens", &PageAllocator::num_tokens, py::arg("seq_id"))
      .def("page_table", &PageAllocator::page_table, py::arg("seq_id"))
      .def("ref_count", &PageAllocator::ref_count, py::arg("page"))
      .def("allocate", &PageAllocator::allocate, py::arg("seq_ids"), py::arg("lens"))
      .def("allocate_cached", &PageAllocator::allocate_cached, py::arg("seq_ids"), py::arg("tokens"), py::arg("lens"))
      .def("fork", &PageAllocator::fork, py::arg("parent"), py::arg("child_ids"))
      .def("pages_needed_for_append", &PageAllocator::pages_needed_for_append, py::arg("seq_ids"))
      .def("append", &PageAllocator::append, py::arg("seq_ids"), py::arg("min_width") = 0, py::arg("pad") = 0)
      .def("page_tables", &PageAllocator::page_tables, py::arg("seq_ids"), py::arg("min_width") = 0,
           py::arg("pad") = 0)
      .def("free", &PageAllocator::free, py::arg("seq_ids"));
}

}  // namespace dash
