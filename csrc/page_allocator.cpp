// PageAllocator (csrc/page_allocator.h): the free list and every call but allocate_cached
// (csrc/page_allocator_prefix.cpp), and the pybind11 binding dash_kernels._C.PageAllocator.
#include "page_allocator.h"

#include <algorithm>
#include <unordered_set>

namespace dash {

namespace alloc {
void value_error(const std::string& msg) { throw pybind11::value_error("PageAllocator: " + msg); }

const int64_t* ids_ptr(const at::Tensor& ids, const char* what) {
  if (ids.device().type() != at::kCPU || ids.scalar_type() != at::kLong || ids.dim() != 1 || !ids.is_contiguous()) {
    value_error(std::string(what) + " must be a contiguous 1-D int64 CPU tensor");
  }
  return ids.data_ptr<int64_t>();
}

at::Tensor int32_tensor(at::IntArrayRef sizes) { return at::empty(sizes, at::TensorOptions().dtype(at::kInt)); }
}  // namespace alloc

using alloc::ids_ptr;
using alloc::int32_tensor;
using alloc::value_error;

namespace {

int64_t checked_num_pages(int64_t num_pages, int64_t page_size) {
  if (num_pages <= 0 || page_size <= 0) value_error("num_pages and page_size must be positive");
  if (num_pages > INT32_MAX / page_size) value_error("num_pages * page_size must fit in int32 (slot ids are int32)");
  return num_pages;
}

at::Tensor vec_tensor(const std::vector<int32_t>& v) {
  at::Tensor out = int32_tensor({static_cast<int64_t>(v.size())});
  std::copy(v.begin(), v.end(), out.data_ptr<int32_t>());
  return out;
}

// [B, width] int32: row i is seqs[i]'s page table, padded with `pad` (width >= every table's length).
at::Tensor padded_tables(const std::vector<const Sequence*>& seqs, int64_t width, int64_t pad) {
  at::Tensor table = int32_tensor({static_cast<int64_t>(seqs.size()), width});
  int32_t* row = table.data_ptr<int32_t>();
  for (const Sequence* s : seqs) {
    std::copy(s->pages.begin(), s->pages.end(), row);
    std::fill(row + s->pages.size(), row + width, static_cast<int32_t>(pad));
    row += width;
  }
  return table;
}

}  // namespace

PageAllocator::PageAllocator(int64_t num_pages, int64_t page_size)
    : num_pages_(checked_num_pages(num_pages, page_size)), page_size_(page_size), index_(num_pages, page_size) {
  ref_.assign(num_pages, 0);
  stamp_.assign(num_pages, 0);
  // FIFO: a freed page goes to the back, so a named (cached) page survives as long as possible before reuse, which
  // is least-recently-freed eviction. Page 0 is handed out first, which keeps small tests readable.
  for (int64_t p = 0; p < num_pages; ++p) free_.push_back({static_cast<int32_t>(p), 0});
  num_free_ = num_pages;
}

int64_t PageAllocator::ref_count(int64_t page) const {
  if (page < 0 || page >= num_pages_) value_error("page " + std::to_string(page) + " out of range");
  return ref_[page];
}

at::Tensor PageAllocator::allocate(const at::Tensor& seq_ids, const at::Tensor& lens) {
  const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
  const int64_t* n = ids_ptr(lens, "lens");
  const int64_t B = seq_ids.size(0);
  const int64_t total = check_new_seqs(ids, n, B, lens.size(0));
  int64_t need = 0;
  for (int64_t i = 0; i < B; ++i) need += pages_for(n[i]);
  check_free_pages(need, "");
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

void PageAllocator::fork(int64_t parent, const at::Tensor& child_ids) {
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

int64_t PageAllocator::pages_needed_for_append(const at::Tensor& seq_ids) const {
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

std::vector<at::Tensor> PageAllocator::append(const at::Tensor& seq_ids, int64_t min_width, int64_t pad) {
  const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
  const int64_t B = seq_ids.size(0);
  std::unordered_set<int64_t> seen;
  for (int64_t i = 0; i < B; ++i) {
    get(ids[i]);
    if (!seen.insert(ids[i]).second) value_error("sequence " + std::to_string(ids[i]) + " appears twice");
  }
  check_free_pages(pages_needed_for_append(seq_ids), " for append (evict sequences first)");
  at::Tensor slots = int32_tensor({B}), lens = int32_tensor({B});
  int32_t* slot_out = slots.data_ptr<int32_t>();
  int32_t* len_out = lens.data_ptr<int32_t>();
  std::vector<int32_t> src, dst;
  std::vector<const Sequence*> batch(B);
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
  return {slots, padded_tables(batch, width, pad), lens, vec_tensor(src), vec_tensor(dst)};
}

at::Tensor PageAllocator::page_tables(const at::Tensor& seq_ids, int64_t min_width, int64_t pad) const {
  const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
  std::vector<const Sequence*> batch(seq_ids.size(0));
  int64_t width = std::max<int64_t>(min_width, 0);
  for (size_t i = 0; i < batch.size(); ++i) {
    batch[i] = &get(ids[i]);
    width = std::max<int64_t>(width, static_cast<int64_t>(batch[i]->pages.size()));
  }
  return padded_tables(batch, width, pad);
}

void PageAllocator::free(const at::Tensor& seq_ids) {
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

const Sequence& PageAllocator::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) value_error("unknown sequence " + std::to_string(seq_id) + " (never allocated or freed)");
  return it->second;
}

int64_t PageAllocator::check_new_seqs(const int64_t* ids, const int64_t* n, int64_t B, int64_t num_lens) const {
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

void PageAllocator::check_free_pages(int64_t need, const char* what) const {
  if (need > num_free_pages()) {
    value_error("out of pages" + std::string(what) + ": need " + std::to_string(need) + ", " +
                std::to_string(num_free_pages()) + " free");
  }
}

// A free-list entry is live while its page is still free and was not freed again since (the stamp): revive() takes a
// named page off the free list in O(1) by leaving its entry behind, and take_page() skips such stale entries.
void PageAllocator::release(int32_t p) {
  free_.push_back({p, ++stamp_[p]});
  ++num_free_;
}

void PageAllocator::revive(int32_t p) {  // a free page named by the prefix index is wanted again, with its K/V
  ref_[p] = 1;
  --num_free_;
}

int32_t PageAllocator::take_page() {  // callers have checked there are enough free pages
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

void bind_page_allocator(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<PageAllocator>(
      m, "PageAllocator",
      "KV page allocator: free list, ref counts, fork, copy-on-write, prefix cache (csrc/page_allocator.h).")
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
